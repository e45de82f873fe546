"""Where the time of one training round goes: each part of the round jitted on its own and
timed (median of --repeats calls after a compiling call and a warm one, `jax.block_until_ready`),
beside the whole jitted round, on random inputs of each config's data shape. The timed calls
are interleaved (every part once, then again, …) so that a change in the host's load weighs on
every part alike; on a host shared with other work the figures are still only indicative.

    python benchmarks/breakdown.py [--configs mnist,diffae64] [--repeats 5] [--set FIELD=VALUE]
    python benchmarks/breakdown.py --tiny   # the same parts on tiny networks (a smoke test)

`mnist` (configs/mnist.py, diffenc with the gaussian decoder; 28×28×1, batch 128): the encoder's
latent DDIM sampling of z⁰ (`DiffusionEncoder.encode`, of which the image features), the
Gauss-Newton precision of the E-step (the decoder's `precision_fn`: one `jacfwd`; then the
`spd_factor` that factors it), the Langevin/MALA chain (`chain.posterior_sample`, which computes the
precision once), the encoder update (value_and_grad of `encoder_loss` over
model.enc_noise_draws draws + Adam + EMA), the latent prior's step (`prior_step`, when
em.latent_prior is set) and the em.m_updates M-steps (`m_step`).

`diffae64` (configs/diffae64.py, DiffAE; 32×32×3, batch 16 as in benchmarks/train_step.py):
the encoder forward and forward + backward (a vjp into its parameters from z), the U-Net's
training loss forward, its forward + backward (gradient in the decoder's parameters and in z),
the latent prior's loss and gradient, the optimisers' update of every group, the EMA update,
the running z statistics (which encode the batch again after the update), and the whole update.

Parts marked "·" in the table are contained in the part above them and are left out of the sum
of parts; the sum of the others against the whole round shows what fusing them into one program
gains or loses. Each part runs the project's own functions; none reimplements the model.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffenc_jax import methods, samplers, schedules, train_state

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/

# config module → (data shape, batch size); the same as benchmarks/train_step.py
SHAPES = {
    "mnist": ((28, 28, 1), 128),
    "diffae64": ((32, 32, 3), 16),
}
# --tiny: the same configs on tiny networks and batches, for a test that runs in seconds
TINY_SHAPES = {
    "mnist": ((28, 28, 1), 8),
    "diffae64": ((8, 8, 3), 2),
}
TINY_OVERRIDES = {
    "mnist": {"model.latent_dim": 4, "model.enc_channels": (8, 16), "model.enc_features": 32,
              "model.enc_hidden": 32, "model.enc_blocks": 1, "model.dec_hidden": (32,),
              "encoder_sampler.num_steps": 2, "em.langevin.num_steps": 2,
              "model.enc_noise_draws": 2, "latent_prior.hidden": 16, "latent_prior.blocks": 1},
    "diffae64": {"model.latent_dim": 8, "model.unet_channels": 8,
                 "model.unet_channel_mult": (1,), "model.unet_num_res_blocks": 1,
                 "model.unet_attn_resolutions": (), "model.unet_emb_dim": 16,
                 "diffae.resnet_channels": 8, "diffae.resnet_channel_mult": (1,),
                 "diffae.resnet_num_res_blocks": 1, "diffae.resnet_attn_resolutions": (),
                 "latent_prior.hidden": 16, "latent_prior.blocks": 1},
}
ROUND = "whole round"


class Part(NamedTuple):
  """One timed part: its name, whether it is contained in the part listed before it (and so
  left out of the sum of parts), the function and its arguments."""

  name: str
  sub: bool
  fn: Callable
  args: tuple


class Timing(NamedTuple):
  name: str
  sub: bool
  seconds: float  # median of the timed calls
  first: float  # the first call: compilation + one call


def apply_overrides(config, overrides: dict):
  """Sets config fields {dotted name: value}; a string value is converted to the field's type
  (booleans from 'true'/'false', tuples from comma-separated items, as train_step.py's --set)."""
  for field, value in overrides.items():
    *path, leaf = field.split(".")
    node = config
    for part in path:
      node = node[part]
    old = node[leaf]
    if isinstance(value, str):
      if isinstance(old, bool):
        value = value == "true"
      elif isinstance(old, tuple):
        value = tuple(type(old[0])(v) if old else int(v) for v in value.split(",") if v)
      else:
        value = type(old)(value)
    node[leaf] = value
  return config


def load(name: str, tiny: bool = False, overrides: dict | None = None):
  """(config, data shape, batch size) of config module `name` for this benchmark."""
  shape, batch = (TINY_SHAPES if tiny else SHAPES)[name]
  config = importlib.import_module(f"configs.{name}").get_config()
  config.train.batch_size = batch
  if tiny:
    apply_overrides(config, TINY_OVERRIDES[name])
  apply_overrides(config, overrides or {})
  return config, shape, batch


_JITTED: dict[Callable, Callable] = {}
_FIRST: dict[Callable, float] = {}


def run(fn: Callable, *args):
  """jax.jit(fn)(*args), finished (`jax.block_until_ready`), one jitted program per function
  object, so that a part whose output feeds another part's inputs compiles once; the seconds of
  each program's first call (compilation + one call) are kept."""
  if fn not in _JITTED:
    _JITTED[fn] = jax.jit(fn)
  start = time.perf_counter()
  out = jax.block_until_ready(_JITTED[fn](*args))
  _FIRST.setdefault(fn, time.perf_counter() - start)
  return out


def diffenc_parts(method, state, xs: jax.Array) -> list[Part]:
  """The parts of one diffenc EM round (`DiffusionEncoder.em_round`)."""
  config = method.config
  params, x, key = state.params, xs[0], jax.random.key(7)
  enc, dec = params["encoder"], params["decoder"]
  beta = schedules.beta_at(config.bottleneck, state.step)

  def encode(enc, x):
    return method.encode(enc, x, key)

  def chain(params, x, z0):
    return method.posterior_sample(params, x, z0, key, beta=beta)

  def precision(dec, x, z):
    fn = method.decoder.precision_fn(dec, x, key, beta,
                                     prior_precision=1.0 + config.em.prox_weight,
                                     estimator=config.em.langevin)
    return fn(z)

  def factor(h):
    return samplers.spd_factor(0.5 * (h + jnp.swapaxes(h, -1, -2)))

  # the parts' inputs, from the parts' own (memoised) programs
  z0 = run(encode, enc, x)
  zk = run(chain, params, x, z0)[0]
  h = run(precision, dec, x, z0)
  latents = {"z0": z0, "zK": zk}

  def encoder_update(state, x, zk):
    enc = state.params["encoder"]
    loss, grads = jax.value_and_grad(method.encoder_loss)(enc, x, zk, key)
    updates, opt_state = method.enc_opt.update(grads, state.opt_state["encoder"], enc)
    enc = optax.apply_updates(enc, updates)
    return loss, enc, opt_state, train_state.ema_update(state.ema["encoder"], enc,
                                                        config.train.ema_decay)

  def m_steps(state, xs, latents):
    metrics = []
    for i in range(config.em.m_updates):  # as em_round: each M-step on the batch i % E
      state, m = method.m_step(state, xs[i % xs.shape[0]], latents, jax.random.fold_in(key, i))
      metrics.append(m)
    return state, metrics

  parts = [
      Part("encoder: z⁰ by latent DDIM (encode)", False, encode, (enc, x)),
      Part("encoder features h(x)", True,
           lambda p, x: method.encoder.apply(p, x, method="features"), (enc, x)),
      Part("Langevin/MALA chain (posterior_sample)", False, chain, (params, x, z0)),
      Part("Gauss-Newton precision (jacfwd)", True, precision, (dec, x, z0)),
      Part("factor of the precision", True, factor, (h,)),
      Part("encoder update (grad + Adam + EMA)", False, encoder_update, (state, x, zk)),
  ]
  if method.prior is not None:
    parts.append(Part("latent prior step", False,
                      lambda s, z: method.prior_step(s, z, key), (state, z0)))
  parts.append(Part(f"M-steps (×{config.em.m_updates})", False, m_steps, (state, xs, latents)))
  return parts


def diffae_parts(method, state, xs: jax.Array) -> list[Part]:
  """The parts of one DiffAE update (`DiffAE.update`)."""
  config = method.config
  params, x, key = state.params, xs[0], jax.random.key(7)
  enc, dec, prior = params["encoder"], params["decoder"], params["prior"]
  stats = params.get("zstats")
  encode = method.encode  # one object: its program compiles once
  z = run(encode, enc, x)
  # the optimisers' input: gradients of the right shapes (Adam's and the clipping's cost does
  # not depend on their values), without compiling the whole loss's gradient once more
  grads = {name: jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params[name])
           for name in method.optimizers}

  def encoder_fwd_bwd(enc, x, ct):
    z, vjp = jax.vjp(lambda p: encode(p, x), enc)
    return z, vjp(ct)

  def unet_loss(dec, x, z):
    return method.decoder.loss(dec, x, z, key).mean()

  def prior_grad(prior, z):
    return jax.value_and_grad(lambda p: method.prior.loss(p, z, key, stats).mean())(prior)

  def optimizer_update(params, opt_state, grads):
    new_params, new_opt = dict(params), dict(opt_state)
    for name, opt in method.optimizers.items():
      updates, new_opt[name] = opt.update(grads[name], opt_state[name], params[name])
      new_params[name] = optax.apply_updates(params[name], updates)
    return new_params, new_opt

  parts = [
      Part("encoder forward + backward", False, encoder_fwd_bwd, (enc, x, jnp.ones_like(z))),
      Part("encoder forward", True, encode, (enc, x)),
      Part("U-Net forward + backward (decoder loss)", False,
           jax.value_and_grad(unet_loss, argnums=(0, 2)), (dec, x, z)),
      Part("U-Net forward", True, unet_loss, (dec, x, z)),
      Part("latent prior loss + grad", False, prior_grad, (prior, z)),
      Part("optimiser update (all groups)", False, optimizer_update,
           (params, state.opt_state, grads)),
      Part("EMA update", False,
           lambda ema, p: train_state.ema_update(ema, p, config.train.ema_decay),
           (state.ema, params)),
  ]
  if method.prior.normalize:
    parts.append(Part("z statistics (encoder forward again)", False,
                      lambda enc, x, s: method.prior.update_stats(s, encode(enc, x)),
                      (enc, x, stats)))
  return parts


def breakdown(name: str, repeats: int, tiny: bool = False,
              overrides: dict | None = None) -> list[Timing]:
  """The timed parts of config `name`'s training round, then the whole round (ROUND)."""
  _JITTED.clear()
  _FIRST.clear()
  config, shape, batch = load(name, tiny, overrides)
  method = methods.get_method(config, shape)
  e = config.train.batches_per_round
  xs = jax.random.uniform(jax.random.key(1), (e, batch) + shape, minval=-1.0, maxval=1.0)
  state = jax.jit(method.init_state)(jax.random.key(0))
  if config.method == "diffenc":
    parts = diffenc_parts(method, state, xs)
  elif config.method == "diffae":
    parts = diffae_parts(method, state, xs)
  else:
    raise ValueError(f"no breakdown for method {config.method!r} (diffenc, diffae)")
  # the whole round as in training (benchmarks/train_step.py): jitted, its state donated and
  # carried from call to call; a copy of its own, since donation consumes the buffers
  round_fn = jax.jit(method.train_round, donate_argnums=0)
  if getattr(method, "uses_example_index", False):  # persistent chains: slots 0 … E·B − 1
    index = jax.numpy.arange(xs.shape[0] * xs.shape[1]).reshape(xs.shape[:2])
    round_fn = jax.jit(lambda s, x, k, f=method.train_round: f(s, x, k, index=index),
                       donate_argnums=0)
  carried = {"state": jax.tree.map(jnp.copy, state), "i": 0}

  def whole_round():
    carried["state"], metrics = round_fn(carried["state"], xs, jax.random.key(carried["i"]))
    carried["i"] += 1
    return jax.block_until_ready(metrics)

  calls = [lambda p=p: run(p.fn, *p.args) for p in parts] + [whole_round]
  start = time.perf_counter()
  whole_round()  # compiles
  first = [_FIRST.get(p.fn) for p in parts] + [time.perf_counter() - start]
  for j, call in enumerate(calls):  # compile what is not compiled yet, then one warm call each
    if first[j] is None:
      call()
      first[j] = _FIRST[parts[j].fn]
    call()
  # the timed calls interleaved (every part once, then again, …), so that a change in the
  # host's load over the run weighs on every part alike
  times = [[] for _ in calls]
  for _ in range(repeats):
    for j, call in enumerate(calls):
      start = time.perf_counter()
      call()
      times[j].append(time.perf_counter() - start)
  names = [(p.name, p.sub) for p in parts] + [(ROUND, False)]
  return [Timing(name, sub, float(np.median(t)), f)
          for (name, sub), t, f in zip(names, times, first)]


def milliseconds(seconds: float) -> str:
  """seconds as ms with at least 3 significant digits (a tiny part is not printed as 0.0)."""
  ms = 1e3 * seconds
  return f"{ms:.1f}" if ms >= 10 else f"{ms:.3g}"


def table(name: str, timings: list[Timing], shape, batch: int) -> str:
  """A markdown table of the parts in ms and as a share of the whole round."""
  whole = next(t.seconds for t in timings if t.name == ROUND)
  rows = [f"### {name} ({'×'.join(map(str, shape))}, batch {batch})", "",
          "| part | ms | % of round | first call (s) |", "|---|---|---|---|"]
  for t in timings:
    label = f"· {t.name}" if t.sub else t.name
    rows.append(f"| {label} | {milliseconds(t.seconds)} | {100 * t.seconds / whole:.0f} | "
                f"{t.first:.1f} |")
  total = sum(t.seconds for t in timings if not t.sub and t.name != ROUND)
  rows.append(f"| sum of the parts (without ·) | {milliseconds(total)} | "
              f"{100 * total / whole:.0f} | |")
  return "\n".join(rows)


def main(argv: list[str] | None = None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", default=",".join(SHAPES))
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--tiny", action="store_true", help="tiny networks and batches")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="override a config field for every config, e.g. "
                           "latent_prior.blocks=1")
  args = parser.parse_args(argv)
  overrides = dict(item.split("=", 1) for item in args.set)
  print(f"devices: {jax.devices()}")
  for name in args.configs.split(","):
    shape, batch = (TINY_SHAPES if args.tiny else SHAPES)[name]
    timings = breakdown(name, args.repeats, args.tiny, overrides)
    print()
    print(table(name, timings, shape, batch), flush=True)


if __name__ == "__main__":
  main()
