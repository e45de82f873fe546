"""Flax Linen networks: the latent denoiser (diffusion encoder), decoder networks (gaussian mean,
U-Net and transformer denoisers), baseline encoders. The decoders as likelihoods with their
losses and samplers are `diffenc_jax.decoders`."""

from diffenc_jax.models.decoders import CONDITIONINGS, MeanDecoder, UNetDecoder
from diffenc_jax.models.dit import DiTDenoiser
from diffenc_jax.models.encoders import (ConvEncoder, MeanLogVarEncoder, ResNetEncoder,
                                         hard_bernoulli, relaxed_bernoulli)
from diffenc_jax.models.latent_denoiser import LatentDenoiser, LatentPrior

__all__ = [
    "CONDITIONINGS",
    "ConvEncoder",
    "DiTDenoiser",
    "MeanLogVarEncoder",
    "LatentDenoiser",
    "LatentPrior",
    "MeanDecoder",
    "ResNetEncoder",
    "UNetDecoder",
    "hard_bernoulli",
    "relaxed_bernoulli",
]
