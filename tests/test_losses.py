"""Losses against closed forms: MMSE of the optimal denoiser, Gaussian KLs, entropy bound."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffenc_jax import losses, schedules

SCHED = schedules.CosineSchedule()


def gaussian_eps(mean, std, schedule):
  """Exact ε-prediction E[ε | x_t] for data x_0 ~ N(mean, diag std²)."""

  def eps_fn(x_t, t):
    alpha, sigma = schedule.alpha_sigma(t)
    alpha = alpha.reshape((-1,) + (1,) * (x_t.ndim - 1))
    sigma = sigma.reshape(alpha.shape)
    return sigma * (x_t - alpha * mean) / (alpha**2 * std**2 + sigma**2)

  return eps_fn


@pytest.mark.parametrize("shape", [(4,), (3, 3, 2)])
@pytest.mark.parametrize("weighting", ["unit", "vlb", "x0"])
def test_denoising_loss_at_optimum_is_mmse(shape, weighting):
  n, mean, std = 40_000, 0.3, 0.7
  x0 = mean + std * jax.random.normal(jax.random.key(0), (n,) + shape)
  d = math.prod(shape)
  eps_fn = gaussian_eps(mean, std, SCHED)
  for t_val in (0.1, 0.5, 0.9):
    t = jnp.full((n,), t_val)
    loss = losses.denoising_loss(eps_fn, x0, jax.random.key(1), SCHED, weighting=weighting, t=t)
    assert loss.shape == (n,)
    alpha, sigma = SCHED.alpha_sigma(t_val)
    per_dim = alpha**2 * std**2 / (alpha**2 * std**2 + sigma**2)  # analytic MMSE of ε
    weight = {"unit": 1.0, "vlb": -0.5 * SCHED.dlog_snr_dt(t_val),
              "x0": sigma**2 / alpha**2}[weighting]
    expected = weight * d * per_dim
    stderr = weight * math.sqrt(2 * d) * per_dim / math.sqrt(n)  # sum of d scaled χ²_1
    assert abs(float(loss.mean()) - float(expected)) < 4 * float(stderr)


def test_denoising_loss_input_perturbation_raises_loss():
  """DDPM-IP: the net sees ε + γξ but must predict ε, so the optimum's loss grows by ~γ²·gain."""
  n, d = 20_000, 4
  x0 = jax.random.normal(jax.random.key(0), (n, d))
  eps_fn = gaussian_eps(0.0, 1.0, SCHED)
  t = jnp.full((n,), 0.5)
  base = losses.denoising_loss(eps_fn, x0, jax.random.key(1), SCHED, t=t).mean()
  ip = losses.denoising_loss(eps_fn, x0, jax.random.key(1), SCHED, t=t,
                             input_perturbation=0.1).mean()
  # with unit-variance data ε̂ = σ x_t, and x_t = αx_0 + σ(ε + γξ): extra error σ⁴ γ² per dim
  _, sigma = SCHED.alpha_sigma(0.5)
  np.testing.assert_allclose(ip - base, d * sigma**4 * 0.01, rtol=0.15)


def test_gaussian_nll_and_kl_closed_forms():
  x = jnp.array([[0.5, -1.0], [2.0, 0.0]])
  mean = jnp.array([[0.0, 0.0], [1.0, 1.0]])
  expected = -jax.scipy.stats.norm.logpdf(x, mean, 0.3).sum(-1)
  np.testing.assert_allclose(losses.gaussian_nll(x, mean, 0.3), expected, rtol=1e-6)
  m = jnp.array([[0.5, -1.0, 2.0]])
  log_var = jnp.log(jnp.array([[0.25, 1.0, 4.0]]))
  kl = 0.5 * sum(mi**2 + v - 1 - math.log(v) for mi, v in zip([0.5, -1.0, 2.0], [0.25, 1, 4]))
  np.testing.assert_allclose(losses.gaussian_kl(m, log_var), [kl], rtol=1e-6)


def test_vae_loss_terms():
  n, d = 50_000, 3
  mean = jnp.tile(jnp.array([[0.5, -1.0, 0.0]]), (n, 1))
  log_var = jnp.tile(jnp.log(jnp.array([[0.25, 1.0, 2.0]])), (n, 1))
  # nll(z) = ½‖z‖²: its expectation under q is ½ Σ (m² + v)
  out = losses.vae_loss(lambda z: 0.5 * jnp.sum(z**2, -1), mean, log_var,
                        jax.random.key(0), beta=2.0)
  np.testing.assert_allclose(out["nll"].mean(), 0.5 * (0.25 + 1 + 0.25 + 1 + 2), rtol=1e-2)
  np.testing.assert_allclose(out["loss"], out["nll"] + 2.0 * out["kl"], rtol=1e-6)
  np.testing.assert_allclose(out["z"].var(0), [0.25, 1.0, 2.0], rtol=2e-2)


@pytest.mark.parametrize("mu,std", [(0.0, 1.0), (1.5, 0.5), (-0.7, 0.1), (2.0, 0.02)])
def test_rate_estimate_matches_closed_form_kl(mu, std):
  """With the exact score of q = N(μ, diag s²), the diffusion-KL rate is KL(q ‖ N(0, I))."""
  n, d = 4000, 4
  mean = jnp.full((d,), mu) + jnp.linspace(-0.5, 0.5, d)
  stds = jnp.full((d,), std) * jnp.linspace(0.8, 1.2, d)
  z0 = mean + stds * jax.random.normal(jax.random.key(0), (n, d))
  rate = losses.rate_estimate(gaussian_eps(mean, stds, SCHED), z0, jax.random.key(1), SCHED,
                              num_samples=32)
  assert rate.shape == (n,)
  closed = float(losses.gaussian_kl(mean[None], jnp.log(stds**2)[None])[0])
  assert abs(float(rate.mean()) - closed) < 0.01 * closed, (float(rate.mean()), closed)


def test_diffusion_nll_bound_is_tight_for_exact_model():
  """With the exact score of Gaussian data, E_x[bound(x)] = E_x[−log p(x)] (the entropy)."""
  n, d, std = 4000, 3, 0.5
  x0 = 0.2 + std * jax.random.normal(jax.random.key(0), (n, d))
  exact_nll = -jax.scipy.stats.norm.logpdf(x0, 0.2, std).sum(-1)
  bound = losses.diffusion_nll_bound(gaussian_eps(0.2, std, SCHED), x0, jax.random.key(1),
                                     SCHED, num_samples=64)
  gap = bound - exact_nll
  stderr = float(gap.std()) / math.sqrt(n)
  assert stderr < 0.05  # a wrong prior or reconstruction term is off by ≥ 1 nat
  assert abs(float(gap.mean())) < 4 * stderr, (float(gap.mean()), stderr)
  # a mismatched model (wrong mean) is bounded strictly above the exact NLL
  worse = losses.diffusion_nll_bound(gaussian_eps(0.0, std, SCHED), x0, jax.random.key(1),
                                     SCHED, num_samples=64)
  excess = 0.5 * d * 0.2**2 / std**2  # KL between the two Gaussians: the bound's minimum gap
  assert float((worse - exact_nll).mean()) > excess - 4 * stderr
