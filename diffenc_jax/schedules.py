"""Variance-preserving noise schedules in continuous time t ∈ [0, 1].

A schedule is described by its log-SNR λ(t), decreasing in t. Everything else follows:

    α_t² = sigmoid(λ_t),   σ_t² = sigmoid(−λ_t),   α_t² + σ_t² = 1.

All functions accept scalars or arrays of any shape and are jittable. The schedule objects are
frozen dataclasses, hashable, so they can be passed as static arguments to `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Base class: subclasses define `log_snr(t)` and `dlog_snr_dt(t)`."""

  def log_snr(self, t):
    raise NotImplementedError

  def dlog_snr_dt(self, t):
    raise NotImplementedError

  def alpha_sigma(self, t):
    """Returns (α_t, σ_t), each the shape of t."""
    lam = self.log_snr(t)
    return jnp.sqrt(jax.nn.sigmoid(lam)), jnp.sqrt(jax.nn.sigmoid(-lam))

  def alpha(self, t):
    return self.alpha_sigma(t)[0]

  def sigma(self, t):
    return self.alpha_sigma(t)[1]

  def t_of_log_snr(self, lam):
    """The inverse of log_snr: the time t at which λ_t = lam."""
    raise NotImplementedError

  def beta(self, t):
    """β(t) = −d log α_t² / dt = −λ'(t) σ_t², the VP-SDE drift rate."""
    return -self.dlog_snr_dt(t) * jax.nn.sigmoid(-self.log_snr(t))


@dataclasses.dataclass(frozen=True)
class CosineSchedule(Schedule):
  """Cosine schedule (Nichol & Dhariwal), as a log-SNR: λ(t) = −2 log tan(a t + b).

  `a, b` are chosen so that λ(0) = logsnr_max and λ(1) = logsnr_min, which keeps the
  endpoints finite (the plain cosine schedule has λ(0) = +∞, λ(1) = −∞).
  """

  logsnr_min: float = -15.0
  logsnr_max: float = 15.0

  def _ab(self):
    b = math.atan(math.exp(-0.5 * self.logsnr_max))
    a = math.atan(math.exp(-0.5 * self.logsnr_min)) - b
    return a, b

  def log_snr(self, t):
    a, b = self._ab()
    return -2.0 * jnp.log(jnp.tan(a * jnp.asarray(t, jnp.float32) + b))

  def dlog_snr_dt(self, t):
    a, b = self._ab()
    u = a * jnp.asarray(t, jnp.float32) + b
    # d/dt [−2 log tan u] = −2 a / (sin u cos u) = −4 a / sin 2u
    return -4.0 * a / jnp.sin(2.0 * u)

  def t_of_log_snr(self, lam):
    a, b = self._ab()
    return (jnp.arctan(jnp.exp(-0.5 * jnp.asarray(lam, jnp.float32))) - b) / a


@dataclasses.dataclass(frozen=True)
class LinearLogSNRSchedule(Schedule):
  """Log-SNR linear in t: λ(t) = logsnr_max + (logsnr_min − logsnr_max) t."""

  logsnr_min: float = -10.0
  logsnr_max: float = 10.0

  def log_snr(self, t):
    t = jnp.asarray(t, jnp.float32)
    return self.logsnr_max + (self.logsnr_min - self.logsnr_max) * t

  def dlog_snr_dt(self, t):
    return jnp.full(jnp.shape(t), self.logsnr_min - self.logsnr_max, jnp.float32)

  def t_of_log_snr(self, lam):
    return (jnp.asarray(lam, jnp.float32) - self.logsnr_max) / (self.logsnr_min - self.logsnr_max)


SCHEDULES = {"cosine": CosineSchedule, "linear_logsnr": LinearLogSNRSchedule}


def get_schedule(name: str, **kwargs) -> Schedule:
  """Builds a schedule by name ('cosine' or 'linear_logsnr')."""
  if name not in SCHEDULES:
    raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")
  return SCHEDULES[name](**kwargs)


# --- β over training: the E-step's posterior temperature and the VAE's KL weight ------------
BETA_SCHEDULES = ("constant", "anneal")


def beta_at(bottleneck, step):
  """β at training round `step` (a traced or Python integer) from config.bottleneck:

    constant  beta at every round (a Python float: the traced program is unchanged);
    anneal    log-linear from beta_start at round 0 to beta at round beta_anneal_steps, then
              beta: β_s = β_start (β / β_start)^min(s / beta_anneal_steps, 1).
  Starting a large β from a small one lets the decoder learn to use z before the prior's pull
  (KL weight, or temperature of the E-step's posterior) dominates it.
  """
  validate_beta(bottleneck)
  if bottleneck.beta_schedule == "constant":
    return bottleneck.beta
  frac = jnp.minimum(jnp.asarray(step, jnp.float32) / bottleneck.beta_anneal_steps, 1.0)
  log_start = math.log(bottleneck.beta_start)
  return jnp.exp(log_start + (math.log(bottleneck.beta) - log_start) * frac)


def validate_beta(bottleneck) -> None:
  """Raises ValueError with one line on a bad config.bottleneck."""
  b = bottleneck
  if not b.beta > 0:
    raise ValueError(f"bottleneck.beta must be > 0, got {b.beta}")
  if b.beta_schedule not in BETA_SCHEDULES:
    raise ValueError(f"unknown bottleneck.beta_schedule {b.beta_schedule!r}; choose one of "
                     f"{BETA_SCHEDULES}")
  if b.beta_schedule == "anneal" and not (b.beta_start > 0 and b.beta_anneal_steps >= 1):
    raise ValueError("bottleneck.beta_schedule='anneal' needs bottleneck.beta_start > 0 and "
                     "bottleneck.beta_anneal_steps >= 1")
