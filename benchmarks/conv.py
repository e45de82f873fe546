"""Convolutions on this backend: XLA's own vs im2col patches @ kernel (`layers._conv_im2col`).

Part 1, one layer: for each (batch, size, channels, stride) of a 3×3 conv in our U-Nets and
encoders, milliseconds (median of --repeats after warm-up) of the forward pass and of both
gradients (input and kernel), by `lax.conv_general_dilated` and by im2col. Part 2, whole
training rounds (`train_step.images_per_second`) of --configs with the im2col path off and at
its default threshold (`layers.IM2COL_MAX_POSITIONS` output positions). Part 2 is what the
default rests on.

With --torch (PyTorch installed, e.g. `pip install -e '.[reference]'`), part 1 adds the same
layer's forward + backward in PyTorch on this CPU (NCHW, the layout the reference DiffAE
trains in, and channels_last), timed in the same process, and ours / torch: the per-layer
figure behind benchmarks/vs_reference.py's whole-step ratio.

    python benchmarks/conv.py [--repeats 7] [--configs diffae64,mnist_diffae] [--torch]
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

# (batch, height = width, in channels, out channels, stride)
SHAPES = [(16, 2, 512, 512, 1), (16, 4, 512, 512, 1), (16, 4, 512, 512, 2), (16, 8, 256, 256, 1),
          (16, 8, 256, 256, 2), (16, 16, 128, 128, 1), (16, 32, 64, 64, 1),
          (128, 28, 32, 32, 1), (128, 14, 64, 64, 1), (128, 14, 32, 64, 2)]
_NHWC = ("NHWC", "HWIO", "NHWC")


def median_ms(fn, *args, repeats):
  fn = jax.jit(fn)
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def torch_ms(b, h, cin, cout, stride, repeats, channels_last):
  """Milliseconds (median) of PyTorch's forward + backward of sum(sin(conv(x))), both
  gradients, for the layer (b, h, cin, cout, stride): the computation our 'grads' column times."""
  import torch  # pylint: disable=import-outside-toplevel
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  conv = torch.nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
  conv = conv.to(memory_format=fmt)
  x = torch.randn(b, cin, h, h).to(memory_format=fmt).requires_grad_()

  def once():
    conv.zero_grad(set_to_none=True)
    x.grad = None
    torch.sin(conv(x)).sum().backward()

  once()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    once()
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--configs", default="diffae64,mnist_diffae",
                      help="configs of benchmarks/train_step.py for part 2 ('' skips it)")
  parser.add_argument("--torch", action="store_true",
                      help="add PyTorch's forward + backward of each layer (needs torch)")
  args = parser.parse_args(argv)
  if args.torch:
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError:
      print("--torch needs PyTorch: pip install -e '.[reference]'")
      sys.exit(2)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
  print(f"devices: {jax.devices()}")
  print(f"{'(B, H, Cin, Cout, stride)':26s} {'fwd xla':>8s} {'fwd im2col':>10s} "
        f"{'grads xla':>9s} {'grads im2col':>12s}"
        + (f" {'torch':>7s} {'torch CL':>8s} {'vs torch':>9s}" if args.torch else "")
        + "  (ms; grads = forward + both gradients; vs torch = torch's NCHW ms / ours)")
  loss = lambda conv: lambda x, w: jnp.sum(jnp.sin(conv(x, w)))
  for b, h, cin, cout, s in SHAPES:
    pads = jax.lax.padtype_to_pads((h, h), (3, 3), (s, s), "SAME")
    xla = lambda x, w, s=s: jax.lax.conv_general_dilated(x, w, (s, s), "SAME",
                                                         dimension_numbers=_NHWC)
    im2col = lambda x, w, s=s, pads=pads: layers._conv_im2col(x, w, (s, s), pads)  # pylint: disable=protected-access
    x = jax.random.normal(jax.random.key(0), (b, h, h, cin))
    w = 0.05 * jax.random.normal(jax.random.key(1), (3, 3, cin, cout))
    times = [median_ms(f, x, w, repeats=args.repeats) for f in (xla, im2col)]
    times += [median_ms(jax.grad(loss(f), (0, 1)), x, w, repeats=args.repeats)
              for f in (xla, im2col)]
    line = (f"{str((b, h, cin, cout, s)):26s} {times[0]:8.1f} {times[1]:10.1f} {times[2]:9.1f} "
            f"{times[3]:12.1f}")
    if args.torch:
      ref = [torch_ms(b, h, cin, cout, s, args.repeats, cl) for cl in (False, True)]
      # ours: the path our layers take (layers.Conv: im2col at <= IM2COL_MAX_POSITIONS outputs)
      ours = times[3] if (h // s) ** 2 <= layers.IM2COL_MAX_POSITIONS else times[2]
      line += f" {ref[0]:7.1f} {ref[1]:8.1f} {ref[0] / ours:8.2f}x"
    print(line, flush=True)
  if args.configs:
    print(f"\n{'config':16s} {'s/round xla':>12s} {'s/round ours':>13s} {'speed-up':>9s}")
  default = layers.IM2COL_MAX_POSITIONS
  for name in filter(None, args.configs.split(",")):
    seconds = []
    for threshold in (-1, default):  # im2col off, then the default
      layers.IM2COL_MAX_POSITIONS = threshold
      try:
        seconds.append(images_per_second(name, repeats=5)[1])
      finally:
        layers.IM2COL_MAX_POSITIONS = default
    print(f"{name:16s} {seconds[0]:12.2f} {seconds[1]:13.2f} {seconds[0] / seconds[1]:8.2f}x",
          flush=True)


if __name__ == "__main__":
  main()
