"""The phases of a diffusion-encoder run under EM: the rounds' schedule, what each phase's
round samples and trains, and the warm-ups' own settings.

    "gaussian_warmup"  rounds < em.gaussian_warmup_rounds (diffusion decoder): EM rounds whose
                       E-step runs on an auxiliary gaussian decoder (em.warm_langevin's chain,
                       β = em.warm_beta, images shifted by em.warm_shift) while the diffusion
                       decoder learns on its latents
    "joint_warmup"     rounds < em.joint_warmup_rounds: `joint_round`, one DiffAE-style joint
                       update per batch
    "em"               EM rounds on the method's decoder

`phase_at(config, step)` names a round's phase (the trainer compiles one program per phase);
`stages(config)` gives each EM-round phase its `Stage`; `validate(config)` checks the
warm-ups' fields. docs/method.md §4 has why the warm-ups exist.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from diffenc_jax import chain, train_state

Array = jax.Array
PHASES = ("gaussian_warmup", "joint_warmup", "em")


class Stage(NamedTuple):
  """What an EM round of one phase samples and trains: the E-step's chain runs on the decoder
  `params[chain_decoder]` with the chain `langevin` at β = `beta` (0: bottleneck.beta's schedule),
  continues the persistent chains where `continue_chains` and leaves its z^K in them where
  `fills_chains`; the M-step trains the method's
  decoder with λ_align = `align_weight`, and the chain's decoder too where it is another one."""
  name: str
  chain_decoder: str  # "decoder" or "warm_decoder"
  langevin: Any       # an em.langevin-like config section
  beta: float
  continue_chains: bool
  fills_chains: bool
  align_weight: float


def stages(config, gaussian_warmup: bool) -> dict[str, Stage]:
  """{"em": the EM round's stage} and, with gaussian_warmup, the warm-up's: its chain on the
  auxiliary gaussian decoder does not continue the persistent chains; it leaves its z^K in
  them unless its images are shifted (em.warm_shift: a shifted image's code is no start for
  the unshifted image's chain, and EM's first visit then starts at z⁰), or only its unshifted
  visits' z^K (em.warm_fill_unshifted, one visit in (2 em.warm_shift + 1)², or more with
  em.warm_shift_decay, whose share of unmoved images rises to all by the warm-up's end); its
  M-step gives the diffusion decoder no z⁰ term (z⁰ is close to z^K there, and each term costs a
  pass of the denoiser)."""
  em_ = config.em
  out = {"em": Stage("em", "decoder", em_.langevin, 0.0, True, True, em_.align_weight)}
  if gaussian_warmup:
    out["gaussian_warmup"] = Stage("gaussian_warmup", "warm_decoder", em_.warm_langevin,
                                   em_.get("warm_beta", 0.0), False,
                                   not em_.get("warm_shift", 0)
                                   or em_.get("warm_fill_unshifted", False), 0.0)
  return out


def phase_at(config, step: int, gaussian_warmup: bool) -> str:
  """The phase of round `step` (a Python int): "gaussian_warmup" while step <
  em.gaussian_warmup_rounds (where the method has that warm-up), "joint_warmup" while step <
  em.joint_warmup_rounds, "em" after."""
  if gaussian_warmup and step < config.em.gaussian_warmup_rounds:
    return "gaussian_warmup"
  if step < config.em.joint_warmup_rounds:
    return "joint_warmup"
  return "em"


def validate(config) -> None:
  """Raises ValueError with one line on a bad config of the warm-ups."""
  em_ = config.em

  def require(ok, message):
    if not ok:
      raise ValueError(message)

  warm_beta, warm_shift = em_.get("warm_beta", 0.0), em_.get("warm_shift", 0)
  require(warm_beta >= 0, f"em.warm_beta must be >= 0, got {warm_beta}")
  require(warm_shift >= 0, f"em.warm_shift must be >= 0, got {warm_shift}")
  require(not em_.get("warm_fill_unshifted", False) or warm_shift,
          "em.warm_fill_unshifted keeps the shifted warm-up's unshifted visits: needs "
          "em.warm_shift > 0")
  require(not em_.get("warm_shift_decay", False) or warm_shift,
          "em.warm_shift_decay lowers the warm-up's shifts to none: needs em.warm_shift > 0")
  require(not ((warm_beta or warm_shift) and not em_.gaussian_warmup_rounds),
          "em.warm_beta and em.warm_shift are the gaussian warm-up's: they need "
          "em.gaussian_warmup_rounds > 0")
  for name in ("joint_warmup_rounds", "gaussian_warmup_rounds", "joint_code_steps"):
    require(em_[name] >= 0, f"em.{name} must be >= 0, got {em_[name]}")
  require(not (em_.joint_warmup_rounds and em_.gaussian_warmup_rounds),
          "em.joint_warmup_rounds and em.gaussian_warmup_rounds are two warm-ups: set one")
  require(not em_.gaussian_warmup_rounds or config.model.decoder == "diffusion",
          "em.gaussian_warmup_rounds warms up a diffusion decoder: needs "
          "model.decoder='diffusion'")
  require(em_.em_enc_lr_scale > 0, f"em.em_enc_lr_scale must be > 0, got {em_.em_enc_lr_scale}")
  chain.validate(em_.warm_langevin, "em.warm_langevin")


def joint_round(method, state, xs: Array, key: Array):
  """The joint warm-up's round (em.joint_warmup_rounds) of `method` (an
  `em.DiffusionEncoder`): per batch of xs one joint update of the encoder and decoder,
  DiffAE-style: the decoder's training loss on the encoder's deterministic code z⁰
  (`encode(..., deterministic=True)`: DDIM with η = 0 from z_1 = 0), its gradient reaching φ
  through the sampler's steps, plus the encoder's denoising loss on stop_gradient(z⁰), which
  teaches q_φ(·|x) to concentrate at that code. It makes z informative before EM starts: EM
  from a decoder that ignores z stays there (docs/method.md §4, which also has what the
  encoder's ancestral sample did instead). Returns (state, metrics)."""
  em_ = method.config.em
  metrics = []
  for i in range(xs.shape[0]):
    x = xs[i]
    k_enc, k_dec, k_den = jax.random.split(jax.random.fold_in(key, i), 3)

    def loss_fn(params):
      z0 = method.encode(params["encoder"], x, k_enc, num_steps=em_.joint_code_steps or None,
                         deterministic=True)
      dec = method.decoder.loss(params["decoder"], x, z0, k_dec).mean()
      enc = method.encoder_loss(params["encoder"], x, jax.lax.stop_gradient(z0), k_den)
      return dec + em_.joint_denoise_weight * enc, (dec, enc, z0)

    grads, (dec, enc, z0) = jax.grad(loss_fn, has_aux=True)(state.params)
    state = method.apply_update(state, "encoder", method.enc_opt, grads["encoder"])
    state = method.apply_update(state, "decoder", method.dec_opt, grads["decoder"])
    if method.prior is not None:
      state, _ = method.prior_step(state, jax.lax.stop_gradient(z0),
                                   jax.random.fold_in(k_den, 1))
    metrics.append({"enc_loss": enc, "dec_loss_z0": dec,
                    "z0_norm2": jnp.mean(jnp.sum(jnp.square(z0), -1))})
  return state, train_state.mean_metrics(metrics)
