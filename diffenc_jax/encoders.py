"""Encoders q_φ(z | x) as pieces that a method composes with a decoder and a training rule.

An encoder holds its network and its static settings, and offers pure functions of its own
parameters:

    params = enc.init(key)
    z0 = enc.encode(params, x, key)                  # (B, d) its code of x (B, ...)
    z = enc.train_code(params, x, key)               # (B, d) the code a loss through it sees
    rate = enc.rate(params, x, z0, key, n)           # (B,) nats: the KL to the prior of ...
    zq = enc.rate_latent(params, x, z0, key)         # (B, d) ... this variable (same key)
    z = enc.sample_prior(key, n)                     # (n, d) codes from its prior

    LatentDiffusionEncoder  q_φ(z|x) a latent diffusion conditioned on image features
                            (`models.LatentDenoiser`): encode by latent DDIM, `loss` the
                            denoising loss on (x, z), rate the diffusion KL (`path_rate`)
    GaussianEncoder         N(μ(x), diag σ²(x)) (`models.MeanLogVarEncoder`): encode μ,
                            train_code a reparameterised sample, rate the analytic KL
    DeterministicEncoder    z = E(x) (`models.ConvEncoder`, or `models.ResNetEncoder` with
                            diffae.encoder='resnet'): rate +∞
    BernoulliEncoder        d bits of `models.ConvEncoder` logits: relaxed in training
                            (dmz.temperature, straight_through), hard 1[logits > 0] otherwise;
                            rate d ln 2 against Bernoulli(½)^d
    PIECES                  the table of them by kind (`methods.TABLE`'s encoder column)
    DiffusionCodeMethod     what a method holding the latent diffusion piece as `self.q`
                            offers of it
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from diffenc_jax import losses, models, path_rate, samplers, schedules

Array = jax.Array


class LatentDiffusionEncoder:
  """q_φ(z|x): a latent diffusion on the latent schedule (config.schedule) whose denoiser sees
  image features h(x) (`models.LatentDenoiser`: model.enc_channels, enc_features, enc_hidden,
  enc_blocks; its output a model.enc_parameterization prediction), sampled by latent DDIM
  (config.encoder_sampler)."""

  @staticmethod
  def validate(config) -> None:
    """Raises ValueError with one line on a bad config of the latent diffusion encoder
    (model.enc_parameterization, enc_weighting; encoder_sampler; model.enc_noise_draws)."""
    m, s = config.model, config.encoder_sampler

    def require(ok, message):
      if not ok:
        raise ValueError(message)

    require(m.enc_parameterization in losses.PARAMETERIZATIONS,
            f"unknown model.enc_parameterization {m.enc_parameterization!r}; "
            f"choose one of {losses.PARAMETERIZATIONS}")
    require(m.enc_weighting in losses.WEIGHTINGS,
            f"unknown model.enc_weighting {m.enc_weighting!r}; choose one of {losses.WEIGHTINGS}")
    require(s.num_steps >= 1, f"encoder_sampler.num_steps must be >= 1, got {s.num_steps}")
    require(0 <= s.eta <= 1, f"encoder_sampler.eta must be in [0, 1], got {s.eta}")
    require(s.clip > 0, f"encoder_sampler.clip must be > 0, got {s.clip}")
    require(config.model.enc_noise_draws >= 1,
            f"model.enc_noise_draws must be >= 1, got {config.model.enc_noise_draws}")

  def __init__(self, config, data_shape: tuple[int, ...]):
    m = config.model
    self.config = config
    self.data_shape = tuple(data_shape)
    self.latent_dim = m.latent_dim
    self.schedule = schedules.get_schedule(**config.schedule)
    self.network = models.LatentDenoiser(
        latent_dim=m.latent_dim, channels=tuple(m.enc_channels), feature_dim=m.enc_features,
        hidden=m.enc_hidden, num_blocks=m.enc_blocks)

  def init(self, key: Array):
    z, t = jnp.zeros((1, self.latent_dim)), jnp.zeros((1,))
    return self.network.init(key, z, t, jnp.zeros((1,) + self.data_shape))

  def features(self, params, x: Array) -> Array:
    """The image features h(x) (B, F) the denoiser is conditioned on."""
    return self.network.apply(params, x, method="features")

  def eps_fn(self, params, h: Array):
    """ε̂(z_t, t) of the encoder for precomputed image features h (B, F)."""
    param = self.config.model.enc_parameterization

    def eps_fn(z_t, t):
      out = self.network.apply(params, z_t, t, h, method="denoise")
      return losses.eps_from_prediction(out, z_t, t, self.schedule, param)

    return eps_fn

  def encode(self, params, x: Array, key: Array, num_steps: int | None = None,
             deterministic: bool = False) -> Array:
    """z⁰ ~ q_φ(·|x): the features h(x) once, then latent DDIM. x (B, ...) → (B, d).
    deterministic=True: DDIM with η = 0 from z_1 = 0, a deterministic code of x."""
    s = self.config.encoder_sampler
    shape = (x.shape[0], self.latent_dim)
    return samplers.latent_ddim(self.eps_fn(params, self.features(params, x)), key, shape,
                                self.schedule, num_steps or s.num_steps,
                                eta=0.0 if deterministic else s.eta, clip=s.clip,
                                x_init=jnp.zeros(shape) if deterministic else None)

  def train_code(self, params, x: Array, key: Array) -> Array:
    """z⁰ ~ q_φ(·|x) by latent DDIM (`encode`), differentiable in φ through the sampler."""
    return self.encode(params, x, key)

  def sample_prior(self, key: Array, n: int) -> Array:
    """n codes (n, d) from the prior N(0, I)."""
    return jax.random.normal(key, (n, self.latent_dim))

  def loss(self, params, x: Array, z: Array, key: Array) -> Array:
    """Mean denoising loss of the encoder on the pairs (x, z), averaged over
    `model.enc_noise_draws` draws of (t, ε) per pair: the features h(x) are computed once
    and shared, so extra draws cost only the small latent MLP."""
    n = self.config.model.enc_noise_draws
    h = jnp.repeat(self.features(params, x), n, axis=0)
    return losses.denoising_loss(self.eps_fn(params, h), jnp.repeat(z, n, axis=0), key,
                                 self.schedule, weighting=self.config.model.enc_weighting).mean()

  def rate(self, params, x: Array, z0: Array, key: Array, num_samples: int,
           log_snr_max: float | Array | None = None) -> Array:
    """Rate per example (B,), nats, of the variable `rate_latent(params, x, z0, key)` (the same
    key gives the same variable). eval.rate_estimator chooses:
      path_kl       the path KL of the encoder's ancestral sampler (eval.rate_steps steps,
                    eval.rate_spacing) against the prior's, plus its terminal term
                    (`path_rate.ancestral_path_rate`): an upper bound on the KL of that
                    sampler's last noisy state; z0 and num_samples are not used;
      diffusion_kl  the forward-noised estimate from z0 (`losses.rate_estimate`, num_samples
                    draws), the KL of z0 blurred at λ_max only where ε̂ is the exact predictor.
    log_snr_max (diffusion_kl only, and chosen by giving it): integrate from that log-SNR."""
    if log_snr_max is None and path_rate.estimator(self.config) == "path_kl":
      return self.path(params, x, key)["rate"]
    eps_fn = self.eps_fn(params, self.features(params, x))
    return losses.rate_estimate(eps_fn, z0, key, self.schedule, num_samples, log_snr_max)

  def path(self, params, x: Array, key: Array) -> dict[str, Array]:
    """`path_rate.encoder_path` of the encoder's ancestral sampler on x: its rate and code."""
    return path_rate.encoder_path(self, self.eps_fn(params, self.features(params, x)), x, key)

  def rate_and_latent(self, params, x: Array, z0: Array, key: Array,
                      num_samples: int) -> tuple[Array, Array]:
    """(`rate`, `rate_latent`) under one key, the encoder's path run once."""
    if path_rate.estimator(self.config) == "path_kl":
      out = self.path(params, x, key)
      return out["rate"], out["code"]
    return (self.rate(params, x, z0, key, num_samples),
            self.rate_latent(params, x, z0, key))

  def rate_latent(self, params, x: Array, z0: Array, key: Array) -> Array:
    """The variable whose KL `rate` reports (B, d): with eval.rate_estimator = path_kl the last
    noisy state of the encoder's ancestral sampler on the rate's grid (z0 unused); with
    diffusion_kl z̃ = α_0 z0 + σ_0 ε, z0 blurred at the latent schedule's t = 0 (log-SNR λ_max,
    σ_0² = sigmoid(−λ_max))."""
    if path_rate.estimator(self.config) == "path_kl":
      return self.path(params, x, key)["code"]
    alpha0, sigma0 = self.schedule.alpha_sigma(jnp.zeros(()))
    return alpha0 * z0 + sigma0 * jax.random.normal(key, z0.shape, z0.dtype)


class _Network:
  """What the one-network encoders share: `init` of the network on a zero image of data_shape
  and the prior N(0, I)."""

  network = None

  def __init__(self, config, data_shape: tuple[int, ...]):
    self.config = config
    self.data_shape = tuple(data_shape)
    self.latent_dim = config.model.latent_dim

  def init(self, key: Array):
    return self.network.init(key, jnp.zeros((1,) + self.data_shape))

  def sample_prior(self, key: Array, n: int) -> Array:
    """n codes (n, d) from the prior N(0, I)."""
    return jax.random.normal(key, (n, self.latent_dim))

  def rate_latent(self, params, x: Array, z0: Array, key: Array) -> Array:
    """The variable whose KL `rate` reports: the code z0 itself."""
    del params, x, key
    return z0


class GaussianEncoder(_Network):
  """q(z|x) = N(μ(x), diag e^{log_var(x)}) by `models.MeanLogVarEncoder(model.enc_channels,
  model.enc_features)`; prior N(0, I)."""

  def __init__(self, config, data_shape: tuple[int, ...]):
    super().__init__(config, data_shape)
    m = config.model
    self.network = models.MeanLogVarEncoder(m.latent_dim, tuple(m.enc_channels), m.enc_features)

  def moments(self, params, x: Array) -> tuple[Array, Array]:
    """(μ(x), log σ²(x)), each (B, d)."""
    return self.network.apply(params, x)

  def encode(self, params, x: Array, key: Array | None = None, num_steps: int | None = None,
             deterministic: bool = False) -> Array:
    """The posterior mean μ(x) (B, d): its best single code."""
    del key, num_steps, deterministic
    return self.moments(params, x)[0]

  def train_code(self, params, x: Array, key: Array) -> Array:
    """A reparameterised sample z = μ + σ ε of q(z|x) (B, d)."""
    mean, log_var = self.moments(params, x)
    return mean + jnp.exp(0.5 * log_var) * jax.random.normal(key, mean.shape, mean.dtype)

  def rate(self, params, x: Array, z0: Array, key: Array, num_samples: int) -> Array:
    """KL(q(z|x) ‖ N(0, I)) per example (B,), nats, in closed form."""
    del z0, key, num_samples
    return losses.gaussian_kl(*self.moments(params, x))

  def rate_latent(self, params, x: Array, z0: Array, key: Array) -> Array:
    """The variable whose KL `rate` reports: a sample of q(z|x) (`train_code`)."""
    del z0
    return self.train_code(params, x, key)


DETERMINISTIC_NETWORKS = ("conv", "resnet")


class DeterministicEncoder(_Network):
  """z = E(x): `models.ConvEncoder(model.enc_channels, model.enc_features)`, or with
  diffae.encoder='resnet' `models.ResNetEncoder(diffae.resnet_*)` (DiffAE's semantic encoder).
  Its rate is +∞: a deterministic code carries unbounded information about x."""

  @staticmethod
  def validate(config) -> None:
    """Raises ValueError with one line on a bad choice of network (diffae.encoder)."""
    name = config.diffae.encoder
    if name not in DETERMINISTIC_NETWORKS:
      raise ValueError(f"unknown diffae.encoder {name!r}; choose one of "
                       f"{DETERMINISTIC_NETWORKS}")
    if name == "resnet" and config.data.name == "toy2d":
      raise ValueError("diffae.encoder='resnet' needs image data")

  def __init__(self, config, data_shape: tuple[int, ...]):
    super().__init__(config, data_shape)
    self.validate(config)
    m, d = config.model, config.diffae
    if d.encoder == "resnet":
      self.network = models.ResNetEncoder(
          m.latent_dim, channels=d.resnet_channels, channel_mult=tuple(d.resnet_channel_mult),
          num_res_blocks=d.resnet_num_res_blocks,
          attn_resolutions=tuple(d.resnet_attn_resolutions))
    else:
      self.network = models.ConvEncoder(m.latent_dim, tuple(m.enc_channels), m.enc_features)

  def encode(self, params, x: Array, key: Array | None = None, num_steps: int | None = None,
             deterministic: bool = False) -> Array:
    """z = E(x) (B, d)."""
    del key, num_steps, deterministic
    return self.network.apply(params, x)

  def train_code(self, params, x: Array, key: Array | None = None) -> Array:
    """z = E(x) (B, d)."""
    return self.encode(params, x)

  def rate(self, params, x: Array, z0: Array, key: Array, num_samples: int) -> Array:
    """+∞ per example (B,)."""
    del params, z0, key, num_samples
    return jnp.full((x.shape[0],), jnp.inf)


class BernoulliEncoder(_Network):
  """d bits whose logits are `models.ConvEncoder(model.enc_channels, model.enc_features)`'s
  output. Training codes are soft: z = sigmoid((logits + s L)/τ), L ~ Logistic(0, 1) (binary
  concrete, τ = dmz.temperature, s = dmz.noise_scale), or with dmz.straight_through that sample
  rounded to {0, 1} with its gradient; codes otherwise hard, 1[logits > 0]. Prior
  Bernoulli(½)^d, so the rate is d ln 2 (what d bits can carry at most)."""

  @staticmethod
  def validate(config) -> None:
    """Raises ValueError with one line on a bad relaxation (dmz.temperature)."""
    if not config.dmz.temperature > 0:
      raise ValueError(f"dmz.temperature must be > 0, got {config.dmz.temperature}")

  def __init__(self, config, data_shape: tuple[int, ...]):
    super().__init__(config, data_shape)
    m = config.model
    self.network = models.ConvEncoder(m.latent_dim, tuple(m.enc_channels), m.enc_features)

  def encode(self, params, x: Array, key: Array | None = None, num_steps: int | None = None,
             deterministic: bool = False) -> Array:
    """Hard bits 1[logits > 0] (B, d)."""
    del key, num_steps, deterministic
    return models.hard_bernoulli(self.network.apply(params, x))

  def train_code(self, params, x: Array, key: Array) -> Array:
    """Relaxed bits (B, d) in (0, 1) (hard forward with dmz.straight_through)."""
    d = self.config.dmz
    soft = models.relaxed_bernoulli(key, self.network.apply(params, x), d.temperature,
                                    d.noise_scale)
    if d.straight_through:  # hard bits forward, the soft ones' gradient
      return soft + jax.lax.stop_gradient(jnp.round(soft) - soft)
    return soft

  def rate(self, params, x: Array, z0: Array, key: Array, num_samples: int) -> Array:
    """d ln 2 per example (B,), nats."""
    del params, z0, key, num_samples
    return jnp.full((x.shape[0],), self.latent_dim * math.log(2.0))

  def sample_prior(self, key: Array, n: int) -> Array:
    """n codes (n, d) from the prior Bernoulli(½)^d."""
    return jax.random.bernoulli(key, 0.5, (n, self.latent_dim)).astype(jnp.float32)


class DiffusionCodeMethod:
  """What a method whose code comes from `LatentDiffusionEncoder` (`self.q`) and whose samples
  come through `self.prior` (None: N(0, I)) offers of them: the encoder's network, its codes
  and its rate, and latents to decode. Shared by EM (`em.DiffusionEncoder`) and its one-loss
  ablation (`joint.DiffusionEncoderJoint`), which compose the same pieces under other rules."""

  q: LatentDiffusionEncoder
  prior = None
  latent_dim: int

  @property
  def encoder(self):
    """The encoder's network (`models.LatentDenoiser`): `self.q.network`."""
    return self.q.network

  @encoder.setter
  def encoder(self, network):
    self.q.network = network

  def encode(self, enc_params, x: Array, key: Array, num_steps: int | None = None,
             deterministic: bool = False) -> Array:
    """z⁰ ~ q_φ(·|x) (B, d) by latent DDIM (deterministic=True: η = 0 from z_1 = 0)."""
    return self.q.encode(enc_params, x, key, num_steps, deterministic)

  def rate(self, params, x: Array, z0: Array, key: Array, num_samples: int,
           log_snr_max: float | Array | None = None) -> Array:
    """Rate per example (B,), nats, of `rate_latent(params, x, z0, key)` (`q.rate`)."""
    return self.q.rate(params["encoder"], x, z0, key, num_samples, log_snr_max)

  def rate_and_latent(self, params, x: Array, z0: Array, key: Array,
                      num_samples: int) -> tuple[Array, Array]:
    """(`rate`, `rate_latent`) under one key, the encoder's path run once."""
    return self.q.rate_and_latent(params["encoder"], x, z0, key, num_samples)

  def rate_latent(self, params, x: Array, z0: Array, key: Array) -> Array:
    """The variable whose KL `rate` reports (B, d) (`q.rate_latent`)."""
    return self.q.rate_latent(params["encoder"], x, z0, key)

  def sample_latents(self, params, key: Array, n: int) -> Array:
    """n latents from the prior: N(0, I), or the fitted latent DDPM with em.latent_prior."""
    if self.prior is not None:
      return self.prior.sample(params["prior"], key, n, params.get("zstats"))
    return jax.random.normal(key, (n, self.latent_dim))


PIECES = {
    "diffusion": LatentDiffusionEncoder,
    "gaussian": GaussianEncoder,
    "deterministic": DeterministicEncoder,
    "bernoulli": BernoulliEncoder,
}
