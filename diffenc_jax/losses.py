"""Pure loss functions, per example, with no training machinery.

Every function here returns per-example values of shape (B,), so that callers can weight,
average or inspect them. Networks enter as closures: `eps_fn(x_t, t) -> ε̂` with x_t of shape
(B, ...) and t of shape (B,), already bound to parameters (and to the conditioning: the latent
z for a decoder, the image features h(x) for the encoder).

Notation (see `schedules.py`): x_t = α_t x_0 + σ_t ε, λ_t = log(α_t²/σ_t²), λ'(t) = dλ/dt < 0.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from diffenc_jax.schedules import Schedule

Array = jax.Array
EpsFn = Callable[[Array, Array], Array]

WEIGHTINGS = ("unit", "vlb", "x0", "v", "p2", "min_snr")
PARAMETERIZATIONS = ("eps", "x0", "v")


def _sum_per_example(x: Array) -> Array:
  return jnp.sum(x.reshape(x.shape[0], -1), axis=-1)


def _bcast(v: Array, x: Array) -> Array:
  """Reshapes per-example v (B,) to broadcast against x (B, ...)."""
  return v.reshape(v.shape + (1,) * (x.ndim - 1))


def sample_times(key: Array, shape: tuple[int, ...], stratified: bool = False) -> Array:
  """Draws t ~ U(0, 1) of `shape`; stratified=True spreads the last axis over [0, 1).

  With stratification the n draws along the last axis are (u + i/n) mod 1 for one uniform u
  per row: each draw is still marginally uniform, but together they cover the interval evenly
  (VDM's low-discrepancy sampler), which cuts the variance of integrals over t.
  """
  if not stratified:
    return jax.random.uniform(key, shape)
  n = shape[-1]
  u = jax.random.uniform(key, shape[:-1] + (1,))
  return jnp.mod(u + jnp.arange(n) / n, 1.0)


def eps_from_prediction(out: Array, x_t: Array, t: Array, schedule: Schedule,
                        parameterization: str) -> Array:
  """ε̂ from a network's raw output, for latents (B, d) or images (B, H, W, C); t (B,).

  'eps': ε̂ = out; 'x0': out = x̂_0, ε̂ = (x_t − α x̂_0)/σ; 'v': out = v̂ = α ε̂ − σ x̂_0, so
  ε̂ = σ x_t + α v̂ (x_t = α x_0 + σ ε and α² + σ² = 1).
  """
  if parameterization == "eps":
    return out
  if parameterization not in PARAMETERIZATIONS:
    raise ValueError(f"unknown parameterization {parameterization!r}; "
                     f"choose one of {PARAMETERIZATIONS}")
  alpha, sigma = (_bcast(a, x_t) for a in schedule.alpha_sigma(t))
  if parameterization == "x0":
    return (x_t - alpha * out) / sigma
  return sigma * x_t + alpha * out


def loss_weight(weighting: str, schedule: Schedule, t: Array, gamma: float = 1.0) -> Array:
  """The weight w(t) (shape of t) that a weighting puts on the ε-MSE ‖ε − ε̂‖².

  With SNR = e^λ:
    'unit'     1: the plain ε-MSE (DDPM's "simple" loss);
    'vlb'      −λ'(t)/2: its expectation over t ~ U(0, 1) is the diffusion term of the
               continuous-time ELBO (nats);
    'x0'       1/SNR: the MSE of the implied x̂_0 = (x_t − σ ε̂)/α;
    'v'        1 + 1/SNR = 1/α²: the MSE of the implied v̂ (v-prediction's loss);
    'p2'       1/(1 + SNR)^γ: P2 weighting (k = 1), less weight at low noise;
    'min_snr'  min(SNR, γ)/SNR: min-SNR-γ, the ε-MSE capped at low noise.
  The image decoder's training weighting is chosen separately from the ELBO's ('vlb'), which
  is what an NLL in nats needs.
  """
  if weighting not in WEIGHTINGS:
    raise ValueError(f"unknown weighting {weighting!r}; choose one of {WEIGHTINGS}")
  if weighting == "unit":
    return jnp.ones_like(jnp.asarray(t, jnp.float32))
  if weighting == "vlb":
    return -0.5 * schedule.dlog_snr_dt(t)
  lam = schedule.log_snr(t)
  if weighting == "x0":
    return jnp.exp(-lam)
  if weighting == "v":
    return 1.0 + jnp.exp(-lam)
  if weighting == "p2":
    return jnp.exp(-gamma * jax.nn.softplus(lam))  # (1 + e^λ)^(−γ), overflow-free
  return jnp.minimum(1.0, gamma * jnp.exp(-lam))  # min(SNR, γ)/SNR


def denoising_loss(
    eps_fn: EpsFn,
    x0: Array,
    key: Array,
    schedule: Schedule,
    *,
    weighting: str = "unit",
    gamma: float = 1.0,
    input_perturbation: float = 0.0,
    t: Array | None = None,
    parameterization: str = "eps",
) -> Array:
  """Weighted ε-prediction loss w(t) ‖ε − ε̂(α_t x_0 + σ_t ε, t)‖², summed over dimensions.
  Shape (B,).

  Args:
    eps_fn: (x_t (B, ...), t (B,)) -> the network's output (B, ...): ε̂ itself, or with
      `parameterization` 'v' / 'x0' its v̂ / x̂_0, converted to ε̂ here by `eps_from_prediction`
      at the clean x_t.
    x0: clean data, latents (B, d) or images (B, H, W, C).
    key: PRNG key for t and ε.
    schedule: the noise schedule.
    weighting, gamma: the weight w(t), see `loss_weight` ('unit' is the usual DDPM objective;
      'v' on a v-predicting network is its v-MSE).
    input_perturbation: DDPM-IP's γ: the network sees α_t x_0 + σ_t (ε + γ ξ) but must still
      predict the clean sample's ε (0 disables it). For a v or x₀ network the target is the
      clean sample's v or x₀: its output is converted at the clean x_t, so with the 'v'
      weighting the loss is ‖v − v̂‖² exactly (converted at the perturbed x_t, the ε error
      would carry σ²γξ, which 1/α² blows up at high noise).
    t: optional times (B,) in [0, 1]; drawn uniformly when None.
    parameterization: what eps_fn returns: 'eps' (default), 'v' or 'x0'.
  """
  if weighting not in WEIGHTINGS:
    raise ValueError(f"unknown weighting {weighting!r}; choose one of {WEIGHTINGS}")
  key_t, key_eps, key_ip = jax.random.split(key, 3)
  if t is None:
    t = jax.random.uniform(key_t, (x0.shape[0],))
  eps = jax.random.normal(key_eps, x0.shape, x0.dtype)
  alpha, sigma = schedule.alpha_sigma(t)
  noise = eps
  if input_perturbation:
    noise = eps + input_perturbation * jax.random.normal(key_ip, x0.shape, x0.dtype)
  x_t = _bcast(alpha, x0) * x0 + _bcast(sigma, x0) * noise
  eps_hat = eps_fn(x_t, t)
  if parameterization != "eps":
    x_clean = x_t if not input_perturbation else _bcast(alpha, x0) * x0 + _bcast(sigma, x0) * eps
    eps_hat = eps_from_prediction(eps_hat, x_clean, t, schedule, parameterization)
  loss = _sum_per_example(jnp.square(eps - eps_hat))
  if weighting == "unit":
    return loss
  return loss_weight(weighting, schedule, t, gamma) * loss


def gaussian_nll(x: Array, mean: Array, sigma: float | Array) -> Array:
  """−log N(x; mean, σ² I) in nats, summed over all but the batch axis. Shape (B,).

  σ may be a scalar or broadcast against x.
  """
  sigma = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), x.shape)
  nll = 0.5 * jnp.square((x - mean) / sigma) + jnp.log(sigma) + 0.5 * math.log(2 * math.pi)
  return _sum_per_example(nll)


def gaussian_kl(mean: Array, log_var: Array) -> Array:
  """KL(N(mean, diag e^{log_var}) ‖ N(0, I)) in nats. Shapes (B, d) -> (B,)."""
  return 0.5 * _sum_per_example(jnp.square(mean) + jnp.exp(log_var) - 1.0 - log_var)


def _integrate_over_log_snr(integrand, batch, key, schedule, num_samples, lam_max=None):
  """Monte-Carlo estimate of ½ ∫₀¹ −λ'(t) integrand(t) dt per example, shape (B,).

  The substitution dλ = λ'(t) dt turns it into ½ ∫ integrand dλ over [λ_min, λ_max]: we draw
  λ uniformly (stratified over the `num_samples` draws) and map it back to t. This is
  importance sampling in t with density ∝ −λ'(t); for the cosine schedule, whose −λ'(t) is
  sharply peaked at both ends, it cuts the variance by an order of magnitude.
  `integrand(key, t (B,)) -> (B,)`. `lam_max` (default: the schedule's λ(0)) truncates the
  integral at a lower log-SNR: it then runs over t ∈ [t(lam_max), 1].
  """
  lam_min = schedule.log_snr(jnp.ones(()))
  if lam_max is None:
    lam_max = schedule.log_snr(jnp.zeros(()))
  key_t, key_draws = jax.random.split(key)
  u = sample_times(key_t, (batch, num_samples), stratified=True)
  t = schedule.t_of_log_snr(lam_max + (lam_min - lam_max) * u)
  values = jax.lax.map(lambda args: integrand(*args),
                       (jax.random.split(key_draws, num_samples), t.T))
  return 0.5 * (lam_max - lam_min) * jnp.mean(values, axis=0)


def _vp_prior_kl(x0: Array, schedule: Schedule) -> Array:
  """KL(q(x_1 | x_0) ‖ N(0, I)) for the VP forward process, per example (B,)."""
  alpha1, sigma1 = schedule.alpha_sigma(jnp.ones(()))
  var1 = jnp.square(sigma1)
  return 0.5 * _sum_per_example(jnp.square(alpha1 * x0) + var1 - 1.0 - jnp.log(var1))


def diffusion_nll_bound(
    eps_fn: EpsFn,
    x0: Array,
    key: Array,
    schedule: Schedule,
    num_samples: int = 1,
) -> Array:
  """Continuous-time ELBO bound on −log p(x_0), in nats per example. Shape (B,).

  For a z-conditioned decoder, `eps_fn` closes over z and this bounds −log p(x | z).
  The bound (VDM, Kingma et al. 2021) is the sum of
    - the diffusion term ½ E_{t, ε}[−λ'(t) ‖ε − ε̂(x_t, t)‖²], Monte-Carlo estimated with
      `num_samples` stratified draws per example, uniform in log-SNR;
    - the prior term KL(q(x_1 | x_0) ‖ N(0, I));
    - the reconstruction term −E log N(x_0; x_{t0}/α_{t0}, σ_{t0}²/α_{t0}² I) at t0 = 0,
      which in expectation over x_{t0} is d/2 · (log(2π σ²/α²) + 1).
  It is a bound on the continuous density of x_0 (not a discretised likelihood), so it can
  be negative.
  """
  def integrand(k, t):
    return denoising_loss(eps_fn, x0, k, schedule, weighting="unit", t=t)

  diffusion = _integrate_over_log_snr(integrand, x0.shape[0], key, schedule, num_samples)
  alpha0, sigma0 = schedule.alpha_sigma(jnp.zeros(()))
  d = math.prod(x0.shape[1:])
  recon = 0.5 * d * (jnp.log(2 * math.pi * jnp.square(sigma0 / alpha0)) + 1.0)
  return diffusion + _vp_prior_kl(x0, schedule) + recon


def rate_estimate(
    eps_fn: EpsFn,
    z0: Array,
    key: Array,
    schedule: Schedule,
    num_samples: int = 1,
    log_snr_max: float | Array | None = None,
) -> Array:
  """Diffusion-KL rate KL(q(z | x) ‖ N(0, I)) in nats, one estimate per example. Shape (B,).

  z0 (B, d) holds one sample per example of q(·|x) (the encoder's own samples), and
  `eps_fn(z_t, t)` is the encoder's noise prediction conditioned on the same x. With the VP
  forward process the stationary law is N(0, I) and
      d/dt KL(q_t ‖ N(0, I)) = −(β(t)/2) E ‖∇log q_t(z) + z‖²,   β(t) = −λ'(t) σ_t²,
  so with the model's score −ε̂/σ_t,
      R = E_{t ~ U(0,1), ε} [ ½ (−λ'(t)) ‖σ_t z_t − ε̂(z_t, t)‖² ] + KL(q_1 ‖ N(0, I)),
  z_t = α_t z_0 + σ_t ε (docs/method.md §1.8). The last term is of order α_1² and dropped. Each of the
  `num_samples` draws uses its own (t, ε); t is drawn uniformly in log-SNR, stratified. The expectation over
  z0 ~ q(·|x) is the caller's: pass several z0 per x and average.

  What it estimates (docs/method.md §1.8, docs/rate.md): the integral starts at the schedule's t = 0,
  where the log-SNR is λ_max, not ∞, so it is the KL of the *blurred* code
  z̃ = α_0 z_0 + σ_0 ε (σ_0² = sigmoid(−λ_max)), not of z_0 itself: for q = N(μ, s² I) that is
  KL(N(α_0 μ, (α_0² s² + σ_0²) I) ‖ N(0, I)). `log_snr_max` (≤ the schedule's λ_max) starts
  the integral at a lower log-SNR instead: the KL of the code blurred at that floor.
  """
  def integrand(k, t):
    alpha, sigma = schedule.alpha_sigma(t)
    z_t = alpha[:, None] * z0 + sigma[:, None] * jax.random.normal(k, z0.shape, z0.dtype)
    return _sum_per_example(jnp.square(sigma[:, None] * z_t - eps_fn(z_t, t)))

  return _integrate_over_log_snr(integrand, z0.shape[0], key, schedule, num_samples,
                                 log_snr_max)


def vae_loss(
    nll_fn: Callable[[Array], Array],
    mean: Array,
    log_var: Array,
    key: Array,
    beta: float = 1.0,
) -> dict[str, Array]:
  """β-VAE loss with a Gaussian encoder and the analytic KL. Each entry has shape (B,).

  Args:
    nll_fn: z (B, d) -> −log p(x | z) (B,), the decoder's negative log likelihood, closing
      over x.
    mean, log_var: the encoder's Gaussian q(z | x), each (B, d).
    key: PRNG key for the reparameterised sample z = mean + e^{log_var/2} ε.
    beta: weight of the KL term.
  Returns:
    {'loss': nll + β kl, 'nll': nll, 'kl': kl, 'z': the sample (B, d)}.
  """
  z = mean + jnp.exp(0.5 * log_var) * jax.random.normal(key, mean.shape, mean.dtype)
  nll = nll_fn(z)
  kl = gaussian_kl(mean, log_var)
  return {"loss": nll + beta * kl, "nll": nll, "kl": kl, "z": z}
