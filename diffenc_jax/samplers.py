"""Samplers: latent/image DDIM and Langevin sampling of an unnormalised posterior.

All step loops are `lax.scan`, so a sampler compiles once whatever its number of steps, and
its memory does not grow with the number of steps. Networks enter as closures bound to their
parameters, as in `losses.py`.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from diffenc_jax.schedules import Schedule

Array = jax.Array

STEP_RULES = ("fixed", "snr", "gauss_newton", "diagonal")


def _bcast(v: Array, x: Array) -> Array:
  return v.reshape(v.shape + (1,) * (x.ndim - 1))


def latent_ddim(
    eps_fn: Callable[[Array, Array], Array],
    key: Array,
    shape: tuple[int, ...],
    schedule: Schedule,
    num_steps: int,
    eta: float = 0.0,
    clip: float | None = None,
    x_init: Array | None = None,
) -> Array:
  """Samples x_0 by DDIM from x_1 ~ N(0, I) (or from a given x_1 = x_init), for latents
  (B, d) or images (B, H, W, C).

  Times run over the uniform grid 1 = t_0 > t_1 > … > t_N = 0. At each step the model's ε̂
  gives x̂_0 = (x_t − σ_t ε̂)/α_t, optionally clipped to ±clip (an untrained network cannot
  blow the sample up), ε̂ is recomputed from the clipped x̂_0, and
      x_s = α_s x̂_0 + √(σ_s² − c²) ε̂ + c ξ,  c = η σ_s √(1 − α_t² σ_s² / (α_s² σ_t²)).
  eta = 0 is deterministic DDIM, eta = 1 the ancestral (DDPM posterior) sampler. The last
  step returns x̂_0 itself.

  Args:
    eps_fn: (x_t (B, ...), t (B,)) -> ε̂ (B, ...).
    key: PRNG key.
    shape: (B, ...), the output shape.
    schedule, num_steps, eta, clip: as above.
    x_init: optional starting point x_1 of `shape` (e.g. from `ddim_invert`); drawn from
      N(0, I) when None.
  Returns:
    x_0, of `shape`.
  """
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  b = shape[0]
  key_init, key_steps = jax.random.split(key)
  x = jax.random.normal(key_init, shape) if x_init is None else x_init
  times = jnp.linspace(1.0, 0.0, num_steps + 1)

  def step(x, inputs):
    t, s, k = inputs
    tb = jnp.full((b,), t)
    alpha_t, sigma_t = schedule.alpha_sigma(t)
    alpha_s, sigma_s = schedule.alpha_sigma(s)
    eps = eps_fn(x, tb)
    x0 = (x - sigma_t * eps) / alpha_t
    if clip is not None and clip > 0:
      x0 = jnp.clip(x0, -clip, clip)
      eps = (x - alpha_t * x0) / sigma_t
    ratio = (alpha_t * sigma_s) / (alpha_s * sigma_t)
    c = eta * sigma_s * jnp.sqrt(jnp.maximum(1.0 - ratio**2, 0.0))
    noise = jax.random.normal(k, shape)
    x_s = alpha_s * x0 + jnp.sqrt(jnp.maximum(sigma_s**2 - c**2, 0.0)) * eps + c * noise
    return x_s, x0

  keys = jax.random.split(key_steps, num_steps)
  _, x0s = jax.lax.scan(step, x, (times[:-1], times[1:], keys))
  return x0s[-1]


def ddim_invert(
    eps_fn: Callable[[Array, Array], Array],
    x0: Array,
    schedule: Schedule,
    num_steps: int,
) -> Array:
  """Deterministic DDIM run forwards: x_0 (B, ...) → x_1, the noise that `latent_ddim` with
  eta = 0, no clip and the same `num_steps` maps back to (about) x_0 (DiffAE's stochastic
  encoding, given the decoder's conditioning bound into eps_fn).

  Over the grid 0 = s_0 < s_1 < … < s_N = 1, each step takes ε̂ at the current point,
  x̂_0 = (x_s − σ_s ε̂)/α_s and x_t = α_t x̂_0 + σ_t ε̂: the DDIM update with the roles of the
  two times exchanged. Exact inverse of DDIM whenever ε̂ is constant along the path (e.g. the
  exact ε of a point mass); otherwise accurate to the discretisation of the ODE.
  """
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  b = x0.shape[0]
  times = jnp.linspace(0.0, 1.0, num_steps + 1)

  def step(x, inputs):
    s, t = inputs
    alpha_s, sigma_s = schedule.alpha_sigma(s)
    alpha_t, sigma_t = schedule.alpha_sigma(t)
    eps = eps_fn(x, jnp.full((b,), s))
    x0_hat = (x - sigma_s * eps) / alpha_s
    return alpha_t * x0_hat + sigma_t * eps, None

  x, _ = jax.lax.scan(step, x0, (times[:-1], times[1:]))
  return x


class LangevinInfo(NamedTuple):
  """Diagnostics of a Langevin run, averaged over steps and examples unless stated."""

  move_norm: Array  # mean ‖z_{k+1} − z_k‖ per step (accepted moves; rejected ones are 0)
  accept_rate: Array  # mean MALA acceptance probability (1 without MALA)
  step_size: Array  # mean step size used (varies per example under the snr rule)
  log_density: Array  # (B,): final unnormalised log density
  displacement_sq: Array  # mean ‖z_K − z_0‖²
  grad_sq: Array | None = None  # (B, d): per example, the mean over steps of (∇log π)²


def gauss_newton_precision(
    mean_fn: Callable[[Array], Array],
    sigma: float,
    beta: float = 1.0,
    prior_precision: float = 1.0,
) -> Callable[[Array], Array]:
  """Builds z (B, d) -> H (B, d, d) = JᵀJ/(σ² β) + prior_precision · I per example.

  J = ∂μ(z)/∂z is the Jacobian of a gaussian decoder's mean for one example (by `jacfwd`;
  d forward-mode passes, cheap for a small latent). H is the Gauss-Newton approximation of the
  Hessian of U(z) = ‖x − μ(z)‖²/(2σ²β) + ½ prior_precision ‖z‖², exact for a linear decoder.
  `mean_fn` must treat examples independently (no batch statistics).
  """

  def one(z):
    jac = jax.jacfwd(lambda zi: mean_fn(zi[None]).reshape(-1))(z)  # (D, d)
    return jac.T @ jac / (sigma**2 * beta) + prior_precision * jnp.eye(z.shape[-1])

  return jax.vmap(one)


def spd_factor(h: Array, floor: float = 1e-6) -> tuple[Array, Array]:
  """(L, L⁻¹) of symmetric positive-definite matrices h (..., d, d), h = L Lᵀ, L lower.

  Cholesky-Crout and forward substitution written in jax.numpy (two `fori_loop`s of d
  batched O(d²) steps), not LAPACK: on a CPU with several devices jaxlib's batched `eigh`
  kernel fans each batch out over the XLA thread pool from inside it, and with as many devices
  as cores every pool thread can wait on work queued behind it: the run deadlocks
  (docs/benchmarks.md, "Langevin steps"). Pivots are floored at `floor` ×
  the largest diagonal entry: a guard for H = JᵀJ/(σ²β) + I growing ill-conditioned in
  float32 as the decoder sharpens (the floored L Lᵀ then differs from h only there).
  """
  d = h.shape[-1]
  eye = jnp.eye(d, dtype=h.dtype)
  lowest = floor * jnp.max(jnp.diagonal(h, axis1=-2, axis2=-1), -1)

  def column(j, chol):
    e = eye[j]
    row = jnp.einsum("...jk,j->...k", chol, e)  # row j: its k < j part
    pivot = jnp.einsum("...ij,i,j->...", h, e, e) - jnp.sum(jnp.square(row), -1)
    diag = jnp.sqrt(jnp.maximum(pivot, lowest))
    below = (jnp.einsum("...ij,j->...i", h, e) - jnp.einsum("...ik,...k->...i", chol, row))
    below = below / diag[..., None] * (jnp.arange(d) > j)
    return chol + (below + diag[..., None] * e)[..., :, None] * e

  chol = jax.lax.fori_loop(0, d, column, jnp.zeros_like(h))

  def row(i, inv):
    e = eye[i]
    l_row = jnp.einsum("...ik,i->...k", chol, e)  # row i of L: its k < i part meets rows < i
    l_ii = jnp.einsum("...k,k->...", l_row, e)
    new = (e - jnp.einsum("...k,...kj->...j", l_row * (1.0 - e), inv)) / l_ii[..., None]
    return inv + e[:, None] * new[..., None, :]

  inv = jax.lax.fori_loop(0, d, row, jnp.zeros_like(h))
  return chol, inv


def langevin_posterior(
    log_density_fn: Callable[[Array], Array],
    z_init: Array,
    key: Array,
    *,
    num_steps: int,
    step_size: float,
    step_rule: str = "fixed",
    max_move: float = 0.0,
    snr: float = 0.16,
    mala: bool = False,
    precision_fn: Callable[[Array], Array] | None = None,
    refresh_precision: bool = True,
    unroll: int | bool = 1,
    fresh_draws: bool = False,
    curvature: Array | None = None,
) -> tuple[Array, LangevinInfo]:
  """Langevin dynamics on an unnormalised per-example log density, as one `lax.scan`.

  Targets π(z) ∝ exp(log_density_fn(z)) independently for each example, U = −log π:
    - 'fixed': z ← z + η ∇log π + √(2η) ξ; if max_move > 0 each example's move is rescaled
      to norm ≤ max_move (a safeguard early in training; it biases the chain);
    - 'snr': score_sde's rule, η = 2 (r ‖ξ‖ / ‖∇log π‖)² per example, r = `snr`;
    - 'diagonal': preconditioned by a diagonal curvature c (d,), fixed along the chain:
      z ← z + η c⁻¹ ∇log π + √(2η) c^{−½} ξ, with c the batch's mean per dimension of
      `curvature` (B, d) where it is > 0 and of (∇log π)² at the start elsewhere, floored at
      1. E_π[(∇log π)²] is the diagonal of the posterior's precision (Fisher's identity), so a
      running mean of `info.grad_sq` over a persistent chain's runs is a curvature estimate
      (plus the gradient estimate's noise, which only shortens steps). It is pooled over the
      batch because one example's estimate from a few noisy gradients can be near 0 in some
      dimension, and a step scaled by its inverse throws that chain far;
    - 'gauss_newton': preconditioned, z ← z + η H⁻¹ ∇log π + √(2η) H^{−½} ξ with
      H = precision_fn(z) (B, d, d), e.g. from `gauss_newton_precision`. With a constant exact
      Hessian and η = 1 the drift jumps straight to the mode. refresh_precision=False
      computes H once at z_init and keeps it for the whole chain: a constant preconditioner,
      still a valid (MALA: exact) sampler, at the cost of one H instead of one per step.
  mala=True adds the Metropolis-Hastings correction ('fixed' without max_move, or
  'gauss_newton', whose position-dependent proposal density is accounted for), making π
  exactly invariant.

  No gradient flows through the chain: z_init is wrapped in `stop_gradient`.

  fresh_draws=True: log_density_fn is a stochastic estimate, called as log_density_fn(z, key)
  with a new key at every step, so each step follows a fresh unbiased gradient estimate
  (stochastic-gradient Langevin: its estimator noise averages out along the chain instead of
  being fitted). MALA needs an exact, fixed density and is refused with it.

  `unroll` is passed to `lax.scan`. On XLA:CPU convolutions inside a loop body run several
  times slower than at top level (measured in benchmarks/langevin.py), so a conv decoder on a
  CPU wants unroll=True for small K; on accelerators leave it at 1.

  Args:
    log_density_fn: z (B, d) -> (B,), log π up to a per-example constant; examples must be
      independent (the gradient of the sum is then the per-example gradient). With
      fresh_draws: (z, key) -> (B,), an estimate whose draws come from key.
    z_init: (B, d) starting points.
    key: PRNG key.
  Returns:
    (z_K (B, d), LangevinInfo).
  """
  if step_rule not in STEP_RULES:
    raise ValueError(f"unknown step rule {step_rule!r}; choose one of {STEP_RULES}")
  if step_rule == "diagonal" and mala:
    raise ValueError("step_rule='diagonal' runs without mala")
  if step_rule == "gauss_newton" and precision_fn is None:
    raise ValueError("step_rule='gauss_newton' needs precision_fn")
  if mala and fresh_draws:
    raise ValueError("mala needs a fixed log density: it cannot run with fresh_draws")
  if mala and (step_rule == "snr" or max_move > 0):
    raise ValueError("mala needs a proposal with a density: step_rule 'fixed' without "
                     "max_move, or 'gauss_newton'")
  z_init = jax.lax.stop_gradient(z_init)
  b, d = z_init.shape
  precond = step_rule == "gauss_newton"

  k_draws = jax.random.fold_in(key, 2**31 - 1)  # the steps use fold_in(key, i), i < K

  def log_density(z, i):
    if fresh_draws:
      return log_density_fn(z, jax.random.fold_in(k_draws, i))
    return log_density_fn(z)

  def logp_and_grad(z, i):
    def total(z):
      lp = log_density(z, i)
      return lp.sum(), lp
    (_, lp), g = jax.value_and_grad(total, has_aux=True)(z)
    return lp, g

  def factor(z):
    """(H, A, ½ log|H|) with Aᵀ A = H⁻¹: H = L Lᵀ by `spd_factor`, A = L⁻¹. Every later use
    is a batched mat-vec."""
    h = precision_fn(z)
    h = 0.5 * (h + jnp.swapaxes(h, -1, -2))
    chol, inv = spd_factor(h)
    return h, inv, jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), -1)

  def evaluate(z, pre, i=0):
    """Everything the proposal needs at z: log π, its gradient, and the preconditioner
    (recomputed when refreshing, else the constant one passed in); i: the step (fresh draws)."""
    lp, g = logp_and_grad(z, i)
    if precond and (pre is None or refresh_precision):
      pre = factor(z)
    return lp, g, pre

  def drift(g, pre):
    """H⁻¹ g = Aᵀ A g per example (g itself when not preconditioned)."""
    if pre is None:
      return g
    a = pre[1]
    return jnp.einsum("bji,bj->bi", a, jnp.einsum("bij,bj->bi", a, g))

  def log_proposal(z_to, z_from, g_from, pre_from, eta):
    """log N(z_to; z_from + η H⁻¹ g, 2η H⁻¹) up to a constant shared by both directions."""
    diff = z_to - z_from - eta[:, None] * drift(g_from, pre_from)
    if pre_from is None:
      return -jnp.sum(jnp.square(diff), -1) / (4.0 * eta)
    h, _, half_logdet = pre_from
    return -jnp.einsum("bi,bij,bj->b", diff, h, diff) / (4.0 * eta) + half_logdet

  def step(carry, _):
    (z, lp, g, pre), sums, i, (diag, grad_sq) = carry
    if not mala:  # the gradient at the current point; MALA carries it from the last step
      lp, g, pre = evaluate(z, pre, i)
    grad_sq = grad_sq + jnp.square(g)
    if step_rule == "diagonal":  # fixed at the first step, pooled over the batch
      first = jnp.mean(jnp.where(known, curv, jnp.square(g)), 0, keepdims=True)
      diag = jnp.where(i == 0, jnp.broadcast_to(jnp.maximum(first, 1.0), diag.shape), diag)
    k_noise, k_accept = jax.random.split(jax.random.fold_in(key, i))
    xi = jax.random.normal(k_noise, z.shape, z.dtype)
    if step_rule == "snr":
      ratio = jnp.linalg.norm(xi, axis=-1) / (jnp.linalg.norm(g, axis=-1) + 1e-12)
      eta = 2.0 * jnp.square(snr * ratio)
    else:
      eta = jnp.full((b,), step_size, z.dtype)
    # H^{−½} ξ as Aᵀ ξ: its covariance is Aᵀ A = H⁻¹
    noise = xi if pre is None else jnp.einsum("bji,bj->bi", pre[1], xi)
    if step_rule == "diagonal":
      move = eta[:, None] * g / diag + jnp.sqrt(2.0 * eta)[:, None] * xi / jnp.sqrt(diag)
    else:
      move = eta[:, None] * drift(g, pre) + jnp.sqrt(2.0 * eta)[:, None] * noise
    if max_move > 0:
      norm = jnp.linalg.norm(move, axis=-1, keepdims=True)
      move = move * jnp.minimum(1.0, max_move / (norm + 1e-12))
    z_new = z + move
    if mala:
      lp_new, g_new, pre_new = evaluate(z_new, pre)
      log_ratio = (lp_new - lp + log_proposal(z, z_new, g_new, pre_new, eta)
                   - log_proposal(z_new, z, g, pre, eta))
      accept_prob = jnp.exp(jnp.minimum(log_ratio, 0.0))
      accept_prob = jnp.where(jnp.isfinite(accept_prob), accept_prob, 0.0)
      accept = jax.random.uniform(k_accept, (b,)) < accept_prob
      pick = lambda new, old: jnp.where(_bcast(accept, new), new, old)
      z_new, lp_new, g_new, pre_new = jax.tree.map(pick, (z_new, lp_new, g_new, pre_new),
                                                   (z, lp, g, pre))
    else:
      lp_new, g_new, pre_new = lp, g, pre  # superseded at the next step
      accept_prob = jnp.ones((b,), z.dtype)
    moved = jnp.linalg.norm(z_new - z, axis=-1)
    # running sums, not per-step outputs: memory stays flat in num_steps
    sums = jax.tree.map(jnp.add, sums, (jnp.mean(moved), jnp.mean(accept_prob), jnp.mean(eta)))
    return ((z_new, lp_new, g_new, pre_new), sums, i + 1, (diag, grad_sq)), None

  if mala:
    point = (z_init, *evaluate(z_init, None))
  else:  # K gradients for K steps: none is spent on the final point
    pre = None
    if precond:  # refreshed at each step's start, so only a constant one is computed here
      pre = (factor(z_init) if not refresh_precision else
             jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(factor, z_init)))
    point = (z_init, jnp.zeros((b,), z_init.dtype), jnp.zeros_like(z_init), pre)
  curv = jnp.zeros_like(z_init) if curvature is None else jnp.asarray(curvature, z_init.dtype)
  known = curv > 0
  init = (point, (jnp.zeros(()),) * 3, jnp.zeros((), jnp.int32),
          (jnp.ones_like(z_init), jnp.zeros_like(z_init)))
  ((z, lp, _, _), sums, _, (_, grad_sq)), _ = jax.lax.scan(step, init, length=num_steps,
                                                           unroll=unroll)
  if not mala:
    lp = log_density(z, num_steps)
  moves, accepts, etas = (v / max(num_steps, 1) for v in sums)
  info = LangevinInfo(
      move_norm=moves,
      accept_rate=accepts,
      step_size=etas,
      log_density=lp,
      displacement_sq=jnp.mean(jnp.sum(jnp.square(z - z_init), -1)),
      grad_sq=grad_sq / max(num_steps, 1),
  )
  return z, info
