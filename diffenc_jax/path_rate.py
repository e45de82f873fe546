"""The rate of a diffusion encoder as the path KL of its own ancestral sampler.

A latent diffusion encoder q(z|x) is defined by its sampler: N ancestral (DDPM) steps from
z_0 ~ N(0, I) at t = 1 down to t = 0,

    z_{k+1} = μ_θ(z_k) + c_k ξ,   μ_θ = α_s x̂_0 + √(σ_s² − c_k²) ε̂,
    x̂_0 = clip((z − σ_t ε̂)/α_t),

the same update as `samplers.latent_ddim` with η = 1; the code is the chain's last *noisy* state
z_N at t = 0 (log-SNR λ_max), not the x̂_0 of its last step. The same sampler run with the
exact ε-predictor of the prior N(0, I), ε̂ = σ_t z (x̂_0 = α_t z, no clip), has means
μ_p = a_k z_k, linear in z_k, the same c_k, and output N(0, v_N I) with
v_{k+1} = a_k² v_k + c_k², v_0 = 1. Along the encoder's own trajectories

    KL(q_path ‖ p_path) = Σ_k E_q ‖μ_θ(z_k) − μ_p(z_k)‖² / (2 c_k²)  ≥  KL(q(z_N|x) ‖ N(0, v_N I)),

and since KL(q ‖ N(0, I)) = KL(q ‖ N(0, v_N I)) + E_q[log N(z_N; 0, v_N I) − log N(z_N; 0, I)],

    R(x) = path KL + E_q[log N(z_N; 0, v_N I) − log N(z_N; 0, I)]  ≥  KL(q(z_N|x) ‖ N(0, I)).

It is an upper bound for any ε̂ (no model mismatch: ε̂ is what generated the samples), equal to
the analytic KL(N(0, v_N I) ‖ N(0, I)) for an encoder equal to the prior, and tight as the steps
shrink for an encoder whose ε̂ is the exact predictor of its code. Each step's term lies in one
band of log-SNR, so `per_step` says where the nats are paid. The grid is uniform in log-SNR by
default: a code resolved at σ_0 pays most of its nats at high log-SNR, where a grid uniform in
t takes a few huge steps (5 such steps overstate a deterministic code's rate many times over).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from diffenc_jax.schedules import Schedule

Array = jax.Array
SPACINGS = ("logsnr", "time")
ESTIMATORS = ("path_kl", "diffusion_kl")


def estimator(config) -> str:
  """config.eval.rate_estimator; a run's config written before the field existed was rated by
  the forward-noised estimate: 'diffusion_kl'."""
  return config.eval.get("rate_estimator", "diffusion_kl")


def ancestral_times(schedule: Schedule, num_steps: int, spacing: str = "logsnr") -> Array:
  """The sampler's grid 1 = t_0 > t_1 > … > t_N = 0, (N + 1,): uniform in log-SNR
  ('logsnr') or in t ('time', the grid of `samplers.latent_ddim`)."""
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  if spacing not in SPACINGS:
    raise ValueError(f"unknown spacing {spacing!r}; choose one of {SPACINGS}")
  u = jnp.linspace(1.0, 0.0, num_steps + 1)
  if spacing == "time":
    return u
  lam_min, lam_max = schedule.log_snr(jnp.ones(())), schedule.log_snr(jnp.zeros(()))
  t = schedule.t_of_log_snr(lam_max + (lam_min - lam_max) * u)
  return t.at[0].set(1.0).at[-1].set(0.0)


def _step_coefficients(schedule: Schedule, t: Array, s: Array):
  """α_t, σ_t, α_s, σ_s, the ancestral noise scale c and √(σ_s² − c²) of the step t → s."""
  alpha_t, sigma_t = schedule.alpha_sigma(t)
  alpha_s, sigma_s = schedule.alpha_sigma(s)
  # c² = σ_s² (1 − α_t² σ_s² / (α_s² σ_t²)) = σ_s² (1 − SNR_t / SNR_s)
  snr_ratio = jnp.exp(schedule.log_snr(t) - schedule.log_snr(s))
  c = sigma_s * jnp.sqrt(jnp.maximum(1.0 - snr_ratio, 0.0))
  keep = jnp.sqrt(jnp.maximum(sigma_s**2 - c**2, 0.0))
  return alpha_t, sigma_t, alpha_s, sigma_s, c, keep


def prior_sampler_variance(schedule: Schedule, num_steps: int, spacing: str = "logsnr") -> Array:
  """v_N: the prior sampler's output is N(0, v_N I) (v_0 = 1, v_{k+1} = a_k² v_k + c_k²)."""
  times = ancestral_times(schedule, num_steps, spacing)

  def step(v, ts):
    alpha_t, sigma_t, alpha_s, _, c, keep = _step_coefficients(schedule, *ts)
    a = alpha_s * alpha_t + keep * sigma_t
    return a**2 * v + c**2, None

  v, _ = jax.lax.scan(step, jnp.ones(()), (times[:-1], times[1:]))
  return v


def discretisation_kl(schedule: Schedule, num_steps: int, dim: int,
                      spacing: str = "logsnr") -> Array:
  """KL(N(0, v_N I) ‖ N(0, I)) in nats for a code of size `dim`: the rate this estimator reports
  for an encoder equal to the prior."""
  v = prior_sampler_variance(schedule, num_steps, spacing)
  return 0.5 * dim * (v - 1.0 - jnp.log(v))


def ancestral_path_rate(
    eps_fn: Callable[[Array, Array], Array],
    key: Array,
    shape: tuple[int, int],
    schedule: Schedule,
    num_steps: int,
    clip: float | None = None,
    spacing: str = "logsnr",
) -> dict[str, Array]:
  """One path per example of the encoder's ancestral sampler, and its rate.

  Args:
    eps_fn: the encoder's (z_t (B, d), t (B,)) -> ε̂ (B, d), conditioned on x.
    key: PRNG key of the path (start and every step's noise).
    shape: (B, d).
    schedule: the latent schedule; its λ_max is the code's noise floor σ_0.
    num_steps, clip, spacing: the sampler (`ancestral_times`; x̂_0 clipped to ±clip).
  Returns a dict of
    code      (B, d), the chain's last noisy state z_N: the variable whose rate this is;
    rate      (B,), path_kl + terminal, nats: a one-path estimate of the upper bound above;
    path_kl   (B,), Σ_k ‖μ_θ − μ_p‖² / (2 c_k²);
    terminal  (B,), log N(z_N; 0, v_N I) − log N(z_N; 0, I);
    per_step  (N, B), each step's term of path_kl (step k runs t_k → t_{k+1}).
  """
  b, d = shape
  times = ancestral_times(schedule, num_steps, spacing)
  key_init, key_steps = jax.random.split(key)
  z = jax.random.normal(key_init, shape)

  def step(carry, inputs):
    z, v = carry
    t, s, k = inputs
    alpha_t, sigma_t, alpha_s, _, c, keep = _step_coefficients(schedule, t, s)
    eps = eps_fn(z, jnp.full((b,), t))
    x0 = (z - sigma_t * eps) / alpha_t
    if clip is not None and clip > 0:
      x0 = jnp.clip(x0, -clip, clip)
      eps = (z - alpha_t * x0) / sigma_t
    # μ_θ − μ_p with the prior's x̂_0 = α_t z and ε̂ = σ_t z, written as differences
    diff = alpha_s * (x0 - alpha_t * z) + keep * (eps - sigma_t * z)
    kl = jnp.sum(jnp.square(diff), -1) / (2.0 * c**2)
    z_next = alpha_s * x0 + keep * eps + c * jax.random.normal(k, shape)
    a = alpha_s * alpha_t + keep * sigma_t
    return (z_next, a**2 * v + c**2), kl

  keys = jax.random.split(key_steps, num_steps)
  (code, v), per_step = jax.lax.scan(step, (z, jnp.ones(())), (times[:-1], times[1:], keys))
  sq = jnp.sum(jnp.square(code), -1)
  terminal = -0.5 * d * jnp.log(v) - 0.5 * sq / v + 0.5 * sq
  path_kl = jnp.sum(per_step, 0)
  return {"code": code, "rate": path_kl + terminal, "path_kl": path_kl, "terminal": terminal,
          "per_step": per_step}


def encoder_path(method, eps_fn: Callable[[Array, Array], Array], x: Array,
                 key: Array) -> dict[str, Array]:
  """`ancestral_path_rate` of a diffusion-encoder method for images x (B, ...), with its ε̂
  conditioned on x (`eps_fn`), its latent schedule and sampler clip, and the grid of
  config.eval (rate_steps, rate_spacing; a run's config written before these fields existed
  gets 1,000 steps uniform in log-SNR)."""
  ev = method.config.eval
  return ancestral_path_rate(eps_fn, key, (x.shape[0], method.latent_dim), method.schedule,
                             ev.get("rate_steps", 1000), clip=method.config.encoder_sampler.clip,
                             spacing=ev.get("rate_spacing", "logsnr"))
