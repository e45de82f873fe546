"""Decoders p_θ(x | z) as first-class pieces that every method composes with an encoder.

A decoder holds its network and its static settings, and offers pure functions of explicit
parameters:

    params = dec.init(key)
    nll = dec.nll(params, x, z, key)            # (B,) −log p_θ(x|z) in nats, or its ELBO bound
    energy = dec.energy_fn(params, x, key, z0, estimator=lv)     # z ↦ (B,) the E-step's U(z)
    prec = dec.precision_fn(params, x, key, β, c, estimator=lv)  # z ↦ (B, d, d) its precision
    loss = dec.loss(params, x, z, key)          # (B,) the training loss of the decoder
    x_hat = dec.decode(params, z, key)          # (B, ...) a reconstruction / sample given z

U(z) is −log p_θ(x|z) up to a constant, H its Gauss-Newton precision; the diffusion decoder
estimates both as the E-step's chain says (`estimator` lv, an em.langevin-like section: its
draws, proposal, noise levels), so the decoder reads no section of the E-step's own.

    GaussianDecoder   p(x|z) = N(μ_θ(z), σ_x² I): `mean`; NLL exact; loss = NLL (with dropout)
    DiffusionDecoder  a z-conditioned image diffusion with a U-Net or a transformer denoiser:
                      NLL bounded by the continuous-time ELBO (always weighted as the ELBO,
                      whatever the training weighting); loss = the configured weighting of the
                      ε-MSE for the configured parameterisation (ε / v / x₀); decode by image
                      DDIM from a random or given x_T; `encode_stochastic` inverts DDIM.

`build(config, data_shape)` picks one from config.model.decoder ('gaussian' | 'diffusion') and,
for the diffusion decoder, config.model.denoiser ('unet' | 'dit').
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffenc_jax import losses, models, posterior, samplers, schedules

Array = jax.Array
DECODERS = ("gaussian", "diffusion")
DENOISERS = ("unet", "dit")


class GaussianDecoder:
  """p_θ(x|z) = N(μ_θ(z), σ_x² I) with μ_θ = `models.MeanDecoder` (model.dec_arch: mlp | conv)."""

  kind = "gaussian"

  def __init__(self, config, data_shape: tuple[int, ...]):
    m = config.model
    self.data_shape = tuple(data_shape)
    self.latent_dim = m.latent_dim
    self.sigma_x = m.sigma_x
    self.dropout = m.dec_dropout
    self.convolutional = m.dec_arch == "conv" and len(self.data_shape) == 3
    self.network = models.MeanDecoder(image_shape=self.data_shape, arch=m.dec_arch,
                                      mlp_hidden=tuple(m.dec_hidden),
                                      channels=tuple(m.dec_channels), dropout=m.dec_dropout)

  def init(self, key: Array):
    return self.network.init(key, jnp.zeros((1, self.latent_dim)))

  def mean(self, params, z: Array) -> Array:
    """μ_θ(z) (B, ...) for z (B, d)."""
    return self.network.apply(params, z)

  def nll(self, params, x: Array, z: Array, key: Array | None = None) -> Array:
    """−log N(x; μ_θ(z), σ_x² I) per example (B,), nats (exact; key unused)."""
    del key
    return losses.gaussian_nll(x, self.mean(params, z), self.sigma_x)

  def energy_fn(self, params, x: Array, key: Array | None = None, z_ref: Array | None = None,
                estimator=None):
    """z (B, d) ↦ −log p_θ(x|z) (B,), the E-step's energy: the exact NLL."""
    del key, z_ref, estimator
    return lambda z: self.nll(params, x, z)

  def precision_fn(self, params, x: Array, key: Array | None, beta: float,
                   prior_precision: float, estimator=None):
    """z ↦ H (B, d, d) = JᵀJ/(σ_x² β) + prior_precision · I, J = ∂μ_θ/∂z
    (`samplers.gauss_newton_precision`)."""
    del x, key, estimator
    return samplers.gauss_newton_precision(lambda z: self.mean(params, z), self.sigma_x, beta,
                                           prior_precision=prior_precision)

  def loss(self, params, x: Array, z: Array, key: Array) -> Array:
    """The NLL with model.dec_dropout applied to the mean network (B,)."""
    mean = self.network.apply(params, z, train=self.dropout > 0, rngs={"dropout": key})
    return losses.gaussian_nll(x, mean, self.sigma_x)

  def decode(self, params, z: Array, key: Array | None = None, num_steps: int | None = None,
             x_T: Array | None = None) -> Array:
    """The mean μ_θ(z) (B, ...): the gaussian decoder's reconstruction."""
    del key, num_steps, x_T
    return self.mean(params, z)


class DiffusionDecoder:
  """A z-conditioned diffusion over images on config.image_schedule.

  Denoiser (model.denoiser): 'unet' (`models.UNetDecoder`, model.unet_*) or 'dit'
  (`models.DiTDenoiser`, model.dit_*). Its output is ε, v or x₀ (model.dec_parameterization),
  converted to ε̂ by `losses.eps_from_prediction`. Training loss: w(t)·‖ε − ε̂‖² with
  w = model.dec_weighting (γ = model.dec_weighting_gamma; `losses.loss_weight`); 'v' on a
  v-predicting denoiser is its v-MSE, which weights high noise (where x_t says little and z
  says most) far more than the unit ε-MSE. The NLL is the continuous-time ELBO
  (`losses.diffusion_nll_bound`), independent of the training weighting.
  """

  kind = "diffusion"

  def __init__(self, config, data_shape: tuple[int, ...]):
    m = config.model
    self.config = config
    self.data_shape = tuple(data_shape)
    self.latent_dim = m.latent_dim
    self.schedule = schedules.get_schedule(**config.image_schedule)
    self.parameterization = m.dec_parameterization
    self.weighting = m.dec_weighting
    self.gamma = m.dec_weighting_gamma
    self.convolutional = m.denoiser == "unet" and len(self.data_shape) == 3
    if m.denoiser == "dit":
      self.network = models.DiTDenoiser(
          image_shape=self.data_shape, patch_size=m.dit_patch_size, width=m.dit_width,
          depth=m.dit_depth, num_heads=m.dit_heads, latent_dim=m.latent_dim,
          dtype=m.get("dit_dtype", "float32"))
    else:
      self.network = models.UNetDecoder(
          image_shape=self.data_shape, channels=m.unet_channels,
          channel_mult=tuple(m.unet_channel_mult), num_res_blocks=m.unet_num_res_blocks,
          attn_resolutions=tuple(m.unet_attn_resolutions), emb_dim=m.unet_emb_dim,
          dropout=m.unet_dropout, conditioning=m.unet_conditioning, latent_dim=m.latent_dim)

  def init(self, key: Array):
    x = jnp.zeros((1,) + self.data_shape)
    return self.network.init(key, x, jnp.zeros((1,)), jnp.zeros((1, self.latent_dim)))

  def predict_fn(self, params, z: Array, train: bool = False, key: Array | None = None):
    """The denoiser's raw output (ε̂, v̂ or x̂₀) as a function of (x_t, t), given z (B, d).
    train=True with a key turns dropout on (U-Net)."""
    rngs = {"dropout": key} if train and key is not None else None
    return lambda x_t, t: self.network.apply(params, x_t, t, z, train=train, rngs=rngs)

  def eps_fn(self, params, z: Array):
    """ε̂(x_t, t) given z (B, d): the denoiser's output converted to ε."""
    predict = self.predict_fn(params, z)
    return lambda x_t, t: losses.eps_from_prediction(predict(x_t, t), x_t, t, self.schedule,
                                                     self.parameterization)

  def nll(self, params, x: Array, z: Array, key: Array, num_samples: int | None = None) -> Array:
    """Continuous-time ELBO bound on −log p_θ(x|z) per example (B,), nats; `num_samples`
    stratified (t, ε) draws (model.dec_nll_samples by default)."""
    n = num_samples or self.config.model.dec_nll_samples
    return losses.diffusion_nll_bound(self.eps_fn(params, z), x, key, self.schedule, n)

  def _eps3(self, params):
    """ε̂(x_t, t, z), the form `diffenc_jax.posterior` takes."""
    return lambda x_t, t, z: self.eps_fn(params, z)(x_t, t)

  def energy_fn(self, params, x: Array, key: Array, z_ref: Array | None = None, *,
                estimator):
    """z (B, d) ↦ the ELBO's diffusion term (B,), −log p_θ(x|z) up to a constant in z, with
    (λ, ε) drawn once from key and shared by every call (a deterministic U along a chain). The
    estimator's settings are the chain's (`estimator`, an em.langevin-like section): mc_samples
    draws, stratified, antithetic (antithetic), λ from proposal (centre / scale log_snr_center /
    log_snr_scale) with importance weights, and with control_variate the SVRG correction at
    z_ref (reference_samples draws). `posterior.diffusion_nll_fn`."""
    lv = estimator
    return posterior.diffusion_nll_fn(
        self._eps3(params), x, key, self.schedule, num_samples=lv.mc_samples,
        proposal=lv.proposal, antithetic=lv.antithetic, log_snr_center=lv.log_snr_center,
        log_snr_scale=lv.log_snr_scale,
        z_ref=z_ref if lv.control_variate else None, reference_samples=lv.reference_samples)

  def precision_fn(self, params, x: Array, key: Array, beta: float, prior_precision: float,
                   *, estimator):
    """z ↦ H (B, d, d): the Gauss-Newton precision of U from the denoiser's Jacobian in z at
    the chain's `estimator.gn_levels` noise levels around `estimator.log_snr_center`
    (`posterior.diffusion_gauss_newton_precision`)."""
    lv = estimator
    return posterior.diffusion_gauss_newton_precision(
        self._eps3(params), x, key, self.schedule, beta=beta, prior_precision=prior_precision,
        num_levels=lv.gn_levels, log_snr_center=lv.log_snr_center)

  def loss(self, params, x: Array, z: Array, key: Array,
           input_perturbation: float = 0.0) -> Array:
    """Weighted denoising loss (B,) on (x, z), dropout on; DDPM-IP's γ = input_perturbation."""
    k_loss, k_drop = jax.random.split(key)
    return losses.denoising_loss(self.predict_fn(params, z, True, k_drop), x, k_loss,
                                 self.schedule, weighting=self.weighting, gamma=self.gamma,
                                 input_perturbation=input_perturbation,
                                 parameterization=self.parameterization)

  def decode(self, params, z: Array, key: Array, num_steps: int | None = None,
             x_T: Array | None = None) -> Array:
    """x̂ (B, ...) by deterministic image DDIM (predicted x₀ clipped to [-1, 1]) from a random
    x_T, or from a given x_T (e.g. `encode_stochastic`'s); config.eval.decoder_steps steps."""
    return samplers.latent_ddim(self.eps_fn(params, z), key, (z.shape[0],) + self.data_shape,
                                self.schedule, num_steps or self.config.eval.decoder_steps,
                                eta=0.0, clip=1.0, x_init=x_T)

  def encode_stochastic(self, params, x: Array, z: Array, num_steps: int | None = None) -> Array:
    """x_T (B, ...) such that `decode(params, z, key, num_steps, x_T)` gives back ≈ x: DDIM
    inversion given z (DiffAE's stochastic encoding)."""
    return samplers.ddim_invert(self.eps_fn(params, z), x, self.schedule,
                                num_steps or self.config.eval.decoder_steps)


def build(config, data_shape: tuple[int, ...]):
  """The decoder named by config.model.decoder, for data of shape data_shape."""
  name = config.model.decoder
  if name == "gaussian":
    return GaussianDecoder(config, data_shape)
  if name == "diffusion":
    if config.model.denoiser not in DENOISERS:
      raise ValueError(f"unknown model.denoiser {config.model.denoiser!r}; choose one of "
                       f"{DENOISERS}")
    return DiffusionDecoder(config, data_shape)
  raise ValueError(f"unknown model.decoder {name!r}; choose one of {DECODERS}")


def validate(config) -> None:
  """Raises ValueError with one line on a bad decoder section of config.model (its decoder,
  σ_x, denoiser, parameterisation, weighting, transformer and U-Net conditioning)."""
  m = config.model

  def require(ok, message):
    if not ok:
      raise ValueError(message)

  require(m.decoder in DECODERS, f"unknown decoder {m.decoder!r}; choose one of {DECODERS}")
  require(m.sigma_x > 0, f"model.sigma_x must be > 0, got {m.sigma_x}")
  require(m.denoiser in DENOISERS,
          f"unknown model.denoiser {m.denoiser!r}; choose one of {DENOISERS}")
  require(m.dec_parameterization in losses.PARAMETERIZATIONS,
          f"unknown model.dec_parameterization {m.dec_parameterization!r}; "
          f"choose one of {losses.PARAMETERIZATIONS}")
  require(m.dec_weighting in losses.WEIGHTINGS,
          f"unknown model.dec_weighting {m.dec_weighting!r}; choose one of {losses.WEIGHTINGS}")
  require(m.dec_weighting_gamma > 0,
          f"model.dec_weighting_gamma must be > 0, got {m.dec_weighting_gamma}")
  if m.decoder == "diffusion" and m.denoiser == "dit":
    require(all(v > 0 for v in (m.dit_patch_size, m.dit_width, m.dit_depth, m.dit_heads)),
            "model.dit_patch_size, dit_width, dit_depth and dit_heads must be > 0")
    require(m.dit_width % m.dit_heads == 0,
            f"model.dit_width={m.dit_width} is not divisible by model.dit_heads={m.dit_heads}")
    require(m.get("dit_dtype", "float32") in models.dit.DTYPES,
            f"model.dit_dtype={m.get('dit_dtype')!r} is not one of {models.dit.DTYPES}")
  require(m.unet_conditioning in models.CONDITIONINGS,
          f"unknown model.unet_conditioning {m.unet_conditioning!r}; "
          f"choose one of {models.CONDITIONINGS}")
