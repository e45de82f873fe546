"""The diffusion decoder's E-step energy (posterior.py) against a closed form.

For p(x|z) = N(Az, s²I) the VP diffusion of x given z has the exact ε-predictor
    ε*(x_t, t, z) = σ_t (x_t − α_t A z)/(α_t² s² + σ_t²)
(x_t | z ~ N(α_t A z, (α_t² s² + σ_t²) I) and Cov(ε, x_t) = σ_t I), with which the
continuous-time ELBO is tight: ∇_z of its diffusion term is
    ∫ e^λ/(1 + s² e^λ)² dλ · Aᵀ(Az − x) = Aᵀ(Az − x)/s² = −∇_z log N(x; Az, s²I),
up to the schedule's truncation, a relative 1/(1 + s² e^{15}) ≈ 3e-6 (the endpoint terms do not
depend on z). So:
  (a) the estimator's gradient, averaged over many independent draws, is −∇_z log N(x; Az, s²I)
      within Monte-Carlo error, and its value differences are the log-likelihood's;
  (b) each variance-reduction option lowers the gradient's variance below plain uniform-t draws;
  (c) MALA with the estimator and the Gauss-Newton preconditioner reproduces the tempered
      posterior N(P⁻¹Aᵀx/(βs²), P⁻¹), P = AᵀA/(βs²) + I.

Draws are per example, so B copies of the same (x, z) give B independent estimates in one call.
In (c) every chain thus samples its own fixed-draw target exp(−U_draws); the ensemble averages
over draws, as the E-step's batch does over examples. For this decoder, with antithetic ε,
U_draws(z) = ĉ ‖x − Az‖²/(2β) + (a linear term of zero mean, the control variate's) with ĉ a
random estimate of 1/s²; the ensemble's moments then differ from the posterior's by O(Var ĉ s²),
which the test measures and bounds far below the chains' Monte-Carlo error.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffenc_jax import chain, posterior, posterior_check, samplers, schedules
from tests.conftest import RUN_OPTIMISED
from tests.test_samplers import assert_moments

SCHED = schedules.CosineSchedule(logsnr_min=-15.0, logsnr_max=15.0)  # the image schedule's
D, LATENT, S = 12, 2, 0.3
N_EST = 20_000  # independent estimates for (a) and (b)
N_CHAINS = 4000


def key(seed):
  """An 'rbg' key: on XLA:CPU each threefry call site costs ~1.4 s of compilation, RngBitGenerator
  ~0.2 s, and every program here draws noise. The library only passes keys on."""
  return jax.random.key(seed, impl="rbg")


def linear_gaussian_decoder(seed=0):
  """A (D, 2) with an anisotropic posterior (one direction 0.3× as informative), and one x."""
  ka, kx = jax.random.split(key(seed))
  a = jax.random.normal(ka, (D, LATENT)) / np.sqrt(D) * jnp.array([1.0, 0.3])
  x = a @ jnp.array([0.8, -0.5]) + S * jax.random.normal(kx, (D,))
  return a, x


A, X = linear_gaussian_decoder()


def exact_eps(x_t, t, z):
  """ε*(x_t, t, z) = σ_t (x_t − α_t A z)/(α_t² s² + σ_t²): x_t (B, D), t (B,), z (B, 2)."""
  alpha, sigma = SCHED.alpha_sigma(t)
  alpha, sigma = alpha[:, None], sigma[:, None]
  return sigma * (x_t - alpha * z @ A.T) / (alpha**2 * S**2 + sigma**2)


def exact_nll_grad(z):
  """∇_z −log N(x; Az, s²I), (2,)."""
  return np.asarray(A.T @ (A @ z - X), np.float64) / S**2


def exact_nll(z):
  """−log N(x; Az, s²I) in nats."""
  return float(jnp.sum((X - A @ z) ** 2)) / (2 * S**2) + 0.5 * D * np.log(2 * np.pi * S**2)


def elbo_endpoint_terms():
  """The ELBO's terms other than the diffusion term (losses.diffusion_nll_bound): the prior
  KL(q(x_1|x) ‖ N(0, I)) and the reconstruction term at t = 0. Functions of x alone."""
  alpha1, sigma1 = (float(v) for v in SCHED.alpha_sigma(1.0))
  alpha0, sigma0 = (float(v) for v in SCHED.alpha_sigma(0.0))
  x = np.asarray(X, np.float64)
  prior = 0.5 * np.sum(alpha1**2 * x**2 + sigma1**2 - 1.0 - np.log(sigma1**2))
  return prior + 0.5 * D * (np.log(2 * np.pi * sigma0**2 / alpha0**2) + 1.0)


Z = jnp.array([0.3, 0.4])  # where the gradient is estimated, ≈ 2 posterior stds off its mean
Z2 = jnp.array([0.6, -0.2])  # a second point, for value differences
Z_REF = Z + jnp.array([0.25, -0.3])  # the control variate's reference (a chain's start)

PLAIN = dict(proposal="uniform_t", stratified=False, antithetic=False)
OPTIONS = {
    "plain": PLAIN,
    "stratified": {**PLAIN, "stratified": True},
    "antithetic": {**PLAIN, "antithetic": True},
    "importance": {**PLAIN, "proposal": "logistic"},  # logistic(2, 2) in λ
    "control_variate": {**PLAIN, "z_ref": True},
    "combined": {"z_ref": True},  # the library's defaults, with the control variate
    # leave-one-out: what each option adds to the others
    "combined_without_stratification": {"z_ref": True, "stratified": False},
    "combined_without_antithetic": {"z_ref": True, "antithetic": False},
    "combined_without_importance": {"z_ref": True, "proposal": "uniform_t"},
    "combined_without_control_variate": {},
}


@functools.lru_cache(maxsize=None)
def estimates(name):
  """N_EST independent (gradient at Z (N, 2), nll(Z) − nll(Z2) (N,), nll(Z) (N,)) for
  OPTIONS[name]."""
  opts = dict(OPTIONS[name])
  z_ref = jnp.tile(Z_REF, (N_EST, 1)) if opts.pop("z_ref", False) else None

  @jax.jit
  def run(key):
    xs = jnp.tile(X, (N_EST, 1))
    nll = posterior.diffusion_nll_fn(exact_eps, xs, key, SCHED, num_samples=8, z_ref=z_ref,
                                     draws_per_call=8, **opts)
    z = jnp.tile(Z, (N_EST, 1))
    grad = jax.grad(lambda z: jnp.sum(nll(z)))(z)
    value = nll(z)
    return grad, value - nll(jnp.tile(Z2, (N_EST, 1))), value

  return tuple(np.asarray(v, np.float64) for v in run(key(1)))


def unbiased_within_mc_error(samples, exact, n_se=4.5):
  """Whether every component of samples.mean(0) is within n_se standard errors of exact (a
  relative 1e-5 floor for float32 and the schedule's truncation, ≈ 3e-6)."""
  samples = samples.reshape(samples.shape[0], -1)
  se = samples.std(0) / np.sqrt(samples.shape[0])
  err = np.abs(samples.mean(0) - np.reshape(exact, -1))
  return bool(np.all(err < n_se * se + 1e-5 * np.abs(exact).max())), err / se


@pytest.mark.parametrize("name", ["plain", "stratified", "antithetic", "importance",
                                  "control_variate", "combined"])
def test_gradient_and_value_differences_are_unbiased(name):
  grad, diff, value = estimates(name)
  assert np.all(grad.std(0) > 0)  # a real Monte-Carlo estimate: the tolerance is not vacuous
  ok, z_scores = unbiased_within_mc_error(grad, exact_nll_grad(Z))
  assert ok, (name, z_scores)
  # MALA's log-ratio uses U(z') − U(z) with shared draws: its mean is the exact difference
  ok, z_scores = unbiased_within_mc_error(diff, exact_nll(Z) - exact_nll(Z2))
  assert ok, (name, z_scores)
  if "z_ref" not in OPTIONS[name]:
    # without the control variate the value is the ELBO's diffusion term itself: with the
    # endpoint terms, the exact −log p(x|z) (the bound is tight). This also catches errors that
    # leave the z-dependence alone, e.g. ‖ε + ε̂‖² for ‖ε − ε̂‖² (equal in expectation up to a
    # constant for this decoder)
    ok, z_scores = unbiased_within_mc_error(value + elbo_endpoint_terms(), exact_nll(Z))
    assert ok, (name, z_scores)


def test_importance_weights_are_needed():
  """The same logistic draws without the 1/(n q(λ)) correction (uniform-in-λ weights): the
  check of the previous test fails by many standard errors, so it can detect such a bug."""
  xs, z = jnp.tile(X, (N_EST, 1)), jnp.tile(Z, (N_EST, 1))
  draws = posterior.draw_energy_noise(key(2), xs.shape, SCHED, 8)
  width = 30.0
  wrong = draws._replace(weight=jnp.full_like(draws.weight, width / 8))
  grad_fn = jax.jit(jax.grad(lambda z, d: jnp.sum(
      posterior.diffusion_energy(exact_eps, xs, z, d, draws_per_call=8))))
  ok, _ = unbiased_within_mc_error(np.asarray(grad_fn(z, draws), np.float64), exact_nll_grad(Z))
  assert ok
  ok, z_scores = unbiased_within_mc_error(np.asarray(grad_fn(z, wrong), np.float64),
                                          exact_nll_grad(Z))
  assert not ok and np.max(z_scores) > 20, z_scores


def variance(name):
  return float(np.sum(estimates(name)[0].var(0)))  # trace of the gradient's covariance


def test_variance_reduction_over_plain_uniform_t():
  """Each option at the same cost (8 network evaluations per energy call; the control variate
  adds 32 + 16 once per chain) against plain uniform-t draws, alone and left out of the
  combination. The measured ratios are printed (pytest -s); the thresholds are well below them
  (the variances' own relative error at N_EST = 20,000 is 1-2 %)."""
  plain, combined = variance("plain"), variance("combined")
  alone = {name: plain / variance(name) for name in
           ("stratified", "antithetic", "importance", "control_variate")}
  left_out = {name: variance(f"combined_without_{name}") / combined for name in
              ("stratification", "antithetic", "importance", "control_variate")}
  print("\nvariance ratio, alone over plain:", {k: round(v, 2) for k, v in alone.items()},
        "\nleft out of the combination:", {k: round(v, 1) for k, v in left_out.items()},
        "\ncombined over plain:", round(plain / combined))
  for name, ratio in alone.items():
    assert ratio > 1.15, (name, ratio)
  # measured 1629, 2384, 335 and 5.0: stratified importance draws with antithetic ε leave
  # almost no noise for this decoder; the control variate then removes most of the rest
  minimum = {"stratification": 100, "antithetic": 100, "importance": 30, "control_variate": 3}
  for name, ratio in left_out.items():
    assert ratio > minimum[name], (name, ratio)
  assert plain / combined > 1000.0


def test_gauss_newton_precision_is_exact_for_linear_gaussian():
  z = jax.random.normal(key(0), (3, LATENT))
  xs = jnp.tile(X, (3, 1))
  gram = np.asarray(A.T @ A, np.float64)
  for beta in (1.0, 4.0):
    exact = gram / (beta * S**2) + np.eye(LATENT)
    for levels in (1, 4):
      h = posterior.diffusion_gauss_newton_precision(
          exact_eps, xs, key(1), SCHED, beta=beta, num_levels=levels,
          log_snr_center=float(np.log(1 / S**2)), log_snr_scale=1.0)(z)
      assert h.shape == (3, LATENT, LATENT)
      np.testing.assert_allclose(h, np.broadcast_to(exact, h.shape), rtol=1e-4)
    # at the default centre (2, not log(1/s²) ≈ 2.41) four levels are still within 1 %
    h = posterior.diffusion_gauss_newton_precision(exact_eps, xs, key(1), SCHED,
                                                   beta=beta)(z)
    np.testing.assert_allclose(h, np.broadcast_to(exact, h.shape), rtol=1e-2)


def tempered_posterior(beta):
  gram = np.asarray(A.T @ A, np.float64)
  prec = gram / (beta * S**2) + np.eye(LATENT)
  cov = np.linalg.inv(prec)
  return cov @ np.asarray(A.T @ X, np.float64) / (beta * S**2), cov


def run_chains(beta, nll_builder, num_steps=40):
  """MALA with the Gauss-Newton preconditioner, N_CHAINS chains over the same x, each from its
  own z⁰ ~ N(0, I) (standing in for the encoder's sample) and with its own draws."""
  xs = jnp.tile(X, (N_CHAINS, 1))
  z0 = jax.random.normal(key(10), (N_CHAINS, LATENT))

  @jax.jit
  def run(key):
    k_nll, k_gn, k_chain = jax.random.split(key, 3)
    nll = nll_builder(xs, z0, k_nll)
    log_density = lambda z: -nll(z) / beta - 0.5 * jnp.sum(z**2, -1)
    precision_fn = posterior.diffusion_gauss_newton_precision(exact_eps, xs, k_gn, SCHED,
                                                              beta=beta)
    z, info = samplers.langevin_posterior(
        log_density, z0, k_chain, num_steps=num_steps, step_size=0.5,
        step_rule="gauss_newton", precision_fn=precision_fn, refresh_precision=False,
        mala=True)
    # the curvature of each chain's own target: Hessian of nll = ĉ AᵀA exactly here
    hess = jax.vmap(lambda v: jax.jvp(jax.grad(lambda z: jnp.sum(nll(z))), (z,),
                                      (jnp.broadcast_to(v, z.shape),))[1])(jnp.eye(LATENT))
    c_hat = jnp.einsum("ibj,ji->b", hess, jnp.linalg.pinv(A.T @ A)) / LATENT
    return z, info.accept_rate, c_hat

  return run(key(int(beta)))


def default_nll(xs, z0, key):
  return posterior.diffusion_nll_fn(exact_eps, xs, key, SCHED, z_ref=z0, draws_per_call=8)


@pytest.mark.parametrize("beta", [1.0, 4.0])
def test_mala_with_estimator_reproduces_tempered_posterior(beta):
  mean, cov = tempered_posterior(beta)
  z, accept, c_hat = run_chains(beta, default_nll)
  assert 0.5 < float(accept) < 0.999, float(accept)
  # every chain's fixed-draw target is the posterior with 1/s² replaced by ĉ: a spread of 2 % at
  # most (1 % measured), so the ensemble's second-order bias (~4e-4 of the moments) is far
  # below the 4.5 standard errors (≈ 7 % of the covariance, 0.07 posterior stds of the mean)
  # of 4000 chains
  rel = np.asarray(c_hat) * S**2 - 1.0
  assert abs(rel.mean()) < 3e-3 and rel.std() < 2e-2, (rel.mean(), rel.std())
  assert_moments(z, mean, cov)


def test_chain_misses_posterior_without_importance_correction():
  """The chain test can fail: the same logistic draws with uniform-in-λ weights (the missing
  density-ratio correction) give a target whose moments are off by many standard errors."""
  def uncorrected_nll(xs, z0, key):
    draws = posterior.draw_energy_noise(key, xs.shape, SCHED, 8)
    draws = draws._replace(weight=jnp.full_like(draws.weight, 30.0 / 8))
    return lambda z: posterior.diffusion_energy(exact_eps, xs, z, draws, draws_per_call=8)

  mean, cov = tempered_posterior(1.0)
  z, _, _ = run_chains(1.0, uncorrected_nll)
  with pytest.raises(AssertionError):
    assert_moments(z, mean, cov)


def test_shapes_determinism_and_options():
  """Images (B, H, W, C); the energy is a deterministic function of z for fixed draws (what
  MALA needs), whether draws are evaluated one at a time or together; bad options raise."""
  b, shape = 3, (4, 4, 1)
  a_img = jax.random.normal(key(0), (16, LATENT))

  def eps_img(x_t, t, z):
    alpha, sigma = SCHED.alpha_sigma(t)
    alpha, sigma = alpha[:, None, None, None], sigma[:, None, None, None]
    mean = (z @ a_img.T).reshape((-1,) + shape)
    return sigma * (x_t - alpha * mean) / (alpha**2 * S**2 + sigma**2)

  @jax.jit
  def run(x, z, k):
    k_draws, k_nll, k_gn = jax.random.split(k, 3)
    draws = posterior.draw_energy_noise(k_draws, x.shape, SCHED, 6)
    one = posterior.diffusion_energy(eps_img, x, z, draws)
    together = posterior.diffusion_energy(eps_img, x, z, draws, draws_per_call=6)
    nll = posterior.diffusion_nll_fn(eps_img, x, k_nll, SCHED, z_ref=z + 0.1)
    h = posterior.diffusion_gauss_newton_precision(eps_img, x, k_gn, SCHED)(z)
    return draws, one, together, nll(z), nll(z), h

  x = jax.random.normal(key(1), (b,) + shape)
  z = jax.random.normal(key(2), (b, LATENT))
  draws, one, together, nll_a, nll_b, h = run(x, z, key(3))
  assert draws.eps.shape == (b, 6) + shape and draws.weight.shape == (b, 6)
  np.testing.assert_array_equal(draws.eps[:, 3:], -draws.eps[:, :3])  # antithetic pairs
  np.testing.assert_array_equal(draws.log_snr[:, 3:], draws.log_snr[:, :3])
  assert one.shape == (b,) and h.shape == (b, LATENT, LATENT)
  np.testing.assert_allclose(one, together, rtol=1e-5)
  np.testing.assert_array_equal(nll_a, nll_b)
  with pytest.raises(ValueError, match="even"):
    posterior.draw_energy_noise(key(0), x.shape, SCHED, 5)
  with pytest.raises(ValueError, match="unknown proposal"):
    posterior.draw_energy_noise(key(0), x.shape, SCHED, 4, proposal="beta")


class LinearGaussianDecoder:
  """The closed-form decoder as `posterior_check` takes it: ε̂ = the exact ε-predictor."""
  kind = "diffusion"
  schedule = SCHED

  def eps_fn(self, params, z):
    del params
    return lambda x_t, t: exact_eps(x_t, t, z)


def test_z_information_integrates_to_the_nll_difference_and_splits_the_gradient():
  """What z buys over z', summed over the log-SNR bins, is NLL(x|z') − NLL(x|z) (the ELBO is
  exact here) within its Monte-Carlo error; each bin's gradient is the closed form
  ∫_bin e^λ/(1 + s² e^λ)² dλ · Aᵀ(Az − x), and its integrand sits where the docstring of
  `draw_energy_noise` says: around λ = log(1/s²)."""
  b, draws = 2000, 8
  edges = posterior_check.default_edges(SCHED, 10)
  xs, z, z2 = (jnp.tile(v, (b, 1)) for v in (X, Z, Z2))
  parts = [jax.jit(lambda k: posterior_check.z_information(LinearGaussianDecoder(), None, xs, z,
                                                           z2, k, edges, draws))(key(5))]
  f = posterior_check.combine_bins(parts, edges, draws)
  exact = exact_nll(Z2) - exact_nll(Z)
  se = np.sqrt(np.sum(np.square(f["gain_se"] * np.diff(edges))))
  assert abs(np.sum(f["gain_nats"]) - exact) < 4.5 * se + 1e-3, (np.sum(f["gain_nats"]), exact, se)
  assert se < 0.05 * abs(exact)
  lo, hi = edges[:-1], edges[1:]
  weight = (1 / (1 + S**2 * np.exp(lo)) - 1 / (1 + S**2 * np.exp(hi))) / S**2
  signal = weight * S**2 * np.linalg.norm(exact_nll_grad(np.asarray(Z)))  # ‖Aᵀ(Az − x)‖
  big = signal > 0.05 * signal.max()
  np.testing.assert_allclose(f["grad_signal"][big], signal[big], rtol=0.05)
  peak = np.argmax(np.abs(f["gain_per_lambda"]))
  assert lo[peak] - 3 <= np.log(1 / S**2) <= hi[peak] + 3


def test_recipe_chain_samples_tempered_posterior_within_its_step_bias():
  """The E-step as configs/mnist_diffdec.py configures it — persistent chains continued by 2
  steps per visit of the `diagonal` rule on fresh draws from its λ proposal (one per step), the
  curvature a running mean of (∇log π)² over visits — on the closed-form decoder, after 500
  visits (at the recipe's β = 0.25 with one draw, whose variance enters the curvature and so
  shortens the steps, 200 do not reach the mean from the chains' start): its mean is the tempered posterior's, its variances exceed the posterior's by at
  most ULA's step bias for a step η c⁻¹ ≤ η/h, 1/(1 − η/2) (the curvature c is at least the
  precision h, E ĝ² = g² + Var ĝ), and its correlation is the posterior's."""
  from configs import mnist_diffdec
  recipe = mnist_diffdec.get_config()
  lv = recipe.em.langevin
  beta, eta, draws = recipe.bottleneck.beta, lv.step_size, lv.mc_samples
  assert (lv.step_rule, lv.fresh_draws, lv.num_steps) == ("diagonal", True, 2)
  xs = jnp.tile(X, (N_CHAINS, 1))
  z0 = jax.random.normal(key(10), (N_CHAINS, LATENT))

  @functools.partial(jax.jit, compiler_options=RUN_OPTIMISED)  # 1,000 steps: running dominates
  def visits(k):
    def log_density(z, kk):
      nll = posterior.diffusion_nll_fn(exact_eps, xs, kk, SCHED, num_samples=draws,
                                       proposal=lv.proposal, antithetic=lv.antithetic,
                                       log_snr_center=lv.log_snr_center,
                                       log_snr_scale=lv.log_snr_scale)
      return -nll(z) / beta - 0.5 * jnp.sum(z**2, -1)

    def visit(carry, kv):
      z, curv = carry
      z, info = samplers.langevin_posterior(log_density, z, kv, num_steps=lv.num_steps,
                                            step_size=eta, step_rule="diagonal",
                                            fresh_draws=True, curvature=curv)
      return (z, chain.running_curvature(curv, info.grad_sq, recipe.em.curvature_decay)), None

    (z, _), _ = jax.lax.scan(visit, (z0, jnp.zeros_like(z0)), jax.random.split(k, 500))
    return z

  z = np.asarray(visits(key(3)), np.float64)
  mean, cov = tempered_posterior(beta)
  se = np.sqrt(np.diag(cov) / N_CHAINS)
  np.testing.assert_array_less(np.abs(z.mean(0) - mean), 4.5 * se)
  ratio = np.diag(np.cov(z.T)) / np.diag(cov)
  assert np.all((ratio > 1.0) & (ratio < 1.03 / (1 - eta / 2))), ratio
  corr = lambda c: c[0, 1] / np.sqrt(c[0, 0] * c[1, 1])
  assert abs(corr(np.cov(z.T)) - corr(cov)) < 0.05


@pytest.mark.parametrize("proposal,center,scale,fraction,samples", [
    ("uniform_t", 2.0, 2.0, 0.0, 2), ("uniform", 2.0, 2.0, 0.0, 2),
    ("logistic", 8.0, 4.0, 0.0, 2), ("logistic", 2.0, 1.0, 0.5, 4)])
def test_proposal_mass_is_where_the_draws_fall(proposal, center, scale, fraction, samples):
  """posterior.proposal_mass: the share of `draw_energy_noise`'s λ in each log-SNR bin (with
  a uniform share, the realised mixture), within 4.5 binomial standard errors of 40,000 draws;
  and the second moments built on it: the best constant-per-bin proposal is (Σ √m_b)², no
  larger than any other, and uniform is what it says."""
  edges = posterior_check.default_edges(SCHED, 10)
  b = 40000 // (samples // 2)
  draws = posterior.draw_energy_noise(key(7), (b, 1), SCHED, samples, proposal=proposal,
                                      log_snr_center=center, log_snr_scale=scale,
                                      uniform_fraction=fraction)
  lam = np.asarray(draws.log_snr[:, : samples // 2]).ravel()
  share = np.histogram(lam, edges)[0] / lam.size
  mass = np.asarray(posterior.proposal_mass(SCHED, edges, proposal, log_snr_center=center,
                                            log_snr_scale=scale, uniform_fraction=fraction,
                                            num_samples=samples))
  np.testing.assert_allclose(np.sum(mass), 1.0, rtol=1e-5)
  se = np.sqrt(mass * (1 - mass) / lam.size)
  np.testing.assert_array_less(np.abs(share - mass), 4.5 * se + 1e-6)
  m2 = np.linspace(1.0, 10.0, 10)
  f = posterior_check.proposal_second_moments(m2, mass)
  np.testing.assert_allclose(f["best"], np.sum(m2 / (np.sqrt(m2) / np.sum(np.sqrt(m2)))))
  np.testing.assert_allclose(f["uniform"], 10 * np.sum(m2))
  assert f["best"] <= min(f["proposal"], f["uniform"]) * (1 + 1e-9)
