"""The ablation of EM (docs/method.md §2): the diffusion encoder and its decoder trained by one
loss through the encoder's DDIM chain, under the one-loss rule of `baselines.OneLossMethod`.

It composes diffenc's encoder piece (`encoders.LatentDiffusionEncoder`) with a decoder of
`diffenc_jax.decoders`; it shares the pieces with `em.DiffusionEncoder` (and what
`encoders.DiffusionCodeMethod` offers of the encoder), not the training rule.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffenc_jax import baselines, decoders, encoders, latent_prior, train_state
from diffenc_jax.train_state import TrainState

Array = jax.Array


class DiffusionEncoderJoint(encoders.DiffusionCodeMethod, baselines.OneLossMethod):
  """Ablation of EM: the diffusion encoder and its decoder trained by one loss, the decoder's
  pressure reaching φ by backpropagation through the latent DDIM chain z⁰ = DDIM_φ(x, noise).

  Loss, batch mean of
      NLL_θ(x | z⁰) + β ½‖z⁰‖²  +  L_enc(φ; x, stop_gradient(z⁰)),
  with z⁰ differentiable in φ through every sampler step, θ and φ updated in one step.
  The first two terms are β·U(z⁰), the energy U = NLL/β − log p(z) + const that the E-step's
  Langevin chain descends (docs/method.md §1.5), here descended by φ through the sampler instead of
  by z; the last is the encoder's own denoising loss (model.enc_noise_draws draws), which EM
  applies on z^K and which here, with no refinement, applies on the encoder's own sample. This
  is "one loss, gradient through the DDIM chain" (docs/method.md §2) with everything else equal to
  EM: same U, β, networks and encoder loss, and the opposing pulls — the decoder's pressure
  through the chain and the denoising update — meet in one gradient instead of alternating.
  The decoder sees the same U: the exact NLL for the gaussian decoder, the ELBO bound (not the
  M-step's unit ε-MSE) for the diffusion decoder.

  Not β·R_φ with the diffusion-KL estimate R: R estimates KL(q_φ ‖ N(0, I)) only while ε_φ is
  the score of its own samples, and minimising it over ε_φ (whether the sample is detached or
  not) fits ε_φ towards the prior's score σ_t z_t rather than moving the samples; it stays the
  evaluation-time `rate`, as for diffenc. What the loss lacks is the entropy of π_β, which
  EM's Langevin noise supplies; that difference is part of what the ablation measures.

  The encoder is diffenc's piece (`encoders.LatentDiffusionEncoder`), with diffenc's `encode`
  and `rate`; `latents()` returns z^K = z⁰ (no Langevin). With em.latent_prior a latent DDPM
  prior (`latent_prior.LatentDDPMPrior`) is fitted to the detached z⁰ of each update, after it
  and with its own key (the autoencoder trains as without it), and `sample_latents` draws from it.
  """

  progress_keys = ("nll", "enc_loss")
  rate_kind = "diffusion KL"

  def __init__(self, config, data_shape: tuple[int, ...]):
    self.config = config
    self.data_shape = tuple(data_shape)
    self.latent_dim = config.model.latent_dim
    self.q = encoders.LatentDiffusionEncoder(config, self.data_shape)
    self.schedule = self.q.schedule
    self.decoder = decoders.build(config, self.data_shape)
    self.optimizers = train_state.encoder_decoder_optimizers(config)
    self.prior = (latent_prior.LatentDDPMPrior(config, self.schedule)
                  if config.em.latent_prior else None)

  def init_state(self, key: Array) -> TrainState:
    # the keys of em.DiffusionEncoder.init_state: one seed starts both from the same networks
    k_enc, k_dec = jax.random.split(key)
    params = {"encoder": self.q.init(k_enc), "decoder": self.decoder.init(k_dec)}
    optimizers = dict(self.optimizers)
    if self.prior is not None:
      params["prior"] = self.prior.init(jax.random.fold_in(key, 2))
      optimizers["prior"] = self.prior.optimizer
      if self.prior.normalize:
        params["zstats"] = self.prior.init_stats()
    return train_state.init(params, optimizers)

  def decode(self, dec_params, z: Array, key: Array, num_steps: int | None = None) -> Array:
    """x̂ from z: the gaussian decoder's mean, or an image DDIM sample."""
    return self.decoder.decode(dec_params, z, key, num_steps)

  def update(self, state: TrainState, x: Array, key: Array):
    """One joint update of the encoder and decoder on a batch x, then (with em.latent_prior)
    one of the prior on the detached z⁰, under fold_in(key, 2). Returns (state, metrics)."""
    ae = {name: state.params[name] for name in self.optimizers}
    (_, (metrics, z0)), grads = jax.value_and_grad(self._loss, has_aux=True)(ae, x, key)
    state = self.apply_gradients(state, grads)
    if self.prior is not None:
      state, metrics["prior_loss"] = self.prior.step(
          state, jax.lax.stop_gradient(z0), jax.random.fold_in(key, 2),
          self.config.train.ema_decay)
    return state, metrics

  def chain_energy(self, params, x: Array, key: Array) -> tuple[Array, Array]:
    """(β·U(z⁰) = NLL_θ(x|z⁰) + β ½‖z⁰‖² per example (B,), z⁰ (B, d)), with z⁰ the encoder's
    DDIM sample, differentiable in params['encoder'] through the chain."""
    k_enc, k_nll = jax.random.split(key)
    z0 = self.encode(params["encoder"], x, k_enc)
    energy = (self.decoder.nll(params["decoder"], x, z0, k_nll)
              + self.config.bottleneck.beta * 0.5 * jnp.sum(jnp.square(z0), -1))
    return energy, z0

  def loss(self, params, x: Array, key: Array):
    """(batch mean of β·U(z⁰) + L_enc, metrics)."""
    loss, (metrics, _) = self._loss(params, x, key)
    return loss, metrics

  def _loss(self, params, x: Array, key: Array):
    """(loss, (metrics, z⁰))."""
    k_chain, k_enc = jax.random.split(key)
    energy, z0 = self.chain_energy(params, x, k_chain)
    enc_loss = self.q.loss(params["encoder"], x, jax.lax.stop_gradient(z0), k_enc)
    z0_norm2 = jnp.mean(jnp.sum(jnp.square(z0), -1))
    nll = energy.mean() - self.config.bottleneck.beta * 0.5 * z0_norm2
    return energy.mean() + enc_loss, ({"loss": energy.mean() + enc_loss, "nll": nll,
                                       "enc_loss": enc_loss, "z0_norm2": z0_norm2}, z0)
