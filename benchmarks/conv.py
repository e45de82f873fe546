"""Convolution gradients on this backend: XLA's own vs `layers.Conv`'s im2col kernel gradient.

Part 1, one layer: for each (batch, size, channels) of a 3×3 stride-1 conv in our U-Nets and
encoders, milliseconds (median of --repeats after warm-up) of the forward pass, of the
gradient w.r.t. the input alone and the kernel alone with XLA's convolution, and of both
gradients with XLA and with `diffenc_jax.models.layers.conv_general_dilated` forced onto its
patch path. Part 2, whole training rounds (`train_step.images_per_second`) of --configs with
the patch path off and at its default threshold (`layers.PATCH_GRAD_MIN_POSITIONS`). A layer
alone can favour XLA while the round favours the patches: part 2 is what the default rests on.

    python benchmarks/conv.py [--repeats 7] [--configs mnist_diffae,diffae64]
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffenc_jax.models import layers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import images_per_second  # pylint: disable=wrong-import-position

# (batch, height = width, in channels, out channels)
SHAPES = [(16, 32, 64, 64), (16, 16, 128, 128), (16, 8, 256, 256), (128, 28, 32, 32),
          (128, 14, 64, 64)]


def median_ms(fn, *args, repeats):
  fn = jax.jit(fn)
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--configs", default="mnist_diffae,diffae64",
                      help="configs of benchmarks/train_step.py for part 2 ('' skips it)")
  args = parser.parse_args()
  print(f"devices: {jax.devices()}")
  xla = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))
  ours = lambda x, w: layers.conv_general_dilated(x, w, (1, 1), "SAME",
                                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))
  loss = lambda conv: lambda x, w: jnp.sum(jnp.square(conv(x, w)))
  print(f"{'shape (B, H, Cin, Cout)':24s} {'fwd':>8s} {'dx xla':>8s} {'dw xla':>8s} "
        f"{'both xla':>9s} {'both ours':>9s}  (ms)")
  layers.PATCH_GRAD_MIN_POSITIONS, default = 0, layers.PATCH_GRAD_MIN_POSITIONS  # force it
  try:
    for b, h, cin, cout in SHAPES:
      x = jax.random.normal(jax.random.key(0), (b, h, h, cin))
      w = 0.05 * jax.random.normal(jax.random.key(1), (3, 3, cin, cout))
      times = [median_ms(xla, x, w, repeats=args.repeats)]
      for argnums, conv in ((0, xla), (1, xla), ((0, 1), xla), ((0, 1), ours)):
        times.append(median_ms(jax.grad(loss(conv), argnums), x, w, repeats=args.repeats))
      print(f"{str((b, h, cin, cout)):24s} " + " ".join(f"{t:8.1f}" for t in times[:3])
            + f" {times[3]:9.1f} {times[4]:9.1f}", flush=True)
  finally:
    layers.PATCH_GRAD_MIN_POSITIONS = default
  if args.configs:
    print(f"\n{'config':16s} {'s/round xla':>12s} {'s/round ours':>13s} {'speed-up':>9s}")
  for name in filter(None, args.configs.split(",")):
    seconds = []
    for threshold in (sys.maxsize, default):  # patch path off, then the default
      layers.PATCH_GRAD_MIN_POSITIONS = threshold
      try:
        seconds.append(images_per_second(name, repeats=5)[1])
      finally:
        layers.PATCH_GRAD_MIN_POSITIONS = default
    print(f"{name:16s} {seconds[0]:12.2f} {seconds[1]:13.2f} {seconds[0] / seconds[1]:8.2f}x",
          flush=True)


if __name__ == "__main__":
  main()
