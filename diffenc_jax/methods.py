"""The methods the training program can run, behind one interface.

Each method is an encoder q(z|x) × a decoder p(x|z) × a training rule: `TABLE` below, with
`ENCODERS` (the encoder pieces of `diffenc_jax.encoders` by kind) and `RULES` (what each rule
does); the decoder is `decoders.build` from config.model.decoder. A method is an object built
from `(config, data_shape)` that holds only static things (networks, schedules, optimisers)
and offers pure, jittable functions:

    state = method.init_state(key)                              # train_state.TrainState
    state, metrics = method.train_round(state, xs, key)         # xs (E, B, ...) → scalar metrics
    lat = method.latents(params, x, key, num_steps=None)        # {"z0", "zK", "info"}
    x_hat = method.decode(params["decoder"], z, key)            # (B, ...)
    rate = method.rate(params, x, z0, key, num_samples)         # (B,) nats (inf: deterministic)
    z_q = method.rate_latent(params, x, z0, key)                # (B, d): the variable rated
    z = method.sample_latents(params, key, n)                   # (n, d) from the method's prior

and the attributes `latent_dim`, `data_shape`, `progress_keys` (metrics shown by the progress
bar) and `rate_kind` (how `rate` is computed, for tables). `latents` returns the encoder's own
code as "z0"; methods without a posterior refinement return "zK" = "z0" and "info" = None.
`rate` is the KL to the prior of `rate_latent`'s variable (diffenc: z0 blurred at the latent
schedule's λ_max; VAE: a sample of q(z|x); others: z0), so that its decode is the distortion
of the same variable (docs/rate.md).
"""

from __future__ import annotations

import importlib
from typing import NamedTuple

from diffenc_jax import decoders, encoders, latent_prior


class Entry(NamedTuple):
  """A method as encoder × decoder × training rule, and the class that implements it."""
  encoder: str   # a key of ENCODERS
  decoder: str   # the config.model.decoder it runs with: 'diffusion', or 'any' of decoders
  rule: str      # a key of RULES
  cls: str       # "module:Class" in diffenc_jax, imported lazily (one method's dependencies
                 # never load another's)


ENCODERS = encoders.PIECES  # kind → the encoder piece (encoders.LatentDiffusionEncoder, ...)
RULES = {
    "em": "EM rounds: E-steps (Langevin on π_β from the encoder's z⁰, the encoder's denoising "
          "update on z^K), then M-steps of the decoder on z^K (em.DiffusionEncoder.train_round)",
    "one_loss": "one loss over every parameter, one joint update per batch "
                "(baselines.OneLossMethod.train_round)",
}
TABLE = {
    # name           encoder                decoder      rule        class
    "diffenc":       Entry("diffusion",     "any",       "em",       "em:DiffusionEncoder"),
    "diffenc_joint": Entry("diffusion",     "any",       "one_loss", "joint:DiffusionEncoderJoint"),
    "vae":           Entry("gaussian",      "any",       "one_loss", "baselines:VAE"),
    "diffae":        Entry("deterministic", "diffusion", "one_loss", "baselines:DiffAE"),
    "dmz":           Entry("bernoulli",     "diffusion", "one_loss", "baselines:DMZ"),
}
METHODS = tuple(TABLE)


def method_class(name: str):
  """The class of method `name`."""
  if name not in TABLE:
    raise ValueError(f"unknown method {name!r}; choose one of {METHODS}")
  module, cls = TABLE[name].cls.split(":")
  return getattr(importlib.import_module(f"diffenc_jax.{module}"), cls)


def get_method(config, data_shape: tuple[int, ...]):
  """The method named by config.method, built for images of shape data_shape."""
  return method_class(config.method)(config, tuple(data_shape))


def validate(config) -> None:
  """The checks of config.method's pieces in turn, each of its own section: its decoder
  (`decoders.validate`, and that the method runs with it), its encoder (the piece's `validate`,
  where it has one), the method's own (`cls.validate`, where it has one), then its latent
  prior's (`latent_prior.validate`, where it fits one).
  Raises ValueError with one line."""
  entry = TABLE[config.method]
  if entry.decoder not in ("any", config.model.decoder):
    raise ValueError(f"method {config.method!r} needs model.decoder={entry.decoder!r}")
  decoders.validate(config)
  for piece in (ENCODERS[entry.encoder], method_class(config.method)):
    check = getattr(piece, "validate", None)
    if check is not None:
      check(config)
  if config.method == "diffae" or (entry.encoder == "diffusion" and config.em.latent_prior):
    latent_prior.validate(config.latent_prior)  # the methods that fit a latent prior
