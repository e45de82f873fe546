"""Latent ε-networks over z ∈ R^d: the diffusion encoder's ε_φ(z_t, t, h(x)) and an
unconditional ε(z_t, t) for a latent prior."""

from __future__ import annotations

from typing import Sequence

import chex
import flax.linen as nn

from diffenc_jax.models.layers import ConvTrunk, ResidualMLP, TimeEmbedding


class LatentDenoiser(nn.Module):
  """Latent ε-prediction network conditioned on the data x.

  Split in two so that the expensive part runs once per image and is reused by every step
  of the latent sampler:
    - `features(x)`: x (B, H, W, C) or (B, D) → h (B, feature_dim), the shared conv trunk
      (an MLP for vector data);
    - `denoise(z_t, t, h)`: z_t (B, d), t (B,) ∈ [0, 1], h (B, feature_dim) → ε̂ (B, d), a
      residual MLP whose blocks are FiLM-modulated by TimeEmbedding(t) + Dense(h);
    - `__call__(z_t, t, x) = denoise(z_t, t, features(x))` (use it for `init`).
  The output Dense is zero-initialised: an untrained network predicts ε̂ = 0 exactly.

  The trunk width is the field `feature_dim` (not `features`, which names the method).
  Call the parts with `model.apply(params, x, method="features")` and
  `model.apply(params, z_t, t, h, method="denoise")`.
  """

  latent_dim: int
  channels: Sequence[int] = (32, 64)
  feature_dim: int = 256
  hidden: int = 256
  num_blocks: int = 3

  def setup(self):
    self.trunk = ConvTrunk(self.channels, self.feature_dim)
    self.time_embed = TimeEmbedding(self.hidden)
    self.feature_proj = nn.Dense(self.hidden)
    self.mlp = ResidualMLP(self.hidden, self.num_blocks, self.latent_dim)

  def features(self, x):
    """x (B, H, W, C) or (B, D) → h (B, feature_dim)."""
    return self.trunk(x)

  def denoise(self, z_t, t, h):
    """z_t (B, d), t (B,), h (B, feature_dim) → ε̂ (B, d)."""
    chex.assert_shape(z_t, (None, self.latent_dim))
    chex.assert_shape(t, (z_t.shape[0],))
    chex.assert_shape(h, (z_t.shape[0], self.feature_dim))
    return self.mlp(z_t, self.time_embed(t) + self.feature_proj(h))

  def __call__(self, z_t, t, x):
    """z_t (B, d), t (B,), x (B, H, W, C) or (B, D) → ε̂ (B, d)."""
    return self.denoise(z_t, t, self.features(x))


class LatentPrior(nn.Module):
  """Unconditional latent ε-prediction network ε(z_t, t): z_t (B, d), t (B,) → ε̂ (B, d).

  The latent DDPM that DiffAE fits over its encoder's codes to sample them: LatentDenoiser's
  residual MLP, FiLM-modulated by TimeEmbedding(t) alone (no image input), with the output
  Dense zero-initialised.
  """

  latent_dim: int
  hidden: int = 256
  num_blocks: int = 3

  @nn.compact
  def __call__(self, z_t, t):
    chex.assert_shape(z_t, (None, self.latent_dim))
    chex.assert_shape(t, (z_t.shape[0],))
    return ResidualMLP(self.hidden, self.num_blocks, self.latent_dim)(
        z_t, TimeEmbedding(self.hidden)(t))
