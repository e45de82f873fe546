"""The baselines of docs/method.md §2, behind the method interface of `diffenc_jax.methods`.

    vae            Gaussian encoder, reparameterised; NLL + β KL
    diffae         deterministic encoder, z-conditioned U-Net (AdaGN); ε-MSE through z;
                   a latent DDPM prior fitted alongside on the detached codes
    dmz            d Bernoulli bits (relaxed in training, hard at eval), one cross-attention
                   token; ε-MSE with DDPM-IP input perturbation; prior Bernoulli(½)^d

Each is trained by one loss over all its parameters, one joint update per batch
(`OneLossMethod`). vae, diffae and dmz (`Autoencoder`) compose an encoder piece of
`diffenc_jax.encoders` (gaussian, deterministic, Bernoulli) with a decoder of
`diffenc_jax.decoders` (the one diffenc builds from the same config), so that every method runs
the same decoders and differs only in its encoder and training rule.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffenc_jax import chain, decoders, encoders, latent_prior, losses, schedules, train_state
from diffenc_jax.train_state import TrainState

Array = jax.Array


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ValueError(message)


class OneLossMethod:
  """Mixin: a method trained by one scalar loss over every parameter group, without posterior
  refinement.

  A subclass sets `self.config` and `self.optimizers` ({group: optax transformation}, one per
  key of `params`) and defines `loss(params, x, key) -> (scalar, metrics)` and
  `encode(enc_params, x, key) -> z (B, d)`.
  """

  progress_keys = ("loss",)

  def apply_gradients(self, state: TrainState, grads) -> TrainState:
    """One step of each group's optimiser (own clipping and Adam state), then its EMA; groups
    without an optimiser (running statistics) are carried over unchanged."""
    return train_state.apply_update(state, self.optimizers, grads, self.config.train.ema_decay)

  def update(self, state: TrainState, x: Array, key: Array):
    """One joint update on a batch x (B, ...): returns (state, metrics)."""
    (_, metrics), grads = jax.value_and_grad(self.loss, has_aux=True)(state.params, x, key)
    return self.apply_gradients(state, grads), metrics

  def train_round(self, state: TrainState, xs: Array, key: Array):
    """One joint update per batch of xs (E, B, ...). Returns (state with step + 1, the
    metrics averaged over the batches)."""
    # E = train.batches_per_round is a small config integer: a trace-time loop, as in em.py
    # (XLA:CPU runs a conv net inside a loop body about twice as slowly as at top level)
    metrics = []
    for i in range(xs.shape[0]):
      state, m = self.update(state, xs[i], jax.random.fold_in(key, i))
      metrics.append(m)
    return state.replace(step=state.step + 1), train_state.mean_metrics(metrics)

  def latents(self, params, x: Array, key: Array,
              num_steps: int | None = None) -> dict[str, Array]:
    """{"z0": encode(x), "zK": z0 (no posterior refinement), "info": None}; `num_steps`
    (diffenc's refinement steps) is ignored. No gradients."""
    del num_steps
    z0 = jax.lax.stop_gradient(self.encode(params["encoder"], x, key))
    return {"z0": z0, "zK": z0, "info": None}


class Autoencoder(OneLossMethod):
  """Base of vae, diffae and dmz: the encoder piece `self.q` (`q_class` of
  `diffenc_jax.encoders`, set by the subclass) composed with the decoder
  `decoders.build(config)`; codes, rates and prior samples are the piece's."""

  q_class: type

  def __init__(self, config, data_shape: tuple[int, ...]):
    self.config = config
    self.data_shape = tuple(data_shape)
    self.latent_dim = config.model.latent_dim
    self.q = self.q_class(config, self.data_shape)
    self.decoder = decoders.build(config, self.data_shape)
    self.schedule = schedules.get_schedule(**config.schedule)  # latent schedule (priors)
    self.optimizers = train_state.encoder_decoder_optimizers(config)

  @property
  def encoder(self):
    """The encoder's network: `self.q.network`."""
    return self.q.network

  def init_params(self, key: Array) -> dict:
    k_enc, k_dec = jax.random.split(key)
    # the decoder gets the key that em.DiffusionEncoder.init_state(k_dec) would give it, so a
    # baseline and diffenc with one seed start from the same decoder
    return {"encoder": self.q.init(k_enc),
            "decoder": self.decoder.init(jax.random.split(k_dec)[1])}

  def init_state(self, key: Array) -> TrainState:
    return train_state.init(self.init_params(key), self.optimizers)

  def decode(self, dec_params, z: Array, key: Array, num_steps: int | None = None) -> Array:
    """x̂ (B, ...) from z (B, d): the gaussian decoder's mean, or an image DDIM sample with
    `num_steps` (config.eval.decoder_steps by default) for the diffusion decoder."""
    return self.decoder.decode(dec_params, z, key, num_steps)

  def encode(self, enc_params, x: Array, key: Array | None = None,
             num_steps: int | None = None) -> Array:
    """The encoder's code of x (B, d) (`q.encode`: VAE μ(x), DiffAE E(x), DMZ hard bits)."""
    del num_steps
    return self.q.encode(enc_params, x, key)

  def sample_latents(self, params, key: Array, n: int) -> Array:
    """n latents (n, d) from the encoder's prior (`q.sample_prior`)."""
    del params
    return self.q.sample_prior(key, n)

  def rate(self, params, x: Array, z0: Array, key: Array, num_samples: int) -> Array:
    """Rate per example (B,), nats, of `rate_latent`'s variable (`q.rate`)."""
    return self.q.rate(params["encoder"], x, z0, key, num_samples)

  def rate_and_latent(self, params, x: Array, z0: Array, key: Array,
                      num_samples: int) -> tuple[Array, Array]:
    """(`rate`, `rate_latent`) under one key."""
    return (self.rate(params, x, z0, key, num_samples),
            self.rate_latent(params, x, z0, key))

  def rate_latent(self, params, x: Array, z0: Array, key: Array) -> Array:
    """The variable whose KL `rate` reports (`q.rate_latent`: z0 itself, or for the VAE a
    sample of q(z|x))."""
    return self.q.rate_latent(params["encoder"], x, z0, key)


class VAE(Autoencoder):
  """β-VAE: q(z|x) = N(μ(x), diag e^{log_var(x)}) (`encoders.GaussianEncoder`), the decoder of config.model.decoder, the prior N(0, I).

  Loss, batch mean of  NLL_θ(x | z) + β KL(q(z|x) ‖ N(0, I)),  z = μ + e^{log_var/2} ε
  (reparameterised, one draw), KL analytic, β = config.bottleneck.beta (the diffusion encoder's
  posterior temperature: both then target E_q log p(x|z) − β KL). NLL is exact for the gaussian
  decoder (σ = model.sigma_x) and the continuous-time ELBO bound (model.dec_nll_samples draws,
  no dropout) for the diffusion decoder, so that β weighs nats against nats.

  `rate` is the analytic KL per example, of a sample z ~ q(z|x) (`rate_latent`).
  `latents()["z0"]` and `encode` return the posterior mean μ(x), not a sample: reconstruction
  PSNR and linear probes of a VAE are, by common practice, read from the mean, which is its
  best single code. `latents()["zK"]` is that mean refined by diffenc's E-step Langevin chain
  (`chain.posterior_sample`: same β, step rule, MALA, preconditioner) on this decoder's
  posterior, the like-for-like counterpart of diffenc's z^K.
  """

  progress_keys = ("nll", "kl")
  rate_kind = "analytic KL"
  q_class = encoders.GaussianEncoder

  def latents(self, params, x: Array, key: Array,
              num_steps: int | None = None) -> dict[str, Array]:
    """{"z0": μ(x), "zK": μ(x) after `num_steps` (em.langevin.num_steps by default) steps of
    the E-step's Langevin chain on π_β(z|x) ∝ p(z) p_θ(x|z)^(1/β) (`chain.posterior_sample` on
    this decoder, β = bottleneck.beta), "info": its diagnostics}; num_steps=0: zK = z0, info None.
    No gradients."""
    k_chain = jax.random.fold_in(key, 1)
    z0 = jax.lax.stop_gradient(self.encode(params["encoder"], x))
    if num_steps == 0:
      return {"z0": z0, "zK": z0, "info": None}
    zk, info = chain.posterior_sample(self.config, self.decoder, params["decoder"], x, z0,
                                   k_chain, num_steps)
    return {"z0": z0, "zK": zk, "info": info}

  def update(self, state: TrainState, x: Array, key: Array):
    """One update on a batch x at the KL weight β of round state.step (`schedules.beta_at`)."""
    beta = schedules.beta_at(self.config.bottleneck, state.step)
    (_, metrics), grads = jax.value_and_grad(self.loss, has_aux=True)(state.params, x, key, beta)
    return self.apply_gradients(state, grads), metrics

  def loss(self, params, x: Array, key: Array, beta: float | Array | None = None):
    """(batch mean of NLL + β KL, metrics); β = bottleneck.beta unless given."""
    k_z, k_nll = jax.random.split(key)
    mean, log_var = self.q.moments(params["encoder"], x)
    beta = self.config.bottleneck.beta if beta is None else beta
    out = losses.vae_loss(lambda z: self.decoder.nll(params["decoder"], x, z, k_nll), mean,
                          log_var, k_z, beta)
    return out["loss"].mean(), {"loss": out["loss"].mean(), "nll": out["nll"].mean(),
                                "kl": out["kl"].mean()}


class DiffAE(Autoencoder):
  """Diffusion autoencoder (Preechakul et al. 2022): a deterministic encoder z = E(x)
  (`encoders.DeterministicEncoder`: a small conv net, or DiffAE's ResNet with
  config.diffae.encoder='resnet'), the
  z-conditioned diffusion decoder (`decoders.DiffusionDecoder`: DiffAE's U-Net with z as a
  multiplicative scale, model.unet_conditioning='scale', or the transformer denoiser), and a
  latent DDPM prior `LatentPrior` over z for sampling.

  Loss, batch mean of
      w(t) ‖ε − ε̂_θ(x_t, t, E_φ(x))‖²      (the decoder's loss, gradient through z into φ;
                                            DiffAE's is the unit ε-MSE, model.dec_weighting)
    + ‖ε' − ε_ψ(z_t, t)‖²,  z_t from stop_gradient(E_φ(x))   (the prior's own ε-MSE)
  with θ, φ and ψ ('prior', own optimiser at latent_prior.lr) updated in one step. DiffAE
  fits the latent DDPM afterwards, on the codes of the trained, frozen encoder; training it on
  detached codes in the same step is equivalent in that no gradient of the prior's loss
  reaches the autoencoder (and the prior's loss does not depend on θ), so the autoencoder
  trains exactly as DiffAE's, while the prior tracks its moving codes and is ready at any
  checkpoint. With latent_prior.normalize (DiffAE's z-normalisation) the prior is fitted to z
  standardised by running dataset statistics, kept in params['zstats'] and updated after each
  step, and its samples are de-standardised; the prior's sampler clips its predicted z_0 to
  ±latent_prior.clip (`latent_prior.LatentDDPMPrior`).

  `rate` is +∞ (a deterministic encoder carries unbounded information about x);
  `sample_latents` runs latent DDIM of the prior (latent_prior.steps, latent_prior.eta);
  `decode` is image DDIM with config.eval.decoder_steps.
  """

  progress_keys = ("dec_loss", "prior_loss")
  rate_kind = "∞ (deterministic)"
  q_class = encoders.DeterministicEncoder

  def __init__(self, config, data_shape: tuple[int, ...]):
    super().__init__(config, data_shape)
    self.prior = latent_prior.LatentDDPMPrior(config, self.schedule)
    self.optimizers["prior"] = self.prior.optimizer

  def init_params(self, key: Array) -> dict:
    k_ae, k_prior = jax.random.split(key)
    params = {**super().init_params(k_ae), "prior": self.prior.init(k_prior)}
    if self.prior.normalize:
      params["zstats"] = self.prior.init_stats()
    return params

  def update(self, state: TrainState, x: Array, key: Array):
    """One joint update, then (with latent_prior.normalize) the running z statistics."""
    (_, metrics), grads = jax.value_and_grad(self.loss, has_aux=True)(state.params, x, key)
    state = self.apply_gradients(state, grads)
    if self.prior.normalize:  # the codes of the updated encoder (no gradient)
      z = self.encode(state.params["encoder"], x)
      stats = self.prior.update_stats(state.params["zstats"], z)
      state = state.replace(params={**state.params, "zstats": stats},
                            ema={**state.ema, "zstats": stats})
    return state, metrics

  def loss(self, params, x: Array, key: Array):
    k_dec, k_prior = jax.random.split(key)
    z = self.q.train_code(params["encoder"], x)
    dec_loss = self.decoder.loss(params["decoder"], x, z, k_dec).mean()
    prior_loss = self.prior.loss(params["prior"], z, k_prior, params.get("zstats")).mean()
    return dec_loss + prior_loss, {"dec_loss": dec_loss, "prior_loss": prior_loss,
                                   "z_norm2": jnp.mean(jnp.sum(jnp.square(z), -1))}

  def sample_latents(self, params, key: Array, n: int) -> Array:
    """n latents (n, d) from the latent DDPM prior, by latent DDIM (de-standardised)."""
    return self.prior.sample(params["prior"], key, n, params.get("zstats"))


class DMZ(Autoencoder):
  """DMZ (arXiv 2506.00136) as its authors built it: z = d bits (`encoders.BernoulliEncoder`),
  fed to the U-Net as one cross-attention token (model.unet_conditioning='xattn').

  Training codes are soft: z = sigmoid((logits + L)/τ), L ~ Logistic(0, 1) (binary concrete,
  τ = dmz.temperature), strictly inside (0, 1) and differentiable; evaluation codes are hard,
  z = 1[logits > 0] ∈ {0, 1}^d. With dmz.straight_through the training codes are the relaxed
  sample rounded to {0, 1} in the forward pass, with the relaxed sample's gradient (the decoder
  then trains on the kind of code it decodes at evaluation). Loss, batch mean of the decoder's
  loss (DMZ's: the unit ε-MSE; model.dec_weighting) with DDPM-IP input perturbation
  (γ = dmz.input_perturbation):
      w(t) ‖ε − ε̂_θ(α_t x + σ_t (ε + γ ξ), t, z)‖²,
  gradient through the relaxed z into the encoder; no prior or rate term. The prior is
  Bernoulli(½)^d, so `rate` is d ln 2 per example (what d bits can carry at most); `decode`
  and generation use respaced few-step DDIM (dmz.sample_steps).
  """

  progress_keys = ("dec_loss", "bits_on")
  rate_kind = "d ln 2 (bits)"
  q_class = encoders.BernoulliEncoder

  @staticmethod
  def validate(config) -> None:
    """Raises ValueError with one line on a bad dmz section (or a U-Net without the
    cross-attention token DMZ feeds z through); its bits' fields are the piece's
    (`encoders.BernoulliEncoder.validate`)."""
    m, d = config.model, config.dmz
    _require(m.denoiser != "unet" or m.unet_conditioning == "xattn",
             "method 'dmz' feeds z to the U-Net as one cross-attention token: "
             "needs model.unet_conditioning='xattn'")
    _require(d.input_perturbation >= 0,
             f"dmz.input_perturbation must be >= 0, got {d.input_perturbation}")
    _require(d.sample_steps >= 1, f"dmz.sample_steps must be >= 1, got {d.sample_steps}")

  def loss(self, params, x: Array, key: Array):
    k_code, k_dec = jax.random.split(key)
    z = self.q.train_code(params["encoder"], x, k_code)
    dec_loss = self.decoder.loss(params["decoder"], x, z, k_dec,
                                 self.config.dmz.input_perturbation).mean()
    return dec_loss, {"dec_loss": dec_loss, "bits_on": jnp.mean(z)}

  def decode(self, dec_params, z: Array, key: Array, num_steps: int | None = None) -> Array:
    """x̂ (B, ...) by respaced image DDIM, dmz.sample_steps steps unless given."""
    return super().decode(dec_params, z, key, num_steps or self.config.dmz.sample_steps)
