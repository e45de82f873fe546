"""Samplers against closed forms: DDIM on a Gaussian target, Langevin on a linear-Gaussian
posterior (ULA's own analytic stationary law, MALA's exactness, Gauss-Newton), and memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffenc_jax import samplers, schedules
from tests.conftest import FAST_COMPILE
from tests.test_losses import gaussian_eps

SCHED = schedules.CosineSchedule()


def assert_moments(samples, mean, cov, n_se=4.5):
  """Sample mean and covariance equal (mean, cov) within n_se Monte-Carlo standard errors."""
  n = samples.shape[0]
  samples = np.asarray(samples, np.float64)
  mean_se = np.sqrt(np.diag(cov) / n)
  np.testing.assert_array_less(np.abs(samples.mean(0) - mean), n_se * mean_se)
  cov_se = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / n)
  np.testing.assert_array_less(np.abs(np.cov(samples.T) - cov), n_se * cov_se)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_latent_ddim_reproduces_gaussian_target(eta):
  n = 20_000
  mean = jnp.array([0.5, -1.0, 2.0])
  std = jnp.array([0.3, 1.0, 0.6])
  z = jax.jit(lambda k: samplers.latent_ddim(gaussian_eps(mean, std, SCHED), k, (n, 3), SCHED,
                                             num_steps=1000, eta=eta))(jax.random.key(0))
  assert_moments(z, np.asarray(mean), np.diag(np.asarray(std) ** 2))


def test_latent_ddim_images_and_clip():
  shape = (8, 4, 4, 1)
  big_eps = lambda x, t: -1e3 * jnp.ones_like(x)  # a wild network: x̂_0 would explode
  x = samplers.latent_ddim(big_eps, jax.random.key(0), shape, SCHED, num_steps=5, clip=2.0)
  assert x.shape == shape
  assert float(jnp.abs(x).max()) <= 2.0 + 1e-5


def linear_gaussian(beta, d=3, obs=6, s=0.5, seed=0):
  """p(x|z) = N(Az, s² I), p(z) = N(0, I): log density, exact tempered posterior and Hessian."""
  ka, kx = jax.random.split(jax.random.key(seed))
  a = jax.random.normal(ka, (obs, d)) / np.sqrt(obs)
  x = jax.random.normal(kx, (obs,))
  prec = np.eye(d) + np.asarray(a.T @ a) / (s**2 * beta)
  cov = np.linalg.inv(prec)
  mean = cov @ np.asarray(a.T @ x) / (s**2 * beta)

  def log_density(z):
    return -0.5 * jnp.sum(z**2, -1) - jnp.sum((x - z @ a.T) ** 2, -1) / (2 * s**2 * beta)

  return log_density, mean, cov, prec, (a, s)


N_CHAINS = 4000


def run(log_density, key, num_steps, **kw):
  z_init = jax.random.normal(jax.random.key(123), (N_CHAINS, 3)) * 2.0
  fn = jax.jit(lambda k: samplers.langevin_posterior(log_density, z_init, k,
                                                     num_steps=num_steps, **kw))
  return fn(key)


@pytest.mark.parametrize("beta", [1.0, 4.0])
def test_ula_small_step_matches_tempered_posterior(beta):
  log_density, mean, cov, prec, _ = linear_gaussian(beta)
  eta = 0.01
  z, info = run(log_density, jax.random.key(1), 1500, step_size=eta)
  # ULA on a Gaussian has the exact stationary law N(mean, P⁻¹ (I − ηP/2)⁻¹): a sharp check
  ula_cov = cov @ np.linalg.inv(np.eye(3) - eta * prec / 2)
  assert_moments(z, mean, ula_cov)
  # which, at this small step, is the tempered posterior within Monte-Carlo error
  assert_moments(z, mean, cov)
  assert float(info.accept_rate) == 1.0
  np.testing.assert_allclose(info.log_density, log_density(z), rtol=1e-5)


@pytest.mark.parametrize("beta", [1.0, 4.0])
def test_mala_is_exact_at_large_step(beta):
  log_density, mean, cov, prec, _ = linear_gaussian(beta)
  eta = 0.4 / np.linalg.eigvalsh(prec).max()  # ULA's covariance would be ≥ 25% off here
  z, info = run(log_density, jax.random.key(2), 600, step_size=eta, mala=True)
  assert 0.3 < float(info.accept_rate) < 0.999
  assert_moments(z, mean, cov)


def test_gauss_newton_mala_exact_and_ula_analytic():
  log_density, mean, cov, prec, (a, s) = linear_gaussian(1.0)
  precision_fn = samplers.gauss_newton_precision(lambda z: z @ a.T, sigma=s, beta=1.0)
  np.testing.assert_allclose(precision_fn(jnp.zeros((2, 3)))[0], prec, rtol=1e-5)
  z, info = run(log_density, jax.random.key(3), 60, step_size=0.5, step_rule="gauss_newton",
                precision_fn=precision_fn, mala=True)
  assert_moments(z, mean, cov)
  # without MALA, preconditioned ULA with the exact Hessian has covariance 2/(2 − η) · P⁻¹
  z, info = run(log_density, jax.random.key(4), 60, step_size=0.5, step_rule="gauss_newton",
                precision_fn=precision_fn)
  assert_moments(z, mean, cov * 2 / 1.5)
  # a constant preconditioner (computed once) is exact here too: H does not depend on z
  z, info = run(log_density, jax.random.key(5), 60, step_size=0.5, step_rule="gauss_newton",
                precision_fn=precision_fn, refresh_precision=False, mala=True)
  assert_moments(z, mean, cov)


def test_fixed_cap_and_snr_rules():
  log_density, mean, cov, prec, _ = linear_gaussian(1.0)
  z, info = run(log_density, jax.random.key(5), 20, step_size=0.05, max_move=0.1)
  assert float(info.move_norm) <= 0.1 + 1e-6
  z, info = run(log_density, jax.random.key(6), 20, step_size=0.0, step_rule="snr", snr=0.16)
  # η = 2 (r‖ξ‖/‖∇‖)²: the mean step size is what the rule says at the chains' gradients
  assert float(info.step_size) > 0
  with pytest.raises(ValueError, match="unknown step rule"):
    run(log_density, jax.random.key(0), 2, step_size=0.1, step_rule="hmc")
  with pytest.raises(ValueError, match="mala needs"):
    run(log_density, jax.random.key(0), 2, step_size=0.1, step_rule="snr", mala=True)


def test_no_gradient_through_chain():
  log_density, *_ = linear_gaussian(1.0)

  def f(z0):
    z, _ = samplers.langevin_posterior(log_density, z0, jax.random.key(0), num_steps=3,
                                       step_size=0.1)
    return jnp.sum(z)

  g = jax.grad(f)(jnp.ones((4, 3)))
  np.testing.assert_array_equal(g, 0.0)


def test_langevin_memory_does_not_grow_with_steps():
  mlp = jax.random.normal(jax.random.key(0), (16, 784)) * 0.1

  def log_density(z):
    mean = jnp.tanh(z @ mlp)
    return -0.5 * jnp.sum(z**2, -1) - 50.0 * jnp.sum((mean - 0.1) ** 2, -1)

  def temp_bytes(num_steps):
    fn = jax.jit(lambda z, k: samplers.langevin_posterior(log_density, z, k,
                                                          num_steps=num_steps, step_size=1e-3))
    compiled = fn.lower(jnp.zeros((128, 16)), jax.random.key(0)).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  small, large = temp_bytes(10), temp_bytes(1000)
  # keeping the chain (K × 128 × 16 floats) would add 8 MB; the sampler keeps nothing per step
  assert large <= small + 1024, (small, large)


@pytest.mark.parametrize("refresh", [True, False])
def test_gauss_newton_mala_exact_on_nonlinear_decoder(refresh):
  """A position-dependent preconditioner: MALA must account for H(z) and H(z') to stay exact.
  Moments are checked against quadrature of the 2-D posterior on a fine grid."""
  s = 0.3

  def mean_fn(z):
    z1, z2 = z[:, 0], z[:, 1]
    return jnp.stack([jnp.tanh(z1) + 0.2 * z2**2, z2 + 0.3 * z1**2, 0.5 * z1 * z2], -1)

  x = mean_fn(jnp.array([[0.5, -0.3]]))[0] + jnp.array([0.1, -0.1, 0.05])

  def log_density(z):
    return -0.5 * jnp.sum(z**2, -1) - jnp.sum((x - mean_fn(z)) ** 2, -1) / (2 * s**2)

  g = np.linspace(-4, 4, 801)
  grid = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
  w = np.exp(np.asarray(log_density(jnp.asarray(grid)), np.float64))
  w /= w.sum()
  mean = w @ grid
  cov = (grid - mean).T @ ((grid - mean) * w[:, None])

  precision_fn = samplers.gauss_newton_precision(mean_fn, sigma=s)
  z_init = jax.random.normal(jax.random.key(1), (N_CHAINS, 2))
  z, info = jax.jit(lambda k: samplers.langevin_posterior(
      log_density, z_init, k, num_steps=300, step_size=0.5, step_rule="gauss_newton",
      precision_fn=precision_fn, refresh_precision=refresh, mala=True))(jax.random.key(7))
  assert 0.2 < float(info.accept_rate) < 0.999
  assert_moments(z, mean, cov)


def test_spd_factor_matches_float64_cholesky_and_floors_singular_matrices():
  """L and L⁻¹ of `spd_factor` (the Gauss-Newton chain's factor) against float64 LAPACK; on a
  rank-deficient matrix the floored pivots keep both finite and L Lᵀ within the floor of h."""
  rng = np.random.default_rng(0)
  a = rng.normal(size=(32, 16, 16))
  h = (a @ a.transpose(0, 2, 1) / 16 + np.eye(16)).astype(np.float32)
  chol, inv = jax.jit(samplers.spd_factor)(h)
  want = np.linalg.cholesky(h.astype(np.float64))
  np.testing.assert_allclose(chol, want, atol=2e-5)
  np.testing.assert_allclose(inv, np.linalg.inv(want), atol=2e-5)
  assert np.all(np.triu(np.asarray(chol), 1) == 0) and np.all(np.triu(np.asarray(inv), 1) == 0)
  # rank 3 in 16 dimensions: eleven pivots hit the floor (1e-6 × the largest diagonal entry)
  b = rng.normal(size=(4, 16, 3)).astype(np.float32)
  h = b @ b.transpose(0, 2, 1)
  chol, inv = jax.jit(samplers.spd_factor)(h)
  assert np.all(np.isfinite(np.asarray(inv)))
  floor = 1e-6 * np.max(np.diagonal(h, axis1=1, axis2=2), -1)
  recon = np.einsum("bij,bkj->bik", np.asarray(chol, np.float64), np.asarray(chol, np.float64))
  np.testing.assert_allclose(recon, h, atol=1e-4 * np.abs(h).max())
  assert np.all(np.diagonal(np.asarray(chol), axis1=1, axis2=2) ** 2 >= 0.99 * floor[:, None])


_TWO_DEVICE_CHAIN = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from diffenc_jax import samplers
keys = jax.random.split(jax.random.key(0), 5)
w1 = jax.random.normal(keys[0], (16, 1024)) / 4
w2 = jax.random.normal(keys[1], (1024, 1024)) / 32
w3 = jax.random.normal(keys[4], (1024, 784)) / 32
mean_fn = lambda z: jnp.tanh(jnp.tanh(z @ w1) @ w2) @ w3
x = mean_fn(jax.random.normal(keys[2], (128, 16)))
log_density = lambda z: -0.5 * jnp.sum(z**2, -1) - jnp.sum((x - mean_fn(z))**2, -1) / 0.02
chain = lambda z, k: samplers.langevin_posterior(
    log_density, z, k, num_steps=8, step_size=0.5, step_rule="gauss_newton", mala=True,
    precision_fn=samplers.gauss_newton_precision(mean_fn, sigma=0.1), refresh_precision=True)[0]
z0 = jax.random.normal(keys[3], (128, 16))
mesh = jax.make_mesh((jax.device_count(),), ("data",))
batch = NamedSharding(mesh, P("data"))
run = jax.jit(chain, in_shardings=(batch, None), out_shardings=batch)
z = jax.device_put(z0, batch)
for i in range(4):  # 36 factorisations: the hang is a race; with eigh this hung 3 times in 3
  z = run(z, jax.random.key(i))
np.save(OUT, np.asarray(z))
"""


def test_gauss_newton_chain_runs_on_as_many_cpu_devices_as_cores(tmp_path):
  """A batch-sharded Gauss-Newton MALA chain over 2 CPU devices on 2 XLA threads finishes, with
  the 1-device result. jaxlib's batched LAPACK eigh hung here (its kernel waits, from inside
  the XLA thread pool, on work it queued there), the failure `spd_factor` exists to avoid."""
  import os
  import subprocess
  import sys
  results = []
  for n in (1, 2):
    out = str(tmp_path / f"z{n}.npy")
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"{FAST_COMPILE} --xla_force_host_platform_device_count={n}"}
    # two cores, so two XLA threads, whatever the host: as many devices as cores hung
    cores = sorted(os.sched_getaffinity(0))[:2]
    subprocess.run([sys.executable, "-c", f"OUT = {out!r}\n" + _TWO_DEVICE_CHAIN], env=env,
                   check=True, timeout=240, preexec_fn=lambda: os.sched_setaffinity(0, cores))
    results.append(np.load(out))
  np.testing.assert_allclose(results[1], results[0], rtol=1e-4, atol=1e-5)


def noisy_energy(beta, noise=1.0):
  """The linear-Gaussian log density plus a noise term ⟨ξ, z⟩ (ξ ~ N(0, noise² I) per example
  and key): an unbiased estimate whose noise depends on z, as a few-draw ELBO's does."""
  log_density, mean, cov, prec, _ = linear_gaussian(beta)

  def estimate(z, key):
    return log_density(z) + noise * jnp.sum(jax.random.normal(key, z.shape) * z, -1)

  return estimate, mean, cov, prec


def test_fresh_draws_average_out_estimator_noise_that_fixed_draws_fit():
  """Stochastic-gradient Langevin (fresh_draws) on an unbiased noisy estimate samples the
  posterior up to ULA's own step bias and a gradient-noise term η·noise²/2 per direction; the
  same chain with one draw fixed along it samples a tilted law per chain, N(mean + Σξ, Σ), whose
  ensemble has covariance Σ + Σ² noise²: what an E-step fitting its draws does."""
  beta, eta, noise = 1.0, 0.01, 1.0
  estimate, mean, cov, prec = noisy_energy(beta, noise)
  z, info = run(estimate, jax.random.key(4), 1500, step_size=eta, fresh_draws=True)
  # ULA with a gradient whose noise has covariance noise² I: the stationary covariance solves
  # C = (I − ηP) C (I − ηP) + (2η + η² noise²) I
  m = np.eye(3) - eta * prec
  flat = np.linalg.solve(np.eye(9) - np.kron(m, m), ((2 * eta + eta**2 * noise**2) * np.eye(3)
                                                       ).ravel())
  assert_moments(z, mean, flat.reshape(3, 3))
  assert_moments(z, mean, cov)  # within Monte-Carlo error of the posterior at this step
  assert float(info.accept_rate) == 1.0

  fixed_key = jax.random.key(7)
  fixed = lambda z: estimate(z, fixed_key)  # one draw per chain, the same at every step
  z_fixed, _ = run(fixed, jax.random.key(4), 1500, step_size=eta)
  assert_moments(z_fixed, mean, cov + cov @ cov * noise**2)
  with pytest.raises(AssertionError):
    assert_moments(z_fixed, mean, cov)


def test_fresh_draws_refuse_mala():
  estimate, *_ = noisy_energy(1.0)
  with pytest.raises(ValueError, match="fresh_draws"):
    samplers.langevin_posterior(estimate, jnp.zeros((2, 3)), jax.random.key(0), num_steps=2,
                                step_size=0.1, mala=True, fresh_draws=True)


def test_diagonal_rule_has_its_analytic_stationary_law_and_estimates_unknown_curvature():
  """The `diagonal` rule with curvature D = diag(P): preconditioned ULA, whose stationary
  covariance on a Gaussian solves C = M C Mᵀ + 2η D⁻¹, M = I − η D⁻¹ P (a sharp check, and
  within Monte-Carlo error of the posterior at this step); grad_sq is the mean of (∇log π)²,
  whose expectation under π is diag(P) (Fisher's identity). The curvature is pooled over the
  batch: where unknown (≤ 0), (∇log π)² at the chain's start takes its place, floored at 1."""
  log_density, mean, cov, prec, _ = linear_gaussian(1.0)
  eta, diag = 0.05, np.diag(prec)
  z, info = run(log_density, jax.random.key(5), 600, step_size=eta, step_rule="diagonal",
                curvature=jnp.broadcast_to(jnp.asarray(diag, jnp.float32), (N_CHAINS, 3)))
  m = np.eye(3) - eta * prec / diag[:, None]
  flat = np.linalg.solve(np.eye(9) - np.kron(m, m), (2 * eta * np.diag(1 / diag)).ravel())
  assert_moments(z, mean, flat.reshape(3, 3))
  assert_moments(z, mean, cov)
  assert info.grad_sq.shape == (N_CHAINS, 3)

  z_init = jax.random.normal(jax.random.key(123), (N_CHAINS, 3)) * 2.0
  g = jax.grad(lambda z: jnp.sum(log_density(z)))(z_init)
  batch = jnp.maximum(jnp.mean(jnp.square(g), 0, keepdims=True), 1.0)
  unknown, _ = run(log_density, jax.random.key(6), 5, step_size=eta, step_rule="diagonal",
                   curvature=jnp.zeros((N_CHAINS, 3)))
  given, _ = run(log_density, jax.random.key(6), 5, step_size=eta, step_rule="diagonal",
                 curvature=jnp.broadcast_to(batch, (N_CHAINS, 3)))
  np.testing.assert_allclose(unknown, given, rtol=1e-5, atol=1e-6)
  # pooled: one example's near-zero estimate does not set its own step
  spiky = jnp.broadcast_to(batch, (N_CHAINS, 3)).at[0].set(1e-3)
  pooled, _ = run(log_density, jax.random.key(6), 5, step_size=eta, step_rule="diagonal",
                  curvature=spiky)
  np.testing.assert_allclose(pooled[1:], given[1:], rtol=1e-2, atol=1e-3)
  with pytest.raises(ValueError, match="without mala"):
    samplers.langevin_posterior(log_density, z_init, jax.random.key(0), num_steps=2,
                                step_size=0.1, step_rule="diagonal", mala=True)
