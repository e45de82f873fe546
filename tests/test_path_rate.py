"""The path-KL rate (`path_rate`, eval.rate_estimator = path_kl) against closed forms: an encoder
equal to the prior, a linear-Gaussian encoder with its exact ε-predictor, a VAE-like Gaussian q.
Where the forward-noised estimate (diffusion_kl) misses the same closed form, the test says so:
each of the first two checks fails on it."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffenc_jax import em, evaluate, losses, path_rate, schedules
from tests.test_rate import D, N, GaussianCodeEncoder, blurred_kl, gaussian_setup

SCHEDULE = schedules.CosineSchedule(logsnr_min=-15.0, logsnr_max=8.0)


def test_grid_runs_from_one_to_zero_uniform_in_log_snr():
  t = path_rate.ancestral_times(SCHEDULE, 23, "logsnr")
  assert float(t[0]) == 1.0 and float(t[-1]) == 0.0
  np.testing.assert_allclose(np.diff(np.asarray(SCHEDULE.log_snr(t))), 1.0, rtol=1e-3)
  np.testing.assert_allclose(path_rate.ancestral_times(SCHEDULE, 4, "time"),
                             [1.0, 0.75, 0.5, 0.25, 0.0])
  with pytest.raises(ValueError, match="spacing"):
    path_rate.ancestral_times(SCHEDULE, 4, "uniform")


def test_prior_sampler_variance_is_the_prior_samplers_output_variance():
  # v_N by the recursion against the empirical variance of the prior's own chain
  out = jax.jit(lambda k: path_rate.ancestral_path_rate(
      lambda z, t: SCHEDULE.sigma(t)[:, None] * z, k, (100_000, 1), SCHEDULE, 5))(
          jax.random.key(0))
  v = float(path_rate.prior_sampler_variance(SCHEDULE, 5))
  assert abs(v - 1.0) > 0.3  # 5 steps uniform in log-SNR: far from N(0, I)
  np.testing.assert_allclose(float(jnp.var(out["code"])), v, rtol=0.02)


def test_an_encoder_equal_to_the_prior_on_its_path_reports_its_discretisation_kl():
  """ε̂ = σ_t z (the prior's exact predictor) at every time the sampler visits, and wrong in
  between, where the code's sampler never looks but the forward-noised estimate integrates:
  the code is exactly the prior sampler's, its rate KL(N(0, v_N I) ‖ N(0, I))."""
  steps, d, b = 40, 16, 4000
  lam = lambda t: SCHEDULE.log_snr(t)
  lam_max, lam_min = 8.0, -15.0
  step = (lam_max - lam_min) / steps

  def eps_fn(z, t):  # zero off-grid error on the grid λ_k = λ_max − k Δλ
    off_grid = jnp.sin(math.pi * (lam_max - lam(t)) / step) ** 2
    return SCHEDULE.sigma(t)[:, None] * z + 0.5 * off_grid[:, None] * jnp.tanh(z)

  out = jax.jit(lambda k: path_rate.ancestral_path_rate(eps_fn, k, (b, d), SCHEDULE, steps))(
      jax.random.key(1))
  analytic = float(path_rate.discretisation_kl(SCHEDULE, steps, d))
  assert 0.05 < analytic < 1.0
  assert float(jnp.max(out["path_kl"])) < 1e-3
  # the terminal term is a Monte-Carlo estimate of KL(N(0, v_N I) ‖ N(0, I)) here
  v = float(path_rate.prior_sampler_variance(SCHEDULE, steps))
  # its std: ½ |1/v − 1| std(‖z‖²) / √b with ‖z‖² ~ v χ²_d
  tol = 4 * 0.5 * abs(1 / v - 1) * v * math.sqrt(2 * d) / math.sqrt(b)
  assert abs(float(out["rate"].mean()) - analytic) < tol + 1e-3, (out["rate"].mean(), analytic)
  # the forward-noised estimate of the same sampler's code charges the off-grid error
  old = jax.jit(lambda k: losses.rate_estimate(eps_fn, out["code"], k, SCHEDULE, 16))(
      jax.random.key(2))
  assert float(old.mean()) > 5 * analytic + 1.0, float(old.mean())


def _decoded_kl(zq, mu):
  """KL to N(0, I) of the decoded variable's law, Gaussian with mean α_0 μ(x) and the per-dim
  variance of zq around it (pooled over examples), mean over examples."""
  a2 = 1.0 / (1.0 + math.exp(-8.0))
  v = np.mean((np.asarray(zq, np.float64) - math.sqrt(a2) * mu) ** 2, 0)
  return float(np.mean(0.5 * np.sum(a2 * mu**2 + v - 1.0 - np.log(v), -1)))


def test_linear_gaussian_encoder_reports_the_closed_form_kl_of_the_decoded_code():
  """q(z|x) = N(μ(x), s² I) with its exact ε-predictor, through the held-out evaluation and the
  encoder's real sampler (no sample drawn outside it): the rate of the decoded z_q, the
  sampler's last noisy state at λ_max, is within 2 % of the closed form of that code,
  KL(N(α_0 μ, (α_0² s² + σ_0²) I) ‖ N(0, I)), and of the KL of what is decoded."""
  config, method, state, images, mu = gaussian_setup(estimator="path_kl")
  config.eval.rate_steps = 1000
  method = em.DiffusionEncoder(config, (8, 8, 1))  # the real encode, not a direct draw
  method.encoder = GaussianCodeEncoder(config, (8, 8, 1)).encoder
  labels = np.zeros(N, np.int32)
  metrics = evaluate.HeldOut(config, method, images, labels).evaluate(state)
  target = blurred_kl(mu, 8.0)
  zq = method.rate_latent(state.params, images, None, jax.random.key(4))
  decoded = _decoded_kl(zq, mu)
  assert abs(decoded - target) < 0.02 * target, (decoded, target)
  assert abs(metrics["rate_nats"] - target) < 0.02 * target, (metrics["rate_nats"], target)
  assert metrics["rate_nats"] > 0.99 * decoded  # an upper bound, up to Monte-Carlo error
  # the forward-noised estimate of the z⁰ the encoder's 5-step sampler returns (its last x̂_0)
  # reports q's blurred KL, but what it decodes is narrower: it is not a bound on that code
  config.eval.rate_estimator = "diffusion_kl"
  old = evaluate.HeldOut(config, method, images, labels).evaluate(state)
  z0 = method.encode(state.params["encoder"], images, jax.random.key(5))
  old_decoded = _decoded_kl(method.rate_latent(state.params, images, z0, jax.random.key(6)), mu)
  assert old["rate_nats"] < 0.95 * old_decoded, (old["rate_nats"], old_decoded)


def test_gaussian_q_reports_its_analytic_kl():
  """A VAE's q(z|x) = N(μ, diag s²) with the exact ε-predictor of its VP diffusion: the path
  rate agrees with the analytic KL the VAE reports (`losses.gaussian_kl`), the blur at σ_0
  aside (the blurred Gaussian's KL to within 1 %, the unblurred to within 2 %)."""
  b, d = 2000, 8
  k_mu, k_s = jax.random.split(jax.random.key(7))
  mean = jax.random.normal(k_mu, (b, d))
  std = jax.random.uniform(k_s, (b, d), minval=0.2, maxval=1.0)

  def eps_fn(z, t):
    alpha, sigma = (a[:, None] for a in SCHEDULE.alpha_sigma(t))
    return sigma * (z - alpha * mean) / (alpha**2 * std**2 + sigma**2)

  out = jax.jit(lambda k: path_rate.ancestral_path_rate(eps_fn, k, (b, d), SCHEDULE, 1000))(
      jax.random.key(8))
  rate = float(out["rate"].mean())
  analytic = float(losses.gaussian_kl(mean, 2 * jnp.log(std)).mean())
  a2, s2 = 1.0 / (1.0 + math.exp(-8.0)), 1.0 / (1.0 + math.exp(8.0))
  blurred = float(losses.gaussian_kl(math.sqrt(a2) * mean, jnp.log(a2 * std**2 + s2)).mean())
  assert abs(rate - blurred) < 0.01 * blurred, (rate, blurred)
  assert abs(rate - analytic) < 0.02 * analytic, (rate, analytic)


def test_held_out_rate_and_decoded_code_are_one_variable():
  config, method, state, images, _ = gaussian_setup(estimator="path_kl")
  x = jnp.asarray(images[:8])
  key = jax.random.key(3)
  zq = method.rate_latent(state.params, x, None, key)
  out = path_rate.encoder_path(
      method, method.encoder_eps_fn(state.params["encoder"],
                                    method.encoder.apply(state.params["encoder"], x,
                                                         method="features")), x, key)
  np.testing.assert_array_equal(zq, out["code"])
  np.testing.assert_array_equal(method.rate(state.params, x, None, key, 1), out["rate"])
  assert zq.shape == (8, D)
