"""PNG grids of images in [-1, 1] (Pillow): reconstructions and samples."""

from __future__ import annotations

import jax
import numpy as np
import PIL.Image


def image_grid(images: np.ndarray, rows: int) -> np.ndarray:
  """(N, H, W, C) in [-1, 1] → one uint8 image (rows·H, ⌈N/rows⌉·W, C), 1-pixel gaps."""
  images = np.clip((np.asarray(images) + 1.0) * 127.5, 0, 255).astype(np.uint8)
  n, h, w, c = images.shape
  cols = -(-n // rows)
  grid = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, c), 255, np.uint8)
  for i, img in enumerate(images):
    r, q = divmod(i, cols)
    grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = img
  return grid


def save_png(grid: np.ndarray, path: str, scale: int = 2) -> None:
  img = PIL.Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
  img.resize((img.width * scale, img.height * scale), PIL.Image.NEAREST).save(path)


def save_reconstructions(held_out, state, path: str) -> None:
  """Rows: held-out images, their decodes from z⁰, from refined z^K (image data only)."""
  cfg = held_out.config
  if len(held_out.method.data_shape) != 3:
    return
  params = state.eval_params(cfg.eval.use_ema)
  x = held_out.images[:min(cfg.eval.num_images, 16)]
  _, _, x0, xk, _ = held_out.reconstruct(params, x, jax.random.key(cfg.seed + 3))
  rows = [x, x0, xk]
  save_png(image_grid(np.concatenate([np.asarray(r) for r in rows]), rows=3), path)


def save_samples(method, state, config, path: str) -> None:
  """A grid of decodes of latents drawn from the method's prior."""
  params = state.eval_params(config.eval.use_ema)

  @jax.jit
  def sample(params, key):
    k_z, k_dec = jax.random.split(key)
    z = method.sample_latents(params, k_z, config.eval.num_images)
    return method.decode(params["decoder"], z, k_dec)

  x = sample(params, jax.random.key(config.seed + 4))
  save_png(image_grid(np.asarray(x), rows=int(np.sqrt(config.eval.num_images))), path)
