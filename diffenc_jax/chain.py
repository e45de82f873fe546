"""The E-step's chain on any decoder of `diffenc_jax.decoders`: Langevin / MALA on the tempered
posterior π_β(z|x) ∝ p(z) p_θ(x|z)^(1/β) (diffenc's z^K, the VAE's refined mean), and the
running curvature of a persistent chain.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffenc_jax import posterior, samplers

Array = jax.Array


def validate(lv, section: str = "em.langevin") -> None:
  """Raises ValueError with one line on a bad chain section (em.langevin, em.warm_langevin):
  step rule, proposal, draws per step, step sizes."""

  def require(ok, message):
    if not ok:
      raise ValueError(message)

  require(lv.step_rule in samplers.STEP_RULES,
          f"unknown {section}.step_rule {lv.step_rule!r}; choose one of {samplers.STEP_RULES}")
  require(lv.proposal in posterior.PROPOSALS,
          f"unknown {section}.proposal {lv.proposal!r}; choose one of {posterior.PROPOSALS}")
  require(lv.num_steps >= 1, f"{section}.num_steps must be >= 1, got {lv.num_steps}")
  require(lv.mc_samples >= 1 and not (lv.antithetic and lv.mc_samples % 2),
          f"{section}.mc_samples must be >= 1 (even with antithetic), got {lv.mc_samples}")
  require(lv.log_snr_scale > 0 and lv.gn_levels >= 1 and lv.reference_samples >= 1,
          f"{section}.log_snr_scale, gn_levels and reference_samples must be > 0")
  for name in ("step_size", "snr"):
    require(lv[name] > 0, f"{section}.{name} must be > 0, got {lv[name]}")
  require(lv.max_move >= 0, f"{section}.max_move must be >= 0, got {lv.max_move}")


def posterior_sample(config, decoder, dec_params, x: Array, z0: Array, key: Array,
                     num_steps: int | None = None, beta: float | Array | None = None,
                     langevin=None, z_start: Array | None = None,
                     curvature: Array | None = None) -> tuple[Array, samplers.LangevinInfo]:
  """The E-step's chain on any decoder of `diffenc_jax.decoders` (diffenc's z^K, and the VAE's
  refined mean): em.langevin.num_steps (or `num_steps`) Langevin steps from z⁰ on
  π_β(z|x) ∝ p(z) p_θ(x|z)^(1/β) exp(−½ λ_prox ‖z − z⁰‖²), with config.em.langevin's step
  rule, MALA and preconditioner (or those of `langevin`, e.g. em.warm_langevin); β =
  config.bottleneck.beta unless given. The chain starts at z_start (a persistent chain's last
  state) when given, else at z⁰; the proximal term always pulls to z⁰. curvature (B, d): the
  `diagonal` step rule's preconditioner (≤ 0 where unknown). No gradient reaches θ."""
  em = config.em
  lv = em.langevin if langevin is None else langevin
  beta = config.bottleneck.beta if beta is None else beta
  dec_params = jax.lax.stop_gradient(dec_params)
  k_nll, k_chain, k_pre = jax.random.split(key, 3)
  z_start = z0 if z_start is None else jax.lax.stop_gradient(z_start)
  # the decoder's energy: exact for the gaussian decoder; for the diffusion decoder an ELBO
  # estimate whose (t, ε) draws are fixed for the whole chain (U deterministic along it), or,
  # with langevin.fresh_draws, drawn anew at every step (stochastic-gradient Langevin)
  fresh = lv.get("fresh_draws", False) and decoder.kind == "diffusion"
  nll = None if fresh else decoder.energy_fn(dec_params, x, k_nll, z_start, estimator=lv)

  def log_density(z, k=None):
    energy = (decoder.energy_fn(dec_params, x, k, z_start, estimator=lv)(z) if fresh
              else nll(z))
    log_p = -energy / beta - 0.5 * jnp.sum(z**2, -1)
    if em.prox_weight:
      log_p -= 0.5 * em.prox_weight * jnp.sum((z - z0) ** 2, -1)
    return log_p

  precision_fn = None
  if lv.step_rule == "gauss_newton":
    precision_fn = decoder.precision_fn(dec_params, x, k_pre, beta,
                                        prior_precision=1.0 + em.prox_weight, estimator=lv)
  # XLA:CPU runs convolutions inside a loop body several times slower than at top level
  # (benchmarks/langevin.py): on a CPU, a conv decoder's chain is unrolled
  unroll = True if decoder.convolutional and jax.default_backend() == "cpu" else 1
  return samplers.langevin_posterior(
      log_density, z_start, k_chain, num_steps=num_steps or lv.num_steps, step_size=lv.step_size,
      step_rule=lv.step_rule, max_move=lv.max_move, snr=lv.snr, mala=lv.mala,
      precision_fn=precision_fn, refresh_precision=lv.refresh_precision, unroll=unroll,
      fresh_draws=fresh, curvature=curvature)


def running_curvature(old: Array, new: Array, decay: float) -> Array:
  """A persistent chain's `diagonal` curvature after a visit: the running mean
  decay · old + (1 − decay) · new of its (∇log π)² (new: the visit's `info.grad_sq`), started at
  new where old ≤ 0 (the chain's first visit)."""
  return jnp.where(old > 0, decay * old + (1 - decay) * new, new)
