"""Where the time of the transformer denoiser's training step goes, against the FLOPs each part
needs and this CPU's float32 peak.

    python benchmarks/dit_breakdown.py [--batch 128] [--repeats 7] [--dtype float32]
        [--flops-per-cycle N] [--tiny]

The step is the one benchmarks/vs_dit.py times (models/dit.py's DiTDenoiser at
configs/mnist_diffae.py's sizes: 28×28×1 in 7×7 patches, width 128, 4 blocks of 4 heads; the
mean squared error to a fixed target, its gradient, optax.adamw; jitted, state donated). Each part
is the module's own code (`dit.attention`, `dit.QKV`, its Dense layers, `dit._layer_norm` and
`dit._modulate`) applied to the block's parameters at the step's shapes, differentiated in its
inputs and parameters (forward + backward, as in the step), jitted alone and timed; the per-block
parts are multiplied by the depth. Timed calls are interleaved (every part once, then again, …),
medians of --repeats. FLOPs are XLA's cost analysis of each compiled part.

The peak: usable cores × float32 FLOPs per cycle per core × clock. FLOPs per cycle: 2 (a fused
multiply-add) × 2 (FMA pipes) × the lanes of the FMA datapath, 8 for 256 bits (AVX2, and AMD
Zen 4's AVX-512, which it executes as two 256-bit halves), 16 on a CPU with full-width AVX-512
FMA units; give --flops-per-cycle to override. The clock is /proc/cpuinfo's "cpu MHz" (the
nominal clock a VM reports; turbo may run faster).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from diffenc_jax.models import dit  # noqa: E402
from diffenc_jax.models.layers import sinusoidal_embedding  # noqa: E402

IMAGE, PATCH, LATENT = (28, 28, 1), 7, 16


def cpu_peak(flops_per_cycle: float | None) -> tuple[float, str]:
  """(float32 FLOP/s, how it was found) of the usable cores, from /proc/cpuinfo."""
  info = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
  mhz = [float(line.split(":")[1]) for line in info.splitlines() if line.startswith("cpu MHz")]
  flags = next((line.split(":")[1].split() for line in info.splitlines()
                if line.startswith("flags")), [])
  vendor = next((line.split(":")[1].strip() for line in info.splitlines()
                 if line.startswith("vendor_id")), "?")
  cores = len(os.sched_getaffinity(0))
  clock = (max(mhz) if mhz else 0.0) * 1e6
  if flops_per_cycle is None:
    full_width = "avx512f" in flags and vendor == "GenuineIntel"
    flops_per_cycle = 2 * 2 * (16 if full_width else 8 if "fma" in flags else 4)
  return (cores * flops_per_cycle * clock,
          f"{cores} cores × {flops_per_cycle:g} FLOP/cycle × {clock / 1e9:.2f} GHz ({vendor}, "
          f"{'avx512f' if 'avx512f' in flags else 'no avx512f'}, "
          f"{'avx512_bf16' if 'avx512_bf16' in flags else 'no avx512_bf16'})")


def forward_backward(fn, *args):
  """A jitted fn computing fn's value and its gradient in every argument (a fixed random
  cotangent), as the step's backward pass does."""
  out = jax.eval_shape(fn, *args)
  cot = jax.tree.map(lambda s: jax.random.normal(jax.random.key(7), s.shape, s.dtype), out)

  def both(*a):
    value, vjp = jax.vjp(fn, *a)
    return value, vjp(cot)
  return jax.jit(both)


def parts(batch: int, width: int, depth: int, heads: int, dtype: str):
  """[(name, repeat count, jitted fn, args)] of the step's parts and the whole step."""
  net = dit.DiTDenoiser(image_shape=IMAGE, patch_size=PATCH, width=width, depth=depth,
                        num_heads=heads, latent_dim=LATENT, dtype=dtype)
  keys = jax.random.split(jax.random.key(1), 8)
  x = jax.random.normal(keys[0], (batch, *IMAGE))
  t = jax.random.uniform(keys[1], (batch,))
  z = jax.random.normal(keys[2], (batch, LATENT))
  target = jax.random.normal(keys[3], (batch, *IMAGE))
  params = net.init(jax.random.key(0), x[:1], t[:1], z[:1])["params"]
  # move the zero-initialised weights so that no part multiplies by exact zeros
  params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(keys[4], p.shape), params)
  optimizer = optax.adamw(1e-4)
  opt_state = optimizer.init(params)

  def loss_fn(p):
    return jnp.mean((net.apply({"params": p}, x, t, z) - target) ** 2)

  def step(carry):
    p, s = carry
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, s = optimizer.update(grads, s, p)
    return (optax.apply_updates(p, updates), s), loss

  grads = jax.grad(loss_fn)(params)
  tokens_n = (IMAGE[0] // PATCH) * (IMAGE[1] // PATCH)
  tokens = jax.random.normal(keys[5], (batch * tokens_n, width))
  mods = 0.1 * jax.random.normal(keys[6], (batch, 6 * width))
  blk = params["DiTBlock_0"]
  q, k, v = dit.QKV(heads, batch, dtype).apply({"params": blk["qkv"]}, tokens)
  dense = lambda p, h, n: nn.Dense(n, dtype=dtype).apply({"params": p}, h)  # noqa: E731

  def projections(p, h, a):
    qkv = dit.QKV(heads, batch, dtype).apply({"params": p["qkv"]}, h)
    return qkv, dense(p["proj"], a, width)

  def mlp(p, h):
    return dense(p["mlp_out"], nn.gelu(dense(p["mlp_in"], h, int(4 * width))), width)

  def norms(x_, m, h1, h2):  # both LayerNorm + modulation, both gated residual adds
    b1, s1, g1, b2, s2, g2 = jnp.split(m, 6, axis=-1)
    a = dit._modulate(dit._layer_norm(x_), b1, s1)  # pylint: disable=protected-access
    x_ = dit._gate(x_, g1, h1)  # pylint: disable=protected-access
    c = dit._modulate(dit._layer_norm(x_), b2, s2)  # pylint: disable=protected-access
    return a, c, dit._gate(x_, g2, h2)  # pylint: disable=protected-access

  def ends(p, x_, tok):  # patchify, patch projection, positions; final LN, output, unpatchify
    h = dense(p["patch_proj"], dit.patchify(x_, PATCH).reshape(batch * tokens_n, -1), width)
    h = h.reshape(batch, tokens_n, width) + dit.sincos_positions(
        IMAGE[0] // PATCH, IMAGE[1] // PATCH, width)[None]
    out = dense(p["out"], dit._layer_norm(tok), PATCH * PATCH * IMAGE[2])  # pylint: disable=protected-access
    return h, dit.unpatchify(out.reshape(batch, tokens_n, -1), IMAGE, PATCH)

  sub = {k_: params[k_] for k_ in ("TimeEmbedding_0", "z_proj", "Dense_0", "adaln")}

  def conditioning(p, t_, z_):
    c = nn.Dense(width).apply({"params": p["TimeEmbedding_0"]["Dense_1"]}, nn.silu(
        nn.Dense(width).apply({"params": p["TimeEmbedding_0"]["Dense_0"]},
                              sinusoidal_embedding(t_, width))))
    c = c + nn.Dense(width).apply({"params": p["Dense_0"]}, nn.silu(
        nn.Dense(width).apply({"params": p["z_proj"]}, z_)))
    return nn.Dense((6 * depth + 2) * width).apply({"params": p["adaln"]}, nn.silu(c))

  def update(g, s, p):
    u, s = optimizer.update(g, s, p)
    return optax.apply_updates(p, u), s

  a_in = jax.random.normal(keys[7], (batch * tokens_n, width))
  fb = lambda name, count, f, *a: (name, count, forward_backward(f, *a), a)  # noqa: E731
  return [
      ("whole step (loss, gradient, AdamW)", 1, jax.jit(step), ((params, opt_state),)),
      ("· network forward + backward", 1, jax.jit(jax.value_and_grad(loss_fn)), (params,)),
      ("· network forward", 1, jax.jit(loss_fn), (params,)),
      fb("attention core (scores, softmax, sum)", depth, dit.attention, q, k, v),
      fb("QKV + output projections", depth, projections,
         {"qkv": blk["qkv"], "proj": blk["proj"]}, tokens, a_in),
      fb("MLP (Dense, GELU, Dense)", depth, mlp,
         {"mlp_in": blk["mlp_in"], "mlp_out": blk["mlp_out"]}, tokens),
      fb("LayerNorm + adaLN modulation + gates", depth, norms, tokens, mods, tokens, tokens),
      fb("conditioning (t, z MLPs; adaLN Dense)", 1, conditioning, sub, t, z),
      fb("patchify, in/out projections", 1, ends,
         {"patch_proj": params["patch_proj"], "out": params["out"]}, x, tokens),
      ("optimizer update (AdamW)", 1, jax.jit(update), (grads, opt_state, params)),
  ]


def main(argv: list[str] | None = None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--dtype", default="float32", choices=dit.DTYPES)
  parser.add_argument("--flops-per-cycle", type=float, default=None)
  parser.add_argument("--tiny", action="store_true", help="width 16, 1 block, batch 4")
  parser.add_argument("--cpu-time", action="store_true",
                      help="time by the process's CPU time instead of wall-clock time (steadier "
                           "on a loaded host when pinned to one core: taskset -c N)")
  args = parser.parse_args(argv)
  width, depth, heads, batch = (16, 1, 2, 4) if args.tiny else (128, 4, 4, args.batch)
  peak, how = cpu_peak(args.flops_per_cycle)
  rows = []
  for name, count, fn, fargs in parts(batch, width, depth, heads, args.dtype):
    cost = fn.lower(*fargs).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    jax.block_until_ready(fn(*fargs))
    rows.append([name, count, fn, fargs, float(cost.get("flops", 0.0)), []])
  clock = time.process_time if args.cpu_time else time.perf_counter
  for _ in range(args.repeats):
    for row in rows:
      start = clock()
      jax.block_until_ready(row[2](*row[3]))
      row[5].append(clock() - start)
  whole = float(np.median(rows[0][5]))
  print(f"### DiT train step, batch {batch}, width {width}, depth {depth}, {args.dtype} "
        f"matmuls; jax {jax.__version__}")
  print(f"float32 peak {peak / 1e9:.0f} GFLOP/s = {how}\n")
  print("| part | ms | % of step | GFLOP | GFLOP/s | % of peak |")
  print("|---|---|---|---|---|---|")
  summed = 0.0
  for name, count, _, _, flops, times in rows:
    seconds = count * float(np.median(times))
    flops *= count
    if not name.startswith(("whole", "·")):
      summed += seconds
    label = f"{name} ×{count}" if count > 1 else name
    print(f"| {label} | {1e3 * seconds:.2f} | {100 * seconds / whole:.0f} | {flops / 1e9:.4g} | "
          f"{flops / seconds / 1e9:.1f} | {100 * flops / seconds / peak:.0f} |")
  print(f"| sum of parts | {1e3 * summed:.2f} | {100 * summed / whole:.0f} | | | |")
  print(f"\nmedians of {args.repeats} interleaved calls ({'CPU' if args.cpu_time else 'wall'} "
        "time); parts marked · are contained in the whole "
        "step and left out of the sum")


if __name__ == "__main__":
  main()
