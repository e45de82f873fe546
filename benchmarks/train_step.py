"""Training throughput: images per second of one jitted training round (forward, backward and
Adam; for diffenc the whole E-step + M-step), median of --repeats timed rounds after warm-up,
on random inputs of each config's data shape.

    python benchmarks/train_step.py [--configs diffae64,mnist,mnist_vae,...] [--repeats 5] \
        [--step N] [--set FIELD=VALUE ...]

`diffae64` is DiffAE's published 64×64 autoencoder (configs/diffae64.py) at 32×32 RGB, batch 16,
the setting in which the reference PyTorch implementation trains at 5.9 img/s on a 2-core CPU.
Its round also updates DiffAE's latent DDPM prior (5 × 2048-wide blocks), which the reference
figure does not include: our figure is for strictly more work. The mnist configs run at their
own batch (128) and data shape (28×28×1).
"""

import argparse
import importlib
import os
import sys
import time

import jax
import numpy as np

from diffenc_jax import methods

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/

# config module → (data shape, batch size) of the benchmark
SHAPES = {
    "diffae64": ((32, 32, 3), 16),
    "mnist": ((28, 28, 1), 128),
    "mnist_vae": ((28, 28, 1), 128),
    "mnist_joint": ((28, 28, 1), 128),
    "mnist_diffae": ((28, 28, 1), 128),
    "mnist_dmz": ((28, 28, 1), 128),
    "mnist_diffdec": ((28, 28, 1), 128),
}


def images_per_second(name: str, repeats: int, overrides: dict | None = None,
                      step: int = 0) -> tuple[float, float, float]:
  """(images/s, seconds per round, seconds of the first call: compilation + one round) of
  config `name`'s jitted training round, with `overrides` {dotted field: value} applied, from a
  state at round `step`, as the trainer compiles it: the program of the method's phase at that
  round (`phase_at`, e.g. EM after a gaussian warm-up)."""
  shape, batch = SHAPES[name]
  config = importlib.import_module(f"configs.{name}").get_config()
  config.train.batch_size = batch
  for field, value in (overrides or {}).items():
    *path, leaf = field.split(".")
    node = config
    for part in path:
      node = node[part]
    node[leaf] = type(node[leaf])(value) if not isinstance(node[leaf], bool) else value == "true"
  method = methods.get_method(config, shape)
  e = config.train.batches_per_round
  xs = jax.random.uniform(jax.random.key(1), (e, batch) + shape, minval=-1.0, maxval=1.0)
  kwargs = {}
  if getattr(method, "uses_example_index", False):  # persistent chains: slots 0 … E·B − 1
    kwargs["index"] = jax.numpy.arange(xs.shape[0] * xs.shape[1]).reshape(xs.shape[:2])
  if hasattr(method, "phase_at"):  # the program the trainer runs at round `step`
    kwargs["phase"] = method.phase_at(step)
  round_fn = jax.jit(lambda s, x, k: method.train_round(s, x, k, **kwargs), donate_argnums=0)
  state = jax.jit(method.init_state)(jax.random.key(0))
  state = state.replace(step=jax.numpy.asarray(step, state.step.dtype))
  first = 0.0
  for i in range(2):  # compile, then one warm round
    start = time.perf_counter()
    state, metrics = round_fn(state, xs, jax.random.key(i))
    jax.block_until_ready(metrics)
    first = first or time.perf_counter() - start
  times = []
  for i in range(repeats):
    start = time.perf_counter()
    state, metrics = round_fn(state, xs, jax.random.key(100 + i))
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  seconds = float(np.median(times))
  return e * batch / seconds, seconds, first


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", default=",".join(SHAPES))
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--step", type=int, default=0,
                      help="time the round the trainer runs at this round (e.g. past a "
                           "warm-up: that phase's program)")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="override a config field for every config, e.g. model.denoiser=unet")
  args = parser.parse_args()
  overrides = dict(item.split("=", 1) for item in args.set)
  print(f"devices: {jax.devices()}")
  print(f"{'config':16s} {'shape':>12s} {'batch':>5s} {'s/round':>8s} {'img/s':>8s} "
        f"{'compile s':>9s}")
  for name in args.configs.split(","):
    shape, batch = SHAPES[name]
    ips, seconds, first = images_per_second(name, args.repeats, overrides, args.step)
    print(f"{name:16s} {'x'.join(map(str, shape)):>12s} {batch:5d} {seconds:8.3f} {ips:8.1f} "
          f"{first:9.1f}", flush=True)


if __name__ == "__main__":
  main()
