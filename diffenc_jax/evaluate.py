"""Held-out evaluation: reconstruction PSNR from z⁰ and from E-step-refined z^K, rate, gap.

PSNR is computed with pixels in [0, 1] (the model's [-1, 1] output is clipped and mapped by
x ↦ (x + 1)/2) as 10 log10(1 / MSE), the MSE averaged over every pixel of the held-out split
(one number for the split, not a mean of per-image PSNRs, which would read higher).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from diffenc_jax import data


def psnr_from_mse(mse: float) -> float:
  """10 log10(1 / mse) for pixels in [0, 1]; capped at 100 dB for a perfect match."""
  return 100.0 if mse <= 1e-10 else -10.0 * math.log10(mse)


def unit_mse(x: jax.Array, x_hat: jax.Array) -> jax.Array:
  """Per-example MSE (B,) with both in [-1, 1] mapped to [0, 1]; x_hat clipped first."""
  diff = (jnp.clip(x_hat, -1.0, 1.0) - x) / 2.0
  return jnp.mean(jnp.square(diff).reshape(x.shape[0], -1), axis=-1)


@dataclasses.dataclass
class HeldOut:
  """The held-out split and a jitted function of the metrics of one of its batches."""

  config: object
  method: object
  images: np.ndarray
  labels: np.ndarray

  @classmethod
  def load(cls, config, method) -> "HeldOut":
    images, labels = data.load_eval_split(config.data, "test")
    return cls(config, method, images, labels)

  def __post_init__(self):
    self._batch_metrics = jax.jit(self._metrics)
    self.reconstruct = jax.jit(self._reconstruct)

  def _reconstruct(self, params, x, key):
    """(z⁰, z^K, decode(z⁰), decode(z^K), Langevin info) for a batch x."""
    m = self.method
    k_lat, k_dec = jax.random.split(key)
    lat = m.latents(params, x, k_lat, self.config.em.eval_refine_steps)
    z0, zk = lat["z0"], lat["zK"]
    return (z0, zk, m.decode(params["decoder"], z0, k_dec), m.decode(params["decoder"], zk, k_dec),
            lat["info"])

  def _metrics(self, params, x, key):
    k_rec, k_rate = jax.random.split(key)
    z0, zk, x0, xk, info = self._reconstruct(params, x, k_rec)
    out = {
        "mse_z0": unit_mse(x, x0),
        "mse_zK": unit_mse(x, xk),
        "rate_nats": self.method.rate(params, x, z0, k_rate, self.config.eval.rate_samples),
        "gap": jnp.sum(jnp.square(zk - z0), -1),
    }
    if info is not None:  # methods with a posterior refinement of z⁰
      out["move"] = jnp.full((x.shape[0],), info.move_norm)
      out["accept"] = jnp.full((x.shape[0],), info.accept_rate)
    return out

  def evaluate(self, state, key=None) -> dict[str, float]:
    """Metrics over the whole held-out split (EMA params if config.eval.use_ema)."""
    params = state.eval_params(self.config.eval.use_ema)
    key = jax.random.key(self.config.seed + 1) if key is None else key
    b = self.config.eval.batch_size
    sums, n = {}, 0
    for i in range(0, len(self.images), b):
      x = self.images[i:i + b]
      out = jax.device_get(self._batch_metrics(params, x, jax.random.fold_in(key, i)))
      for k, v in out.items():
        sums[k] = sums.get(k, 0.0) + float(np.sum(v))
      n += len(x)
    mean = {k: v / n for k, v in sums.items()}
    return {"psnr_z0": psnr_from_mse(mean["mse_z0"]), "psnr_zK": psnr_from_mse(mean["mse_zK"]),
            "rate_nats": mean["rate_nats"], "rate_bits": mean["rate_nats"] / math.log(2), **mean}


def encode_splits(config, method, state, path: str, refine: bool = True) -> None:
  """Writes z⁰ (and, with refine, E-step-refined z^K) of both splits with labels to .npz."""
  params = state.eval_params(config.eval.use_ema)

  @jax.jit
  def encode(x, key):
    if not refine:
      return (method.encode(params["encoder"], x, key),) * 2
    lat = method.latents(params, x, key, config.em.eval_refine_steps)
    return lat["z0"], lat["zK"]

  out = {}
  for split in ("train", "test"):
    images, labels = data.load_eval_split(config.data, split)
    b = config.eval.batch_size
    z0s, zks = [], []
    for i in range(0, len(images), b):
      z0, zk = encode(images[i:i + b], jax.random.fold_in(jax.random.key(config.seed + 2), i))
      z0s.append(np.asarray(z0))
      zks.append(np.asarray(zk))
    out[f"{split}_z0"] = np.concatenate(z0s)
    if refine:
      out[f"{split}_zK"] = np.concatenate(zks)
    out[f"{split}_labels"] = labels
  np.savez(path, **out)
