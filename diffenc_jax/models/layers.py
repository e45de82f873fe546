"""Layers shared by every model: time embeddings, res blocks, attention, trunks.

Conventions: images are NHWC, (B, H, W, C); vectors are (B, D); times t ∈ [0, 1] are (B,).
There is no BatchNorm anywhere (GroupNorm / LayerNorm only), so every example is processed
independently: per-example Jacobians and 1-vs-N-device results do not depend on the batch.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

zeros_init = nn.initializers.zeros
_NHWC = ("NHWC", "HWIO", "NHWC")
# XLA:CPU convolutions with at most this many output positions are computed as im2col patches
# @ kernel: XLA's own conv is pathologically slow on such small maps, while on larger maps it is
# the faster of the two (benchmarks/conv.py; docs/benchmarks.md, "Convolutions on small maps")
IM2COL_MAX_POSITIONS = 16


def _patches(x: jax.Array, kernel_hw: tuple[int, int], strides, pads) -> jax.Array:
  """im2col: (B, H, W, C) → (B, H', W', kh·kw·C), the input window of every output position,
  in the (kh, kw, C) order of an HWIO kernel's leading axes."""
  (kh, kw), (sh, sw) = kernel_hw, strides
  xp = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
  ho, wo = (xp.shape[1] - kh) // sh + 1, (xp.shape[2] - kw) // sw + 1
  return jnp.concatenate([xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]
                          for i in range(kh) for j in range(kw)], axis=-1)


def _conv_im2col(x, kernel, strides, pads):
  """The convolution as one matmul of the im2col patches (B, H', W', kh·kw·C) by the kernel
  reshaped to (kh·kw·C, C'); JAX differentiates the slices and the matmul directly."""
  kh, kw, cin, cout = kernel.shape
  return _patches(x, (kh, kw), strides, pads) @ kernel.reshape(kh * kw * cin, cout)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None):
  """`lax.conv_general_dilated` for `nn.Conv(conv_general_dilated=…)`: the same value and
  derivatives, faster on small maps on a CPU.

  On the CPU backend, an undilated, ungrouped NHWC conv with at most IM2COL_MAX_POSITIONS
  output positions is computed as im2col patches @ kernel (`_conv_im2col`). Elsewhere (GPU,
  TPU, larger maps) this is `lax.conv_general_dilated` itself. Parameters are nn.Conv's own.
  """
  plain = functools.partial(
      jax.lax.conv_general_dilated, lhs, rhs, window_strides, padding,
      lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
      precision=precision)
  nhwc = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
  undilated = all(d == 1 for d in (lhs_dilation or ()) + (rhs_dilation or ()))
  if (jax.default_backend() != "cpu" or lhs.ndim != 4 or feature_group_count != 1
      or not undilated or precision is not None
      or jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != nhwc):
    return plain()
  pads = (jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
          if isinstance(padding, str) else padding)
  pads = tuple(tuple(int(p) for p in pair) for pair in pads)
  positions = math.prod((lhs.shape[1 + i] + sum(pads[i]) - rhs.shape[i]) // window_strides[i] + 1
                        for i in range(2))
  if positions > IM2COL_MAX_POSITIONS:
    return plain()
  return _conv_im2col(lhs, rhs, tuple(window_strides), pads)


def Conv(features: int, kernel_size: Sequence[int], **kwargs) -> nn.Conv:  # pylint: disable=invalid-name
  """nn.Conv (same parameters and names) computed by `conv_general_dilated` above."""
  return nn.Conv(features, tuple(kernel_size), conv_general_dilated=conv_general_dilated,
                 **kwargs)


def group_norm(channels: int, name: str | None = None) -> nn.GroupNorm:
  """GroupNorm with up to 32 groups, the largest count that divides `channels`."""
  return nn.GroupNorm(num_groups=math.gcd(32, channels), name=name)


def sinusoidal_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Transformer-style sinusoidal features of continuous time: t (B,) ∈ [0, 1] → (B, dim).

  t is scaled by 1000 first, so the frequencies match those of a 1000-step discrete model.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = 1000.0 * jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  return jnp.pad(emb, ((0, 0), (0, dim - 2 * half)))


class TimeEmbedding(nn.Module):
  """MLP time embedding: t (B,) → sinusoidal (B, dim) → Dense → SiLU → Dense → (B, dim)."""

  dim: int

  @nn.compact
  def __call__(self, t):
    h = nn.Dense(self.dim)(sinusoidal_embedding(t, self.dim))
    return nn.Dense(self.dim)(nn.silu(h))


def modulate(h: jax.Array, emb: jax.Array, name: str | None = None) -> jax.Array:
  """AdaGN / FiLM: h * (1 + s) + b, (s, b) = Dense(SiLU(emb)); emb (B, E), h (B, ..., C)."""
  s, b = jnp.split(nn.Dense(2 * h.shape[-1], name=name)(nn.silu(emb)), 2, axis=-1)
  shape = (h.shape[0],) + (1,) * (h.ndim - 2) + (h.shape[-1],)
  return h * (1.0 + s.reshape(shape)) + b.reshape(shape)


class ResBlock(nn.Module):
  """Conv residual block: (B, H, W, Cin) → (B, H, W, out_channels).

  GN → SiLU → conv → GN → [modulation] → SiLU → dropout → conv, plus a (1×1 conv) skip.
  Modulation: `emb` (B, E) gives GN(h)*(1+s)+b (AdaGN); a second embedding `cond` (B, E')
  modulates the result again, h*(1+s_z)+b_z (FiLM with separate time and z paths); `scale`
  (B, E'') scales it, h*(1+s_z) with s_z = Dense(scale) (DiffAE's z conditioning: no shift).
  Dropout draws from the 'dropout' rng when train=True.
  """

  out_channels: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, emb=None, cond=None, train: bool = False, scale=None):
    h = Conv(self.out_channels, (3, 3))(nn.silu(group_norm(x.shape[-1])(x)))
    h = group_norm(self.out_channels)(h)
    if emb is not None:
      h = modulate(h, emb, name="emb_mod")
    if cond is not None:
      h = modulate(h, cond, name="cond_mod")
    if scale is not None:
      s_z = nn.Dense(self.out_channels, name="scale_mod")(scale)
      h = h * (1.0 + s_z.reshape((h.shape[0],) + (1,) * (h.ndim - 2) + (h.shape[-1],)))
    h = nn.Dropout(self.dropout)(nn.silu(h), deterministic=not train)
    h = Conv(self.out_channels, (3, 3))(h)
    if x.shape[-1] != self.out_channels:
      x = Conv(self.out_channels, (1, 1), name="skip")(x)
    return x + h


class AttentionBlock(nn.Module):
  """Residual multi-head attention over the H·W positions: (B, H, W, C) → (B, H, W, C).

  Self-attention when `context` is None; otherwise cross-attention from every position to
  the context tokens (B, T, E). With a single token (T = 1), the DMZ way of injecting z, the
  softmax over one key is identically 1, so queries and keys cannot matter: every position
  receives W_o (W_v token + b_v) + b_o. That closed form is computed directly (same value and
  output projections, no dead query/key weights), which is exact and much cheaper.
  """

  num_heads: int = 1

  @nn.compact
  def __call__(self, x, context=None):
    b, hh, ww, c = x.shape
    if context is not None and context.shape[1] == 1:
      value = nn.Dense(c, name="value")(context[:, 0])
      return x + nn.Dense(c, name="out")(value)[:, None, None, :]
    q = group_norm(c)(x).reshape(b, hh * ww, c)
    out = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, qkv_features=c, out_features=c)(q, context)
    return x + out.reshape(b, hh, ww, c)


class Downsample(nn.Module):
  """Stride-2 3×3 conv: (B, H, W, C) → (B, ⌈H/2⌉, ⌈W/2⌉, C)."""

  @nn.compact
  def __call__(self, x):
    return Conv(x.shape[-1], (3, 3), strides=(2, 2))(x)


class Upsample(nn.Module):
  """Nearest resize to an exact (H', W') then 3×3 conv: (B, H, W, C) → (B, H', W', C).

  Resizing to the skip connection's size (not blindly ×2) makes 7 → 14 → 28 and any odd
  size round trip exactly.
  """

  @nn.compact
  def __call__(self, x, size: Sequence[int]):
    b, h, w, c = x.shape
    if tuple(size) == (2 * h, 2 * w):  # each pixel repeated 2×2: a broadcast, whose gradient
      # is a sum (on XLA:CPU faster than `jax.image.resize`'s gather and scatter-add;
      # docs/benchmarks.md, "Convolutions on small maps")
      x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
    else:
      x = jax.image.resize(x, (b, size[0], size[1], c), method="nearest")
    return Conv(c, (3, 3))(x)


class ConvTrunk(nn.Module):
  """Feature extractor shared by all encoders: x → h (B, features), ending in SiLU.

  Images (B, H, W, C): per entry of `channels`, a stride-2 3×3 conv → GroupNorm → SiLU;
  then flatten → Dense(features). Vectors (B, D): an MLP with len(channels) hidden layers
  of width `features` (the branch is chosen by x.ndim).
  """

  channels: Sequence[int] = (32, 64)
  features: int = 256

  @nn.compact
  def __call__(self, x):
    if x.ndim == 2:
      h = x
      for _ in self.channels:
        h = nn.silu(nn.Dense(self.features)(h))
    elif x.ndim == 4:
      h = x
      for c in self.channels:
        h = nn.silu(group_norm(c)(Conv(c, (3, 3), strides=(2, 2))(h)))
      h = h.reshape(h.shape[0], -1)
    else:
      raise ValueError(f"ConvTrunk expects (B, D) or (B, H, W, C) input, got {x.shape}")
    return nn.silu(nn.Dense(self.features)(h))


class ResMLPBlock(nn.Module):
  """Residual MLP block: x (B, W) + [LN → FiLM(cond) → SiLU → Dense → SiLU → Dense](x)."""

  @nn.compact
  def __call__(self, x, cond):
    w = x.shape[-1]
    h = nn.silu(modulate(nn.LayerNorm()(x), cond))
    h = nn.Dense(w)(nn.silu(nn.Dense(w)(h)))
    return x + h


class ResidualMLP(nn.Module):
  """Conditional residual MLP: x (B, D_in), cond (B, E) → (B, out_dim).

  Dense(hidden) → num_blocks × ResMLPBlock → LN → SiLU → Dense(out_dim), the last Dense
  zero-initialised so that the untrained network outputs exactly 0.
  """

  hidden: int = 256
  num_blocks: int = 3
  out_dim: int = 1

  @nn.compact
  def __call__(self, x, cond):
    h = nn.Dense(self.hidden)(x)
    for _ in range(self.num_blocks):
      h = ResMLPBlock()(h, cond)
    h = nn.silu(nn.LayerNorm()(h))
    return nn.Dense(self.out_dim, kernel_init=zeros_init, name="out")(h)
