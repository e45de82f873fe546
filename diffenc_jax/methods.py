"""The methods the training program can run, behind one interface.

A method is an object built from `(config, data_shape)` that holds only static things
(networks, schedules, optimisers) and offers pure, jittable functions:

    state = method.init_state(key)                              # em.TrainState
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

# name → "module:Class"; imported lazily so that one method's dependencies never load another's
_REGISTRY = {
    "diffenc": "diffenc_jax.em:DiffusionEncoder",
    "diffenc_joint": "diffenc_jax.baselines:DiffusionEncoderJoint",
    "vae": "diffenc_jax.baselines:VAE",
    "diffae": "diffenc_jax.baselines:DiffAE",
    "dmz": "diffenc_jax.baselines:DMZ",
}
METHODS = tuple(_REGISTRY)


def get_method(config, data_shape: tuple[int, ...]):
  """The method named by config.method, built for images of shape data_shape."""
  if config.method not in _REGISTRY:
    raise ValueError(f"unknown method {config.method!r}; choose one of {METHODS}")
  module, cls = _REGISTRY[config.method].split(":")
  return getattr(importlib.import_module(module), cls)(config, tuple(data_shape))
