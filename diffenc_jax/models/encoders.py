"""The baselines' encoder networks and the Bernoulli relaxations; the encoders as pieces
(VAE's gaussian, DiffAE's deterministic, DMZ's bits) are `diffenc_jax.encoders`.

The two small networks share the ConvTrunk of layers.py (an MLP for vector data) and differ
only in their head. `ResNetEncoder` is a deeper, drop-in replacement for `ConvEncoder` that can
express DiffAE's 64×64 semantic encoder.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

from diffenc_jax.models.layers import (AttentionBlock, Conv, ConvTrunk, Downsample, ResBlock,
                                       group_norm)


class MeanLogVarEncoder(nn.Module):
  """The gaussian encoder's network: x (B, H, W, C) or (B, D) → (mean (B, d), log_var (B, d))."""

  latent_dim: int
  channels: Sequence[int] = (32, 64)
  features: int = 256

  @nn.compact
  def __call__(self, x):
    h = ConvTrunk(self.channels, self.features)(x)
    return nn.Dense(self.latent_dim, name="mean")(h), nn.Dense(self.latent_dim, name="log_var")(h)


class ConvEncoder(nn.Module):
  """One vector per image: x (B, H, W, C) or (B, D) → (B, d) (DiffAE's code, DMZ's logits)."""

  latent_dim: int
  channels: Sequence[int] = (32, 64)
  features: int = 256

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.latent_dim)(ConvTrunk(self.channels, self.features)(x))


class ResNetEncoder(nn.Module):
  """Deep deterministic encoder: x (B, H, W, C) → z (B, latent_dim).

  conv → per level `num_res_blocks` ResBlocks of width channels·channel_mult[i] (+ self-
  attention where the spatial size is in `attn_resolutions`), stride-2 conv between levels
  → GroupNorm → SiLU → global average pool → Dense(latent_dim). DiffAE's 64×64 encoder:
  channels=64, channel_mult=(1, 2, 4, 8, 8), num_res_blocks=2, attn_resolutions=(16,),
  latent_dim=512. Images only.
  """

  latent_dim: int
  channels: int = 64
  channel_mult: Sequence[int] = (1, 2, 4, 8, 8)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = ()
  num_heads: int = 1

  @nn.compact
  def __call__(self, x):
    if x.ndim != 4:
      raise ValueError(f"ResNetEncoder expects images (B, H, W, C), got {x.shape}")
    h = Conv(self.channels, (3, 3))(x)
    for level, mult in enumerate(self.channel_mult):
      for _ in range(self.num_res_blocks):
        h = ResBlock(self.channels * mult)(h)
        if h.shape[1] in self.attn_resolutions:
          h = AttentionBlock(self.num_heads)(h)
      if level < len(self.channel_mult) - 1:
        h = Downsample()(h)
    h = nn.silu(group_norm(h.shape[-1])(h)).mean(axis=(1, 2))
    return nn.Dense(self.latent_dim)(h)


def relaxed_bernoulli(key: jax.Array, logits: jax.Array, temperature: float,
                      noise_scale: float = 1.0) -> jax.Array:
  """Binary-concrete (Gumbel-sigmoid) sample: soft bits in (0, 1), differentiable in logits.

  b = sigmoid((logits + s L) / temperature) with L ~ Logistic(0, 1), i.e. L = log u − log(1−u)
  for u ~ U(0, 1), and s = noise_scale (1: the binary concrete law; 0: no noise). With s = 1,
  as temperature → 0, b → 1[logits + L > 0], a Bernoulli(sigmoid(logits)) draw; the shape is
  that of `logits`.
  """
  noise = jax.random.logistic(key, logits.shape, dtype=logits.dtype)
  return jax.nn.sigmoid((logits + noise_scale * noise) / temperature)


def hard_bernoulli(logits: jax.Array) -> jax.Array:
  """Deterministic bits 1[logits > 0] (the mode of Bernoulli(sigmoid(logits))), as floats."""
  return (logits > 0).astype(logits.dtype)
