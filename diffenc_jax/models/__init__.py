"""Flax Linen networks: the latent denoiser (diffusion encoder), decoders, baseline encoders."""

from diffenc_jax.models.decoders import CONDITIONINGS, GaussianDecoder, UNetDecoder
from diffenc_jax.models.encoders import (BernoulliEncoder, DeterministicEncoder, GaussianEncoder,
                                         ResNetEncoder, hard_bernoulli, relaxed_bernoulli)
from diffenc_jax.models.latent_denoiser import LatentDenoiser, LatentPrior

__all__ = [
    "CONDITIONINGS",
    "BernoulliEncoder",
    "DeterministicEncoder",
    "GaussianDecoder",
    "GaussianEncoder",
    "LatentDenoiser",
    "LatentPrior",
    "ResNetEncoder",
    "UNetDecoder",
    "hard_bernoulli",
    "relaxed_bernoulli",
]
