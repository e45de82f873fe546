"""A z-conditioned transformer denoiser (DiT-style): matmul-bound, fast on CPUs and accelerators.

Images are cut into non-overlapping p×p patches, each patch a token; the tokens pass through
`depth` transformer blocks whose LayerNorms are modulated by the conditioning
c = MLP(time) + MLP(z) through adaLN-Zero (shift, scale and a residual gate per sub-layer, all
from one zero-initialised Dense of SiLU(c), so that every block starts as the identity); a
final modulated LayerNorm and a zero-initialised linear map give each token's p·p·C outputs,
which are put back together into an image. At init the network outputs exactly 0.

Cost: (H/p)(W/p) tokens of width `width`. On a 28×28 digit with p = 7 that is 16 tokens; the
whole network is a handful of (B·16, width) matmuls, which XLA:CPU runs far faster than the
U-Net's convolutions on small maps.
"""

from __future__ import annotations

from typing import Sequence

import chex
import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from diffenc_jax.models.layers import TimeEmbedding, zeros_init


def patchify(x, p: int):
  """(B, H, W, C) → (B, (H/p)(W/p), p·p·C), tokens in row-major patch order."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens, image_shape: Sequence[int], p: int):
  """The inverse of `patchify`: (B, (H/p)(W/p), p·p·C) → (B, H, W, C)."""
  h, w, c = image_shape
  b = tokens.shape[0]
  x = tokens.reshape(b, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, w, c)


def sincos_positions(grid_h: int, grid_w: int, dim: int) -> np.ndarray:
  """Fixed 2-D sine-cosine position embedding (grid_h·grid_w, dim), half the channels per axis."""
  def one_axis(pos, d):
    omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / max(d // 2, 1))
    args = pos[:, None] * omega[None]
    return np.concatenate([np.sin(args), np.cos(args)], axis=1)

  gy, gx = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64),
                       indexing="ij")
  half = dim // 2
  emb = np.concatenate([one_axis(gy.reshape(-1), half), one_axis(gx.reshape(-1), dim - half)], 1)
  return emb.astype(np.float32)


def _modulate(h, shift, scale):
  return h * (1.0 + scale[:, None, :]) + shift[:, None, :]


class DiTBlock(nn.Module):
  """x (B, T, W) ← x + g₁·Attn(LN(x)(1+s₁)+b₁) then x + g₂·MLP(LN(x)(1+s₂)+b₂), with
  (b₁, s₁, g₁, b₂, s₂, g₂) = Dense(SiLU(c)), zero-initialised (adaLN-Zero)."""

  num_heads: int
  mlp_ratio: float = 4.0

  @nn.compact
  def __call__(self, x, c):
    w = x.shape[-1]
    mods = nn.Dense(6 * w, kernel_init=zeros_init, name="adaln")(nn.silu(c))
    b1, s1, g1, b2, s2, g2 = jnp.split(mods, 6, axis=-1)
    h = _modulate(nn.LayerNorm(use_scale=False, use_bias=False)(x), b1, s1)
    h = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, qkv_features=w,
                                        out_features=w, name="attn")(h, h)
    x = x + g1[:, None, :] * h
    h = _modulate(nn.LayerNorm(use_scale=False, use_bias=False)(x), b2, s2)
    h = nn.Dense(int(self.mlp_ratio * w))(h)
    h = nn.Dense(w)(nn.gelu(h))
    return x + g2[:, None, :] * h


class DiTDenoiser(nn.Module):
  """z-conditioned transformer denoiser f_θ(x_t, t, z): x_t (B, H, W, C), t (B,), z (B, d) →
  (B, H, W, C), the raw prediction (ε, v or x₀: the decoder's parameterisation decides).

  H and W must be multiples of `patch_size`. Conditioning: c = TimeEmbedding(t) +
  Dense(SiLU(Dense(z))), the sum of a time MLP and a z MLP, modulating every block by
  adaLN-Zero; positions are fixed 2-D sine-cosine embeddings added to the patch projection.
  """

  image_shape: Sequence[int] = (28, 28, 1)
  patch_size: int = 7
  width: int = 128
  depth: int = 4
  num_heads: int = 4
  mlp_ratio: float = 4.0
  latent_dim: int | None = None  # if set, z's last dimension is checked against it

  @nn.compact
  def __call__(self, x_t, t, z, train: bool = False):
    del train  # no dropout
    h_img, w_img, _ = self.image_shape
    p = self.patch_size
    if h_img % p or w_img % p:
      raise ValueError(f"image size {h_img}×{w_img} is not a multiple of patch_size {p}")
    chex.assert_shape(x_t, (None, *self.image_shape))
    chex.assert_shape(t, (x_t.shape[0],))
    chex.assert_shape(z, (x_t.shape[0], self.latent_dim))

    c = TimeEmbedding(self.width)(t)
    c = c + nn.Dense(self.width)(nn.silu(nn.Dense(self.width, name="z_proj")(z)))
    tokens = nn.Dense(self.width, name="patch_proj")(patchify(x_t, p))
    tokens = tokens + sincos_positions(h_img // p, w_img // p, self.width)[None]
    for _ in range(self.depth):
      tokens = DiTBlock(self.num_heads, self.mlp_ratio)(tokens, c)
    shift, scale = jnp.split(nn.Dense(2 * self.width, kernel_init=zeros_init,
                                      name="final_adaln")(nn.silu(c)), 2, axis=-1)
    tokens = _modulate(nn.LayerNorm(use_scale=False, use_bias=False)(tokens), shift, scale)
    out = nn.Dense(p * p * self.image_shape[-1], kernel_init=zeros_init, name="out")(tokens)
    return unpatchify(out, self.image_shape, p)
