"""Langevin overhead: time of K jitted sampler steps ÷ (K × time of one jitted ∇U).

A ratio of 1 means the sampler adds nothing beyond the gradients it must evaluate. The target
U is the E-step's: U(z) = ‖x − μ_θ(z)‖²/(2σ²) + ½‖z‖² with a gaussian decoder at MNIST size
(28×28×1, d = 16), batch 128, randomly initialised.

    python benchmarks/langevin.py [--arch conv|mlp|both] [--repeats 20] [--conv-ks 10]

The conv decoder runs only K = 10 by default (`--conv-ks 10 100` for both): inside a scan its
convolutions are slow on XLA:CPU, so K = 100 takes minutes there.
"""

import argparse
import time

import jax
import jax.numpy as jnp

from diffenc_jax import losses, models, samplers


def median_time(fn, *args, repeats):
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return sorted(times)[len(times) // 2]


def bench(arch: str, repeats: int, ks=(10, 100), batch: int = 128, latent_dim: int = 16,
          sigma: float = 0.1):
  decoder = models.MeanDecoder((28, 28, 1), arch=arch, mlp_hidden=(512, 512))
  kp, kx, kz = jax.random.split(jax.random.key(0), 3)
  params = decoder.init(kp, jnp.zeros((1, latent_dim)))
  x = jax.random.uniform(kx, (batch, 28, 28, 1), minval=-1, maxval=1)
  z0 = jax.random.normal(kz, (batch, latent_dim))

  def log_density(z):
    return -losses.gaussian_nll(x, decoder.apply(params, z), sigma) - 0.5 * jnp.sum(z**2, -1)

  grad = jax.jit(jax.grad(lambda z: log_density(z).sum()))
  t_grad = median_time(grad, z0, repeats=repeats)
  print(f"[{arch} decoder] one jitted ∇U: {t_grad * 1e3:.2f} ms (batch {batch})")
  precision_fn = samplers.gauss_newton_precision(lambda z: decoder.apply(params, z), sigma)
  for rule, kwargs in (("fixed", {}),
                       ("gauss_newton", {"precision_fn": precision_fn,
                                         "refresh_precision": False})):
    for k in ks:
      for unroll in ((1, True) if arch == "conv" and k == 10 else (1,)):
        run = jax.jit(lambda z, key: samplers.langevin_posterior(
            log_density, z, key, num_steps=k, step_size=1e-3, step_rule=rule, unroll=unroll,
            **kwargs)[0])
        t_run = median_time(run, z0, jax.random.key(1), repeats=max(3, repeats // (k // 10)))
        print(f"[{arch} decoder] {rule:>12} K={k:>3} unroll={unroll!s:>4}: "
              f"{t_run * 1e3:8.1f} ms, ratio = {t_run / (k * t_grad):.3f}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--arch", default="both", choices=("conv", "mlp", "both"))
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--conv-ks", type=int, nargs="+", default=[10])
  args = parser.parse_args()
  print(f"devices: {jax.devices()}")
  for arch in (("conv", "mlp") if args.arch == "both" else (args.arch,)):
    bench(arch, args.repeats, ks=tuple(args.conv_ks) if arch == "conv" else (10, 100))


if __name__ == "__main__":
  main()
