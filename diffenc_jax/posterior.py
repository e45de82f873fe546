"""The E-step's energy for a diffusion decoder, and its Gauss-Newton preconditioner.

For a diffusion decoder −log p_θ(x|z) is bounded by the continuous-time ELBO, whose only
z-dependent part is the diffusion term

    L(z) = ½ ∫_{λ_min}^{λ_max} E_ε ‖ε − ε̂_θ(α_λ x + σ_λ ε, t(λ), z)‖² dλ

(the prior and reconstruction terms of `losses.diffusion_nll_bound` depend on x alone). The
E-step runs Langevin/MALA on U(z) = L(z)/β + ½‖z‖² (+ …), so what matters is the z-dependent
part of a Monte-Carlo estimate of L and of its gradient. The estimate here:

  - draws (λ, ε) once and keeps them for the whole chain (`draw_energy_noise`), so that U is a
    deterministic function of z along it and MALA's differences U(z') − U(z) share the noise;
  - stratifies λ (each draw marginally from the proposal, together an even cover);
  - pairs every ε with −ε at the same λ (antithetic): the part of the residual odd in ε, the
    gradient's main noise at a fixed λ, cancels (exactly, for a decoder linear in ε);
  - draws λ from a proposal concentrated where z matters, weighting each draw by
    1/(n q(λ)) so the estimate stays unbiased. The proposal is a logistic density centred at
    `log_snr_center`, truncated to [λ_min, λ_max], optionally mixed with a uniform share
    (combined by the balance heuristic: q = the mixture density for every draw). For
    x | z ~ N(Az, s²I) the integrand of ∇_z L is
    ∝ e^λ / (1 + s² e^λ)², a logistic density in λ centred at log(1/s²) with scale 1: z matters
    around the SNR at which the noise level equals the decoder's residual uncertainty, not at
    low noise (x_t alone determines x) nor at pure noise;
  - optionally a control variate around a reference z_ref (the chain's start z⁰; see
    `diffusion_nll_fn`).

The networks enter as a closure `eps_fn(x_t (B, ...), t (B,), z (B, d)) -> ε̂ (B, ...)` bound
to the decoder's parameters, which must treat examples independently. Every draw is per
example, so a batch of chains over the same x has independent draws per chain.

In an E-step (one builder per chain, i.e. per call of the E-step):

    eps_fn = lambda x_t, t, z: decoder.apply(dec_params, x_t, t, z)
    nll = diffusion_nll_fn(eps_fn, x, k_nll, schedule, z_ref=z0)
    log_density = lambda z: -nll(z) / beta - 0.5 * jnp.sum(z**2, -1)  # (+ the proximal term)
    precision_fn = diffusion_gauss_newton_precision(eps_fn, x, k_gn, schedule, beta=beta,
                                                    prior_precision=1.0 + prox_weight)
    samplers.langevin_posterior(log_density, z0, k_chain, step_rule="gauss_newton",
                                precision_fn=precision_fn, mala=True, ...)
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from diffenc_jax.losses import sample_times
from diffenc_jax.schedules import Schedule

Array = jax.Array
EpsFn = Callable[[Array, Array, Array], Array]

PROPOSALS = ("uniform_t", "uniform", "logistic")


class EnergyDraws(NamedTuple):
  """The (λ, ε) draws of one energy estimate, fixed along a chain. M evaluations per example.

  Σ_m weight[:, m] · f(log_snr[:, m], eps[:, m]) is an unbiased estimate of ∫ E_ε f dλ.
  """

  log_snr: Array  # (B, M)
  t: Array  # (B, M): the schedule's time at log_snr, what the network is given
  eps: Array  # (B, M, ...): the noise, x's trailing shape
  weight: Array  # (B, M): quadrature / importance weight in dλ


def _bcast(v: Array, x: Array) -> Array:
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def _log_snr_range(schedule: Schedule) -> tuple[Array, Array]:
  return schedule.log_snr(jnp.ones(())), schedule.log_snr(jnp.zeros(()))


def _logistic_cdf_range(lam_min, lam_max, center, scale):
  return (jax.nn.sigmoid((lam_min - center) / scale),
          jax.nn.sigmoid((lam_max - center) / scale))


def _logistic_pdf(lam, center, scale):
  """Density of the (untruncated) logistic law at lam: y(1 − y)/scale, y = sigmoid(·)."""
  a = (lam - center) / scale
  return jax.nn.sigmoid(a) * jax.nn.sigmoid(-a) / scale


def draw_energy_noise(
    key: Array,
    x_shape: tuple[int, ...],
    schedule: Schedule,
    num_samples: int = 8,
    *,
    proposal: str = "logistic",
    stratified: bool = True,
    antithetic: bool = True,
    log_snr_center: float = 2.0,
    log_snr_scale: float = 2.0,
    uniform_fraction: float = 0.0,
    dtype=jnp.float32,
) -> EnergyDraws:
  """Draws the (λ, ε) of an estimate of ∫ E_ε f(λ, ε) dλ over [λ_min, λ_max], per example.

  Args:
    key: PRNG key.
    x_shape: (B, ...), the data's shape; ε has shape (B, M, ...).
    schedule: the decoder's noise schedule (its λ range, and t(λ)).
    num_samples: M, the number of network evaluations per example per energy call (with
      antithetic=True, M/2 values of λ, each with ε and −ε; M must then be even).
    proposal: the density q of λ:
      'uniform_t': t ~ U(0, 1), weight −λ'(t)/M (the plain estimator, a baseline);
      'uniform': λ ~ U(λ_min, λ_max), weight (λ_max − λ_min)/M (what
        `losses.diffusion_nll_bound` uses);
      'logistic': round(uniform_fraction · n) of the n values uniform in λ, the others from a
        logistic(log_snr_center, log_snr_scale) truncated to [λ_min, λ_max]; every draw is
        weighted by 1/(n q_mix(λ)), q_mix = the mixture density with the realised fractions.
        A uniform part is defensive: it bounds the weights by 1/uniform_fraction times the
        uniform ones whatever the integrand, but with few draws it spends whole strata where z
        does not matter (docs/method.md §4); the default 0 relies on the logistic's tails
        instead.
    stratified: each component's draws along M are (u + i/n) mod 1 through its inverse CDF.
    antithetic: ε and −ε at the same λ, each with half the weight.
    log_snr_center: the logistic's centre: ≈ log(1/s²) for a decoder whose residual per-dimension
      std given z is s (2.0: s ≈ 0.37 on data in [−1, 1]).
    log_snr_scale: the logistic's scale. 1 is the shape of the linear-gaussian gradient's
      integrand; 2 (the default) has heavier tails than it, so the weights stay bounded where
      the integrand lives away from the centre (docs/method.md §4).
    uniform_fraction: the uniform share of the 'logistic' mixture.
  Returns:
    EnergyDraws with log_snr, t, weight (B, M) and eps (B, M, ...).
  """
  if proposal not in PROPOSALS:
    raise ValueError(f"unknown proposal {proposal!r}; choose one of {PROPOSALS}")
  if antithetic and num_samples % 2:
    raise ValueError(f"antithetic draws come in pairs: num_samples must be even, "
                     f"got {num_samples}")
  if not 0.0 <= uniform_fraction <= 1.0:
    raise ValueError(f"uniform_fraction must be in [0, 1], got {uniform_fraction}")
  b = x_shape[0]
  n = num_samples // 2 if antithetic else num_samples
  k_u, k_l, k_eps = jax.random.split(key, 3)
  lam_min, lam_max = _log_snr_range(schedule)
  width = lam_max - lam_min

  if proposal == "uniform_t":
    t = sample_times(k_u, (b, n), stratified=stratified)
    lam = schedule.log_snr(t)
    weight = -schedule.dlog_snr_dt(t) / n
  else:
    n_u = n if proposal == "uniform" else int(round(uniform_fraction * n))
    n_l = n - n_u
    parts = []
    if n_u:
      parts.append(lam_max - width * sample_times(k_u, (b, n_u), stratified=stratified))
    if n_l:
      lo, hi = _logistic_cdf_range(lam_min, lam_max, log_snr_center, log_snr_scale)
      p = lo + (hi - lo) * sample_times(k_l, (b, n_l), stratified=stratified)
      parts.append(log_snr_center + log_snr_scale * (jnp.log(p) - jnp.log1p(-p)))
    lam = jnp.clip(jnp.concatenate(parts, axis=1), lam_min, lam_max)
    density = (n_u / n) / width
    if n_l:
      lo, hi = _logistic_cdf_range(lam_min, lam_max, log_snr_center, log_snr_scale)
      density = density + (n_l / n) * _logistic_pdf(lam, log_snr_center, log_snr_scale) / (hi - lo)
    weight = jnp.broadcast_to(1.0 / (n * density), lam.shape)
    t = schedule.t_of_log_snr(lam)

  eps = jax.random.normal(k_eps, (b, n) + tuple(x_shape[1:]), dtype)
  if antithetic:
    lam, t, weight = (jnp.concatenate([v, v], axis=1) for v in (lam, t, weight))
    weight = 0.5 * weight
    eps = jnp.concatenate([eps, -eps], axis=1)
  return EnergyDraws(log_snr=lam.astype(dtype), t=t.astype(dtype), eps=eps,
                     weight=weight.astype(dtype))


def proposal_mass(schedule: Schedule, edges, proposal: str = "logistic", *,
                  log_snr_center: float = 2.0, log_snr_scale: float = 2.0,
                  uniform_fraction: float = 0.0, num_samples: int = 2,
                  antithetic: bool = True) -> Array:
  """The probability that one λ of `draw_energy_noise` (same options) falls in each bin of
  `edges` (n + 1,) increasing log-SNR edges: (n,), summing to 1 when the edges span
  [λ_min, λ_max]. With it, Σ_b E‖ĝ_b‖² / mass_b is the second moment of a one-draw estimate of
  a λ-integral whose per-bin one-draw estimates (λ uniform in the bin) have second moments
  E‖ĝ_b‖² (exact for a proposal constant within each bin)."""
  if proposal not in PROPOSALS:
    raise ValueError(f"unknown proposal {proposal!r}; choose one of {PROPOSALS}")
  lam_min, lam_max = _log_snr_range(schedule)
  e = jnp.clip(jnp.asarray(edges, jnp.float32), lam_min, lam_max)
  if proposal == "uniform_t":  # t ~ U(0, 1); λ decreases in t
    cdf = 1.0 - schedule.t_of_log_snr(e)
  else:
    n = num_samples // 2 if antithetic else num_samples
    n_u = n if proposal == "uniform" else int(round(uniform_fraction * n))
    cdf = (n_u / n) * (e - lam_min) / (lam_max - lam_min)
    if n_u < n:
      lo, hi = _logistic_cdf_range(lam_min, lam_max, log_snr_center, log_snr_scale)
      cdf = cdf + (1 - n_u / n) * (jax.nn.sigmoid((e - log_snr_center) / log_snr_scale) - lo) / (
          hi - lo)
  return jnp.diff(cdf)


def diffusion_energy_terms(
    eps_fn: EpsFn,
    x: Array,
    z: Array,
    draws: EnergyDraws,
    *,
    draws_per_call: int | None = None,
) -> Array:
  """Per-draw terms ½ w_m ‖ε_m − ε̂(α_m x + σ_m ε_m, t_m, z)‖² (B, M); their sum over M is
  the estimate of the ELBO's diffusion term L(z).

  Args:
    eps_fn: (x_t (B, ...), t (B,), z (B, d)) -> ε̂ (B, ...).
    x: (B, ...) data; z: (B, d) latents; draws: from `draw_energy_noise` for x's shape.
    draws_per_call: draws evaluated together in one network call (`lax.map`'s batch_size):
      None is one at a time (memory flat in M, as `losses.diffusion_nll_bound`), M all at once.
  """
  def one(args):
    lam, t, eps = args  # (B,), (B,), (B, ...)
    alpha = jnp.sqrt(jax.nn.sigmoid(lam))
    sigma = jnp.sqrt(jax.nn.sigmoid(-lam))
    x_t = _bcast(alpha, x) * x + _bcast(sigma, x) * eps
    res = eps - eps_fn(x_t, t, z)
    return jnp.sum(jnp.square(res).reshape(res.shape[0], -1), axis=-1)

  per_draw = (draws.log_snr.T, draws.t.T, jnp.moveaxis(draws.eps, 1, 0))
  if draws_per_call is not None and draws_per_call >= draws.log_snr.shape[1]:
    values = jax.vmap(one)(per_draw)  # (M, B), no loop
  else:
    values = jax.lax.map(one, per_draw, batch_size=draws_per_call)  # (M, B)
  return 0.5 * draws.weight * values.T


def diffusion_energy(eps_fn: EpsFn, x: Array, z: Array, draws: EnergyDraws, *,
                     draws_per_call: int | None = None) -> Array:
  """The estimate of the ELBO's diffusion term L(z), ½ Σ_m w_m ‖ε_m − ε̂_m‖², per example (B,).

  Adding `losses`' prior and reconstruction terms (functions of x only) gives the ELBO itself.
  """
  return jnp.sum(diffusion_energy_terms(eps_fn, x, z, draws, draws_per_call=draws_per_call),
                 axis=-1)


def diffusion_nll_fn(
    eps_fn: EpsFn,
    x: Array,
    key: Array,
    schedule: Schedule,
    *,
    num_samples: int = 8,
    proposal: str = "logistic",
    stratified: bool = True,
    antithetic: bool = True,
    log_snr_center: float = 2.0,
    log_snr_scale: float = 2.0,
    uniform_fraction: float = 0.0,
    z_ref: Array | None = None,
    reference_samples: int = 32,
    draws_per_call: int | None = None,
) -> Callable[[Array], Array]:
  """Builds nll(z (B, d)) -> (B,): −log p_θ(x|z) up to a z-independent constant, for the E-step.

  The (λ, ε) draws (`draw_energy_noise`, same options; see there) are made once, here, and
  shared by every call, so nll is a deterministic function of z: use one builder per chain.
  Its expectation over the draws is the ELBO's diffusion term L(z) (minus L(z_ref) with a
  control variate), and that of its gradient ∇_z L(z).

  Control variate (z_ref given, e.g. the chain's start z⁰, (B, d)). Subtracting the estimate at
  a reference point, L̂(z) − L̂(z_ref), or the null-z (unconditional) prediction's loss, changes
  the value by a z-independent amount and therefore leaves the gradient, and its noise,
  unchanged: it only keeps U's values small (MALA's differences lose no float32 digits to the
  large z-independent part). What reduces the gradient's noise is a z-dependent term of known
  mean: the linear (SVRG) correction
      nll(z) = L̂_M(z) − L̂_M(z_ref) − ⟨ĝ_M(z_ref) − ḡ_N(z_ref), z − z_ref⟩,
  ĝ_M = ∇L̂ with the chain's M draws, ḡ_N with `reference_samples` independent draws. Its
  gradient, ĝ_M(z) − ĝ_M(z_ref) + ḡ_N(z_ref), is unbiased, and its noise is that of ḡ_N (N
  draws, paid once per chain) plus that of ĝ_M(z) − ĝ_M(z_ref), small while z stays near z_ref
  (the draws are shared). Cost: N + M network evaluations, forward and backward, once at build
  time (the reference gradient, and the chain draws' value and gradient at z_ref); none per step.

  Args:
    eps_fn: (x_t (B, ...), t (B,), z (B, d)) -> ε̂ (B, ...), bound to the decoder's parameters.
    x: (B, ...) the data of each chain.
    key: PRNG key for the draws.
    schedule: the decoder's noise schedule.
    z_ref, reference_samples: the control variate (None: none).
    draws_per_call: see `diffusion_energy_terms`.
    Others: see `draw_energy_noise`.
  Returns:
    nll: z (B, d) -> (B,).
  """
  opts = dict(proposal=proposal, stratified=stratified, antithetic=antithetic,
              log_snr_center=log_snr_center, log_snr_scale=log_snr_scale,
              uniform_fraction=uniform_fraction, dtype=x.dtype)
  k_draws, k_ref = jax.random.split(key)
  draws = draw_energy_noise(k_draws, x.shape, schedule, num_samples, **opts)
  terms = lambda z, d: diffusion_energy_terms(eps_fn, x, z, d, draws_per_call=draws_per_call)
  if z_ref is None:
    return lambda z: jnp.sum(terms(z, draws), axis=-1)

  if z_ref.shape[0] != x.shape[0] or z_ref.ndim != 2:
    raise ValueError(f"z_ref must be (B, d) with B = {x.shape[0]}, got {z_ref.shape}")
  z_ref = jax.lax.stop_gradient(z_ref)
  ref_draws = draw_energy_noise(k_ref, x.shape, schedule, reference_samples, **opts)

  def summed(z, d):
    t = terms(z, d)
    return jnp.sum(t), t

  # examples are independent, so the gradient of the batch sum is the per-example gradient
  (_, terms_ref), g_chain = jax.value_and_grad(summed, has_aux=True)(z_ref, draws)
  g_ref = jax.grad(lambda z: summed(z, ref_draws)[0])(z_ref)
  terms_ref, delta = jax.lax.stop_gradient((terms_ref, g_chain - g_ref))

  def nll(z):
    return (jnp.sum(terms(z, draws) - terms_ref, axis=-1)
            - jnp.sum(delta * (z - z_ref), axis=-1))

  return nll


def gauss_newton_levels(
    schedule: Schedule,
    num_levels: int = 4,
    log_snr_center: float = 2.0,
    log_snr_scale: float = 1.0,
) -> tuple[Array, Array]:
  """Noise levels λ_k and weights w_k (each (num_levels,)) of the Gauss-Newton quadrature.

  The midpoint rule in y = sigmoid((λ − c)/τ) over [y(λ_min), y(λ_max)], as weights in dλ:
  w_k = Δy · τ / (y_k (1 − y_k)). For a linear-gaussian decoder (s² the noise) the integrand
  e^λ/(1 + s² e^λ)² is (1/s²) y(1 − y) in y with c = log(1/s²), τ = 1, i.e. constant in y: the
  rule is then exact with any number of levels.
  """
  lam_min, lam_max = _log_snr_range(schedule)
  lo, hi = _logistic_cdf_range(lam_min, lam_max, log_snr_center, log_snr_scale)
  y = lo + (hi - lo) * (jnp.arange(num_levels) + 0.5) / num_levels
  lam = log_snr_center + log_snr_scale * (jnp.log(y) - jnp.log1p(-y))
  weight = (hi - lo) / num_levels * log_snr_scale / (y * (1.0 - y))
  return lam, weight


def diffusion_gauss_newton_precision(
    eps_fn: EpsFn,
    x: Array,
    key: Array,
    schedule: Schedule,
    *,
    beta: float = 1.0,
    prior_precision: float = 1.0,
    num_levels: int = 4,
    log_snr_center: float = 2.0,
    log_snr_scale: float = 1.0,
) -> Callable[[Array], Array]:
  """Builds z (B, d) -> H (B, d, d), the diffusion decoder's analogue of
  `samplers.gauss_newton_precision`, for `samplers.langevin_posterior`'s `precision_fn`.

  The Gauss-Newton matrix of L(z) = ½ ∫ ‖ε − ε̂‖² dλ is ∫ J_εᵀ J_ε dλ with J_ε = ∂ε̂/∂z.
  With x̂₀ = (x_t − σ ε̂)/α, J_ε = −(α/σ) J_x̂₀, so J_εᵀ J_ε = J_x̂₀ᵀ J_x̂₀ / s_λ², s_λ² = σ²/α²
  = e^{−λ} (the variance of x_t/α as a noisy view of x): the gaussian decoder's JᵀJ/σ_x², one
  per noise level. At a few fixed levels (`gauss_newton_levels`),
      H = (1/β) Σ_k w_k J_x̂₀,kᵀ J_x̂₀,k / s_k² + prior_precision · I,
  computed as Σ_k w_k J_ε,kᵀ J_ε,k (no division by α at high noise). For x | z ~ N(Az, s² I)
  J_x̂₀ = A/(1 + s² e^λ), and with log_snr_center = log(1/s²), log_snr_scale = 1 the
  quadrature is exact: H = AᵀA/(β s²) + prior_precision · I, the exact posterior precision
  (up to the schedule's truncation, a relative 1/(1 + s² e^{λ_max}) ≈ 3e-6 here).

  Each level uses one ε per example, drawn here and fixed; J by d forward-mode passes per
  level. `eps_fn` must treat examples independently. prior_precision is 1 + λ_prox with the
  proximal term.
  """
  lam, weight = gauss_newton_levels(schedule, num_levels, log_snr_center, log_snr_scale)
  t = schedule.t_of_log_snr(lam)
  eps = jax.random.normal(key, (num_levels,) + x.shape, x.dtype)

  def precision(z):
    b, d = z.shape

    def level(args):
      lam_k, t_k, w_k, eps_k = args
      x_t = jnp.sqrt(jax.nn.sigmoid(lam_k)) * x + jnp.sqrt(jax.nn.sigmoid(-lam_k)) * eps_k
      f = lambda zz: eps_fn(x_t, jnp.full((b,), t_k, x.dtype), zz).reshape(b, -1)
      tangents = jnp.broadcast_to(jnp.eye(d, dtype=z.dtype)[:, None, :], (d, b, d))
      jac = jax.vmap(lambda v: jax.jvp(f, (z,), (v,))[1])(tangents)  # (d, B, D): ∂ε̂/∂z_i
      return w_k * jnp.einsum("ibn,jbn->bij", jac, jac)

    h = jnp.sum(jax.lax.map(level, (lam, t, weight, eps)), axis=0)
    return h / beta + prior_precision * jnp.eye(d, dtype=z.dtype)

  return precision
