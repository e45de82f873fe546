"""The forward-noised rate (eval.rate_estimator = diffusion_kl) through the held-out table's own
code path (`evaluate.HeldOut`, `method.rate`, `method.rate_latent`), against closed-form KLs
(docs/method.md §1.8, docs/rate.md). The path-KL rate, the default: tests/test_path_rate.py.

The encoder under test has a known Gaussian q(z|x) = N(μ(x), s² I) and the exact ε of that
code's VP diffusion plugged into diffenc's latent-denoiser slot; everything else (features once,
`encoder_eps_fn`, `losses.rate_estimate`, the held-out loop) is the real thing."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from diffenc_jax import baselines, em, evaluate, schedules

D, S, N = 4, 0.02, 2000  # latent size, the code's std, held-out images


class ExactGaussianDenoiser(nn.Module):
  """features(x) = μ(x) (B, d), a fixed random projection of the image; denoise(z_t, t, μ) =
  E[ε | z_t] for z_0 ~ N(μ, s² I) under the VP schedule: σ_t (z_t − α_t μ)/(α_t² s² + σ_t²)."""

  latent_dim: int
  std: float
  schedule: schedules.Schedule

  def features(self, x):
    flat = x.reshape(x.shape[0], -1)
    w = jax.random.normal(jax.random.key(7), (flat.shape[-1], self.latent_dim))
    return 1.5 * jnp.tanh(flat @ w / math.sqrt(flat.shape[-1]))

  def denoise(self, z_t, t, h):
    alpha, sigma = (a[:, None] for a in self.schedule.alpha_sigma(t))
    return sigma * (z_t - alpha * h) / (alpha**2 * self.std**2 + sigma**2)

  def __call__(self, z_t, t, x):
    return self.denoise(z_t, t, self.features(x))


class GaussianCodeEncoder(em.DiffusionEncoder):
  """diffenc with the exact Gaussian denoiser, and z⁰ drawn exactly from N(μ(x), s² I) (the
  DDIM sampler's own law differs from q for so narrow a code: its last step returns x̂_0)."""

  def __init__(self, config, data_shape):
    super().__init__(config, data_shape)
    self.encoder = ExactGaussianDenoiser(config.model.latent_dim, S, self.schedule)

  def encode(self, enc_params, x, key, num_steps=None):
    mu = self.encoder.apply(enc_params, x, method="features")
    return mu + S * jax.random.normal(key, mu.shape)


def gaussian_setup(logsnr_max=8.0, estimator="diffusion_kl"):
  config = tiny.get_config()
  config.eval.rate_estimator = estimator
  config.model.latent_dim = D
  config.model.enc_parameterization = "eps"  # the module outputs ε itself
  config.schedule.logsnr_max = logsnr_max
  config.em.eval_refine_steps = 0
  config.eval.rate_samples = 64
  config.eval.batch_size = 1000
  images = np.asarray(jax.random.uniform(jax.random.key(3), (N, 8, 8, 1), minval=-1.0,
                                         maxval=1.0))
  method = GaussianCodeEncoder(config, (8, 8, 1))
  state = jax.jit(method.init_state)(jax.random.key(0))
  mu = np.asarray(method.encoder.apply(state.params["encoder"], images, method="features"),
                  np.float64)
  return config, method, state, images, mu


def blurred_kl(mu, log_snr):
  """Mean over examples of KL(N(α μ, (α² s² + σ²) I) ‖ N(0, I)): the code blurred at log_snr."""
  a2, s2 = 1.0 / (1.0 + math.exp(-log_snr)), 1.0 / (1.0 + math.exp(log_snr))
  var = a2 * S**2 + s2
  return float(np.mean(0.5 * np.sum(a2 * mu**2 + var - 1.0 - math.log(var), -1)))


def test_held_out_rate_is_the_kl_of_the_code_blurred_at_logsnr_max():
  config, method, state, images, mu = gaussian_setup()
  metrics = evaluate.HeldOut(config, method, images, np.zeros(N, np.int32)).evaluate(state)
  target = blurred_kl(mu, 8.0)  # what the estimator integrates to: from λ_max, not from ∞
  unblurred = float(np.mean(0.5 * np.sum(mu**2 + S**2 - 1.0 - math.log(S**2), -1)))
  assert target < 0.93 * unblurred  # the floor's blur is what this test resolves
  rate = metrics["rate_nats"]
  assert abs(rate - target) < 0.02 * target, (rate, target, unblurred)
  # the same number in bits, and the distortion of the same (blurred) variable beside it
  np.testing.assert_allclose(metrics["rate_bits"], rate / math.log(2), rtol=1e-6)
  assert metrics["psnr_zq"] == pytest.approx(evaluate.psnr_from_mse(metrics["mse_zq"]))
  assert metrics["mse_zq"] != metrics["mse_z0"]  # a different, noisier code was decoded


def test_rate_latent_is_the_code_blurred_at_logsnr_max():
  config, method, state, images, _ = gaussian_setup()
  z0 = jnp.tile(jnp.array([[2.0, -1.0, 0.0, 0.5]]), (20_000, 1))
  x = jnp.zeros((20_000, 8, 8, 1))
  zq = method.rate_latent(state.params, x, z0, jax.random.key(1))
  var0 = 1.0 / (1.0 + math.exp(8.0))  # σ_0² = sigmoid(−λ_max)
  np.testing.assert_allclose(zq.mean(0), math.sqrt(1.0 - var0) * z0[0], atol=4e-4)
  np.testing.assert_allclose(zq.std(0), math.sqrt(var0), rtol=0.03)


def test_rate_curve_is_the_kl_of_the_code_blurred_at_each_floor():
  config, method, state, images, mu = gaussian_setup()
  floors = (8.0, 4.0, 0.0)
  curve = evaluate.rate_curve(config, method, state.params, images, floors,
                              jax.random.key(5))
  for floor, rate, point in zip(floors, curve["rate_nats"], curve["point_mass_nats"]):
    target = blurred_kl(mu, floor)
    assert abs(rate - target) < 0.02 * target, (floor, rate, target)
    # a point mass at z⁰ ~ N(μ, s²): E ½ Σ (α² z⁰² + σ² − 1 − log σ²), closed form in μ, s
    a2, s2 = 1.0 / (1.0 + math.exp(-floor)), 1.0 / (1.0 + math.exp(floor))
    expected = float(np.mean(0.5 * np.sum(a2 * (mu**2 + S**2) + s2 - 1.0 - math.log(s2), -1)))
    np.testing.assert_allclose(point, expected, rtol=0.01)
  assert np.all(np.diff(curve["rate_nats"]) < 0)  # less blur, more nats
  with pytest.raises(ValueError, match="logsnr_max"):
    evaluate.rate_curve(config, method, state.params, images, (9.0,), jax.random.key(5))


def test_vae_rate_latent_samples_its_posterior_and_zk_is_its_refined_mean():
  config = tiny.get_config()
  config.method = "vae"
  config.bottleneck.beta = 4.0
  method = baselines.VAE(config, (8, 8, 1))
  state = jax.jit(method.init_state)(jax.random.key(0))
  n = 8000
  x = jnp.tile(jax.random.uniform(jax.random.key(1), (1, 8, 8, 1), minval=-1.0), (n, 1, 1, 1))
  mean, log_var = method.encoder.apply(state.params["encoder"], x[:1])
  zq = jax.jit(method.rate_latent)(state.params, x, None, jax.random.key(2))
  np.testing.assert_allclose(zq.mean(0), mean[0],
                             atol=4 * float(jnp.exp(0.5 * log_var).max()) / math.sqrt(n))
  np.testing.assert_allclose(zq.var(0), jnp.exp(log_var[0]), rtol=4 * math.sqrt(2 / n))

  @jax.jit
  def refine(params, x, key):
    lat = method.latents(params, x, key, 20)
    # U = NLL/β + ½‖z‖², the energy of diffenc's E-step chain
    energy = lambda z: (method.decoder.nll(params["decoder"], x, z, None) / 4.0
                        + 0.5 * jnp.sum(z**2, -1))
    return lat, energy(lat["z0"]).mean(), energy(lat["zK"]).mean()

  lat, u0, uk = refine(state.params, x[:64], jax.random.key(3))
  np.testing.assert_allclose(lat["z0"], jnp.tile(mean, (64, 1)), rtol=1e-5, atol=1e-6)
  assert float(jnp.mean(jnp.sum((lat["zK"] - lat["z0"]) ** 2, -1))) > 1e-3  # the chain moved,
  assert float(uk) < float(u0)  # downhill on average (from an untrained encoder's mean)
  assert float(lat["info"].accept_rate) > 0.0

  def no_refine(params, x, key):
    lat = method.latents(params, x, key, 0)
    assert lat["info"] is None and lat["zK"] is lat["z0"]
    return lat["z0"]

  jax.eval_shape(no_refine, state.params, x[:4], jax.random.key(3))
