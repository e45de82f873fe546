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


def as_prediction(eps_fn, parameterization, schedule):
  """The raw output of a network of `parameterization` whose implied ε̂ is eps_fn's, converted
  back to ε̂ by `losses.eps_from_prediction` (what the decoders do)."""

  def out_fn(x_t, t):
    eps = eps_fn(x_t, t)
    alpha, sigma = schedule.alpha_sigma(t)
    alpha = alpha.reshape((-1,) + (1,) * (x_t.ndim - 1))
    sigma = sigma.reshape(alpha.shape)
    out = {"eps": eps, "x0": (x_t - sigma * eps) / alpha,
           "v": alpha * eps - sigma * (x_t - sigma * eps) / alpha}[parameterization]
    return losses.eps_from_prediction(out, x_t, t, schedule, parameterization)

  return out_fn


def closed_form_weight(weighting, t_val, gamma):
  """w(t) of each weighting, written out from its definition (SNR = α²/σ²)."""
  alpha, sigma = SCHED.alpha_sigma(t_val)
  snr = alpha**2 / sigma**2
  return {"unit": 1.0, "vlb": -0.5 * SCHED.dlog_snr_dt(t_val), "x0": 1 / snr,
          "v": 1 + 1 / snr, "p2": 1 / (1 + snr) ** gamma,
          "min_snr": min(snr, gamma) / snr}[weighting]


@pytest.mark.parametrize("shape", [(4,), (3, 3, 2)])
@pytest.mark.parametrize("weighting,gamma", [("unit", 1.0), ("vlb", 1.0), ("x0", 1.0),
                                             ("v", 1.0), ("p2", 0.5), ("min_snr", 5.0)])
@pytest.mark.parametrize("parameterization", ["eps", "v", "x0"])
def test_denoising_loss_at_optimum_is_mmse(shape, weighting, gamma, parameterization):
  """At the analytic optimum for Gaussian data, every weighting of every parameterisation's
  loss equals w(t) · d · Var(ε | x_t): fails for a wrong weight or a wrong conversion."""
  n, mean, std = 40_000, 0.3, 0.7
  x0 = mean + std * jax.random.normal(jax.random.key(0), (n,) + shape)
  d = math.prod(shape)
  eps_fn = as_prediction(gaussian_eps(mean, std, SCHED), parameterization, SCHED)
  for t_val in (0.1, 0.5, 0.9):
    t = jnp.full((n,), t_val)
    loss = losses.denoising_loss(eps_fn, x0, jax.random.key(1), SCHED, weighting=weighting,
                                 gamma=gamma, t=t)
    assert loss.shape == (n,)
    alpha, sigma = SCHED.alpha_sigma(t_val)
    per_dim = alpha**2 * std**2 / (alpha**2 * std**2 + sigma**2)  # analytic MMSE of ε
    weight = closed_form_weight(weighting, t_val, gamma)
    np.testing.assert_allclose(losses.loss_weight(weighting, SCHED, jnp.float32(t_val), gamma),
                               weight, rtol=1e-4)
    expected = weight * d * per_dim
    stderr = weight * math.sqrt(2 * d) * per_dim / math.sqrt(n)  # sum of d scaled χ²_1
    assert abs(float(loss.mean()) - float(expected)) < 4 * float(stderr)


def test_v_weighting_of_a_v_network_is_its_v_mse():
  """'v' weighting on ε̂ = σ x_t + α v̂ is exactly ‖v − v̂‖², v = α ε − σ x_0."""
  n, d = 64, 6
  x0 = jax.random.normal(jax.random.key(0), (n, d))
  v_hat = lambda x_t, t: 0.3 * x_t + jnp.sin(t)[:, None]  # any network
  eps_fn = lambda x_t, t: losses.eps_from_prediction(v_hat(x_t, t), x_t, t, SCHED, "v")
  t = jax.random.uniform(jax.random.key(2), (n,))
  loss = losses.denoising_loss(eps_fn, x0, jax.random.key(1), SCHED, weighting="v", t=t)
  eps = jax.random.normal(jax.random.split(jax.random.key(1), 3)[1], x0.shape)  # its ε draw
  alpha, sigma = (a[:, None] for a in SCHED.alpha_sigma(t))
  x_t = alpha * x0 + sigma * eps
  v_mse = jnp.sum(jnp.square(alpha * eps - sigma * x0 - v_hat(x_t, t)), -1)
  np.testing.assert_allclose(loss, v_mse, rtol=2e-4)


def test_input_perturbation_of_a_v_network_targets_the_clean_v():
  """DDPM-IP on a v network: it sees the perturbed x_t, the loss is ‖v − v̂‖² with v the clean
  sample's (the output converted at the clean x_t), bounded where α → 0."""
  n, d, gamma = 64, 6, 0.1
  x0 = jax.random.normal(jax.random.key(0), (n, d))
  v_hat = lambda x_t, t: 0.3 * x_t + jnp.sin(t)[:, None]
  t = jax.random.uniform(jax.random.key(2), (n,))
  loss = losses.denoising_loss(v_hat, x0, jax.random.key(1), SCHED, weighting="v", t=t,
                               input_perturbation=gamma, parameterization="v")
  _, k_eps, k_ip = jax.random.split(jax.random.key(1), 3)
  eps, xi = jax.random.normal(k_eps, x0.shape), jax.random.normal(k_ip, x0.shape)
  alpha, sigma = (a[:, None] for a in SCHED.alpha_sigma(t))
  seen = alpha * x0 + sigma * (eps + gamma * xi)
  np.testing.assert_allclose(loss, jnp.sum(jnp.square(alpha * eps - sigma * x0 - v_hat(seen, t)), -1),
                             rtol=2e-4)


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
  n = 50_000
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
