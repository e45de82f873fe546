"""Decoder networks: `MeanDecoder`, the mean μ_θ(z) of a gaussian decoder, and `UNetDecoder`, a
z-conditioned diffusion U-Net. The decoders as likelihoods are `diffenc_jax.decoders`."""

from __future__ import annotations

import math
from typing import Sequence

import chex
import flax.linen as nn
import jax.numpy as jnp

from diffenc_jax.models.layers import (AttentionBlock, Conv, Downsample, ResBlock, ResidualMLP,
                                       TimeEmbedding, Upsample, group_norm, zeros_init)

CONDITIONINGS = ("scale", "adagn", "film", "xattn")


def _halvings(size: int, n: int) -> list[int]:
  """[size, ⌈size/2⌉, ⌈size/4⌉, …], n + 1 entries: the sizes of a stride-2 'SAME' pyramid."""
  sizes = [size]
  for _ in range(n):
    sizes.append(-(-sizes[-1] // 2))
  return sizes


class MeanDecoder(nn.Module):
  """Mean network μ_θ(z) of a gaussian decoder (`decoders.GaussianDecoder`): z (B, d) → μ
  (B, *image_shape).

  Images (H, W, C): Dense → reshape to (H/2^n, W/2^n, channels[0]) with n = len(channels),
  then per stage a 4×4 stride-2 ConvTranspose to channels[i] (cropped to the exact size, so
  odd sizes such as 7 → 14 → 28 work) → GroupNorm → SiLU, and a final 3×3 conv to C. The
  output is linear (unconstrained; data live in [-1, 1]). ConvTranspose works at the input
  resolution, cheaper than resize + conv: the decoder's per-example Jacobian is hot.
  Vectors (D,), or images with arch='mlp': an MLP with hidden widths `mlp_hidden` (the
  output reshaped to the image). On a CPU the MLP is much cheaper than the conv stack
  (docs/benchmarks.md, "Langevin steps"), which matters because the E-step differentiates the
  decoder many times per training step.
  `dropout` > 0 drops MLP hidden units when train=True (the 'dropout' rng): a regulariser for
  small datasets; the mean used by the E-step and evaluation is the deterministic one.
  """

  image_shape: Sequence[int] = (28, 28, 1)
  channels: Sequence[int] = (64, 32)
  arch: str = "conv"  # conv | mlp (vector data always use the MLP)
  mlp_hidden: Sequence[int] = (256, 256)
  dropout: float = 0.0

  @nn.compact
  def __call__(self, z, train: bool = False):
    if len(self.image_shape) == 1 or self.arch == "mlp":
      h = z
      for width in self.mlp_hidden:
        h = nn.Dropout(self.dropout)(nn.silu(nn.Dense(width)(h)), deterministic=not train)
      out = nn.Dense(math.prod(self.image_shape))(h)
      return out.reshape((z.shape[0],) + tuple(self.image_shape))
    height, width, out_channels = self.image_shape
    n = len(self.channels)
    hs, ws = _halvings(height, n)[::-1], _halvings(width, n)[::-1]
    h = nn.Dense(hs[0] * ws[0] * self.channels[0])(z)
    h = nn.silu(h.reshape(z.shape[0], hs[0], ws[0], self.channels[0]))
    for i, c in enumerate(self.channels):
      h = nn.ConvTranspose(c, (4, 4), strides=(2, 2))(h)[:, :hs[i + 1], :ws[i + 1]]
      h = nn.silu(group_norm(c)(h))
    return Conv(out_channels, (3, 3))(h)


class UNetDecoder(nn.Module):
  """z-conditioned diffusion decoder ε_θ(x_t, t, z): x_t (B, *image_shape), t (B,), z (B, d)
  → ε̂ with the shape of x_t.

  ADM / DiffAE-style U-Net: per level (width channels·channel_mult[i]) `num_res_blocks`
  ResBlocks (+ self-attention where the spatial size is in `attn_resolutions`), a stride-2
  conv between levels (28 → 14 → 7), a middle block-attention-block, and a mirrored
  up path with skip connections and nearest-resize upsampling to the skip's exact size.
  The time embedding (B, emb_dim) modulates every ResBlock by AdaGN, GN(h)·(1+s)+b.
  z enters according to `conditioning`:
    'scale': each ResBlock's time-modulated, group-normed features are scaled by
             (1 + Dense(z)): (GN(h)·(1+s_t)+b_t)·(1+s_z), as in DiffAE's code;
    'adagn': Dense(z) is added to the time embedding (an additive variant);
    'film':  an MLP embedding of z modulates each ResBlock again, separately from t:
             (GN(h)·(1+s_t)+b_t)·(1+s_z)+b_z;
    'xattn': z is projected to one token (B, 1, emb_dim), and every ResBlock is followed by
             cross-attention from all positions to that token (DMZ; with one token this is
             computed in closed form, see AttentionBlock).
  The output conv is zero-initialised (ε̂ = 0 at init). Dropout in the ResBlocks uses the
  'dropout' rng when train=True. Vector data, image_shape = (D,): a residual MLP whose
  blocks are FiLM-modulated by TimeEmbedding(t) + Dense(z) (all conditionings alike).

  DiffAE's 64×64 autoencoder: channels=64, channel_mult=(1, 2, 4, 8), num_res_blocks=2,
  attn_resolutions=(16,), emb_dim=512, dropout=0.1.
  """

  image_shape: Sequence[int] = (28, 28, 1)
  channels: int = 32
  channel_mult: Sequence[int] = (1, 2)
  num_res_blocks: int = 1
  attn_resolutions: Sequence[int] = ()
  emb_dim: int = 128
  dropout: float = 0.0
  conditioning: str = "adagn"
  latent_dim: int | None = None  # if set, z's last dimension is checked against it
  num_heads: int = 1

  @nn.compact
  def __call__(self, x_t, t, z, train: bool = False):
    if self.conditioning not in CONDITIONINGS:
      raise ValueError(f"unknown conditioning {self.conditioning!r}; choose from {CONDITIONINGS}")
    chex.assert_shape(x_t, (None, *self.image_shape))
    chex.assert_shape(t, (x_t.shape[0],))
    chex.assert_shape(z, (x_t.shape[0], self.latent_dim))

    emb = TimeEmbedding(self.emb_dim)(t)
    if len(self.image_shape) == 1:
      cond = emb + nn.Dense(self.emb_dim)(z)
      num_blocks = max(2 * self.num_res_blocks, 1)
      return ResidualMLP(self.emb_dim, num_blocks, self.image_shape[0])(x_t, cond)

    cond = token = scale = None
    if self.conditioning == "scale":
      scale = z
    elif self.conditioning == "adagn":
      emb = emb + nn.Dense(self.emb_dim, name="z_proj")(z)
    elif self.conditioning == "film":
      cond = nn.Dense(self.emb_dim)(nn.silu(nn.Dense(self.emb_dim, name="z_proj")(z)))
    else:
      token = nn.Dense(self.emb_dim, name="z_proj")(z)[:, None, :]

    def block(h, c, self_attn):
      h = ResBlock(c, self.dropout)(h, emb, cond, train, scale)
      if self_attn:
        h = AttentionBlock(self.num_heads)(h)
      if token is not None:
        h = AttentionBlock(self.num_heads)(h, token)
      return h

    h = Conv(self.channels, (3, 3))(x_t)
    skips = [h]
    for level, mult in enumerate(self.channel_mult):
      for _ in range(self.num_res_blocks):
        h = block(h, self.channels * mult, h.shape[1] in self.attn_resolutions)
        skips.append(h)
      if level < len(self.channel_mult) - 1:
        h = Downsample()(h)
        skips.append(h)

    c_mid = self.channels * self.channel_mult[-1]
    h = block(block(h, c_mid, self_attn=True), c_mid, self_attn=False)

    for level, mult in reversed(list(enumerate(self.channel_mult))):
      for _ in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = block(h, self.channels * mult, h.shape[1] in self.attn_resolutions)
      if level > 0:
        h = Upsample()(h, skips[-1].shape[1:3])

    h = nn.silu(group_norm(h.shape[-1])(h))
    return Conv(self.image_shape[-1], (3, 3), kernel_init=zeros_init, name="out")(h)
