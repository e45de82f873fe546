"""The Diffusion Encoder trained by EM (docs/method.md §1): pure, jittable E- and M-steps.

`DiffusionEncoder(config, data_shape)` holds only static things (networks, schedules,
optimisers); every method is a pure function of explicit arrays, e.g.

    state = method.init_state(key)
    state, metrics, latents = method.e_step(state, x, key)   # z⁰ → Langevin → z^K → φ update
    state, metrics = method.m_step(state, x, latents, key)   # θ update on z^K (+ λ_align z⁰)
    state, metrics = method.train_round(state, xs, key)      # an E-step per batch, M-steps

E-step: z⁰ ~ q_φ(·|x) by latent DDIM; K Langevin steps on the tempered posterior
π_β(z|x) ∝ p(z) p_θ(x|z)^(1/β) (+ an optional proximal pull to z⁰); `encoder_inner_steps`
denoising updates of φ on (x, z^K). M-step: θ ← NLL_θ(x|z^K) + λ_align NLL_θ(x|z⁰).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from diffenc_jax import (data, decoders, encoders, latent_prior, losses, phases, samplers,
                         schedules, train_state)
from diffenc_jax.chain import posterior_sample, running_curvature
from diffenc_jax.phases import Stage

Array = jax.Array
PARAMETERIZATIONS = losses.PARAMETERIZATIONS
DECODERS = decoders.DECODERS
TrainState = train_state.TrainState


class DiffusionEncoder(encoders.DiffusionCodeMethod):
  """The method: static configuration plus pure functions over `TrainState` (the interface
  of `diffenc_jax.methods`)."""

  progress_keys = ("gap", "dec_loss_zK")
  rate_kind = "diffusion KL"

  @staticmethod
  def validate(config) -> None:
    """Raises ValueError with one line on a bad config of EM's own: the E-step chain's MALA
    with its step rule, then the warm-ups and their chain (`phases.validate`)."""
    lv = config.em.langevin

    def require(ok, message):
      if not ok:
        raise ValueError(message)

    require(not (lv.mala and (lv.step_rule in ("snr", "diagonal") or lv.max_move > 0)),
            "em.langevin.mala needs step_rule 'fixed' without max_move, or 'gauss_newton'")
    require(not (lv.fresh_draws and lv.mala and config.model.decoder == "diffusion"),
            "em.langevin.fresh_draws draws a new energy at every step: MALA needs a fixed one "
            "(set em.langevin.mala=False)")
    phases.validate(config)

  def __init__(self, config, data_shape: tuple[int, ...]):
    self.config = config
    self.data_shape = tuple(data_shape)
    self.latent_dim = config.model.latent_dim
    # q_φ(z|x): a latent diffusion conditioned on x (`diffenc_jax.encoders`)
    self.q = encoders.LatentDiffusionEncoder(config, self.data_shape)
    # p_θ(x|z): gaussian or diffusion (`diffenc_jax.decoders`)
    self.decoder = decoders.build(config, self.data_shape)
    em_ = config.em
    # em.gaussian_warmup_rounds: an auxiliary gaussian decoder (model.sigma_x, model.dec_arch)
    # drives the E-step of the first rounds while the diffusion decoder learns on its latents
    self.warm_decoder = None
    if em_.gaussian_warmup_rounds and self.decoder.kind == "diffusion":
      self.warm_decoder = decoders.GaussianDecoder(config, self.data_shape)
    self.schedule = self.q.schedule
    # em.em_enc_lr_scale: the encoder's rate once EM against the diffusion decoder starts
    warm_rounds = em_.gaussian_warmup_rounds if self.warm_decoder is not None else 0
    enc_updates = config.train.batches_per_round * em_.encoder_inner_steps
    self.enc_opt = train_state.optimizer_for(config, config.train.enc_lr, enc_updates,
                                             scale_after=(warm_rounds, em_.em_enc_lr_scale)
                                             if warm_rounds else None)
    self.dec_opt = train_state.optimizer_for(config, config.train.dec_lr, em_.m_updates)
    # optional latent DDPM prior over z⁰, one update per E-step, for sample_latents
    self.prior = (latent_prior.LatentDDPMPrior(config, self.schedule) if em_.latent_prior
                  else None)
    # every parameter group's optimiser (the warm-up decoder's is the decoder's)
    self.optimizers = {"encoder": self.enc_opt, "decoder": self.dec_opt}
    if self.warm_decoder is not None:
      self.optimizers["warm_decoder"] = self.dec_opt
    if self.prior is not None:
      self.optimizers["prior"] = self.prior.optimizer
    # em.chain_slots > 0: persistent chains, one per training example (opt_state["chains"])
    self.chain_slots = em_.get("chain_slots", 0)
    self.uses_example_index = bool(self.chain_slots)
    # the phases' EM rounds (`phases.Stage`)
    self.stages = phases.stages(config, gaussian_warmup=self.warm_decoder is not None)

  def stage_of(self, stage: Stage | str | None) -> Stage:
    """The `Stage` named (None: "em"), or the one given."""
    return stage if isinstance(stage, Stage) else self.stages[stage or "em"]

  # --- parameters ----------------------------------------------------------------------
  def init_state(self, key: Array) -> TrainState:
    k_enc, k_dec = jax.random.split(key)
    x = jnp.zeros((1,) + self.data_shape)
    z = jnp.zeros((1, self.latent_dim))
    t = jnp.zeros((1,))
    params = {"encoder": self.encoder.init(k_enc, z, t, x), "decoder": self.decoder.init(k_dec)}
    if self.warm_decoder is not None:
      params["warm_decoder"] = self.warm_decoder.init(jax.random.fold_in(key, 3))
    if self.prior is not None:
      params["prior"] = self.prior.init(jax.random.fold_in(key, 2))
      if self.prior.normalize:
        params["zstats"] = self.prior.init_stats()
    chains = None
    if self.chain_slots:
      chains = {"chains": {"z": jnp.zeros((self.chain_slots, self.latent_dim)),
                           "visits": jnp.zeros((self.chain_slots,), jnp.int32),
                           "curvature": jnp.zeros((self.chain_slots, self.latent_dim))}}
    return train_state.init(params, self.optimizers, chains)

  # --- encoder q_φ(z|x): the piece `self.q` (`encoders.LatentDiffusionEncoder`); its
  # codes, rate and the prior's latents: `encoders.DiffusionCodeMethod` ---------------------
  def encoder_eps_fn(self, enc_params, h: Array):
    """ε̂(z_t, t) of the encoder for precomputed image features h (B, F)."""
    return self.q.eps_fn(enc_params, h)

  def encoder_loss(self, enc_params, x: Array, z: Array, key: Array) -> Array:
    """The encoder's mean denoising loss on the pairs (x, z) (`q.loss`)."""
    return self.q.loss(enc_params, x, z, key)

  # --- decoder p_θ(x|z) ----------------------------------------------------------------
  def nll(self, dec_params, x: Array, z: Array, key: Array) -> Array:
    """−log p_θ(x|z) per example (B,), nats: exact for the gaussian decoder, the
    continuous-time ELBO bound (model.dec_nll_samples draws) for the diffusion decoder."""
    return self.decoder.nll(dec_params, x, z, key)

  def decode(self, dec_params, z: Array, key: Array, num_steps: int | None = None) -> Array:
    """x̂ from z: the mean for the gaussian decoder, an image DDIM sample for the diffusion one."""
    return self.decoder.decode(dec_params, z, key, num_steps)

  # --- E-step --------------------------------------------------------------------------
  def posterior_sample(self, params, x: Array, z0: Array, key: Array,
                       num_steps: int | None = None, beta: float | Array | None = None,
                       stage: Stage | str | None = None, z_start: Array | None = None,
                       curvature: Array | None = None) -> tuple[Array, samplers.LangevinInfo]:
    """z^K: Langevin on π_β(z|x) ∝ p(z) p_θ(x|z)^(1/β) exp(−½ λ_prox ‖z − z⁰‖²) from z⁰;
    β = bottleneck.beta unless given (the E-step passes `schedules.beta_at` of its round).
    The module's `posterior_sample` on the stage's decoder with its chain (the "em" stage:
    this method's decoder and em.langevin)."""
    stage = self.stage_of(stage)
    if stage.chain_decoder == "decoder":
      return posterior_sample(self.config, self.decoder, params["decoder"], x, z0, key,
                              num_steps, beta, z_start=z_start, curvature=curvature)
    return posterior_sample(self.config, self.warm_decoder, params[stage.chain_decoder], x, z0,
                            key, num_steps or stage.langevin.num_steps, beta,
                            langevin=stage.langevin)

  def latents(self, params, x: Array, key: Array, num_steps: int | None = None,
              beta: float | Array | None = None, stage: Stage | str | None = None,
              resume: tuple[Array, Array, Array] | None = None) -> dict[str, Array]:
    """z⁰ from the encoder and z^K after `num_steps` Langevin steps (the E-step's
    em.langevin.num_steps by default; num_steps=0: z^K = z⁰ and no diagnostics) at temperature
    β (bottleneck.beta by default) from z⁰, with the chain's diagnostics (stage: the `Stage`
    whose chain runs, "em" by default). resume = (z_prev (B, d), seen (B,) bool, curvature (B, d)):
    persistent chains, which continue from z_prev where seen and start at z⁰ elsewhere, with
    the `diagonal` rule's curvature estimate (≤ 0: unknown). No gradients."""
    k_enc, k_chain = jax.random.split(key)
    z0 = jax.lax.stop_gradient(self.encode(params["encoder"], x, k_enc))
    if num_steps == 0:
      return {"z0": z0, "zK": z0, "info": None}
    z_start = curvature = None
    if resume is not None:
      z_start = jnp.where(resume[1][:, None], jax.lax.stop_gradient(resume[0]), z0)
      curvature = resume[2]
    zk, info = self.posterior_sample(params, x, z0, k_chain, num_steps, beta, stage, z_start,
                                     curvature)
    return {"z0": z0, "zK": zk, "info": info}

  def e_step(self, state: TrainState, x: Array, key: Array, stage: Stage | str | None = None,
             index: Array | None = None, fill: Array | None = None):
    """One E-step on a batch x: returns (state, metrics, latents). stage: the phase's `Stage`
    ("em" by default; "gaussian_warmup": the chain on the auxiliary gaussian decoder).
    index (B,): the examples' train-split indices, for persistent chains (em.chain_slots): an
    example's chain continues from its last z^K (where the stage continues chains; its first
    visit starts at z⁰), and z^K is kept (where the stage fills them). fill (B,) bool: the
    examples whose image is their slot's own (an unshifted one): only their chains continue and
    keep z^K; the others' chains start at z⁰ with an unknown curvature and leave their slots as
    they were (None: all)."""
    stage = self.stage_of(stage)
    k_lat, k_enc = jax.random.split(key)
    chains, resume = state.opt_state.get("chains"), None
    if chains is not None:
      slot = index % self.chain_slots
      if stage.continue_chains:
        seen, curv = chains["visits"][slot] > 0, chains["curvature"][slot]
        if fill is not None:
          seen, curv = seen & fill, jnp.where(fill[:, None], curv, 0.0)
        resume = (chains["z"][slot], seen, curv)
    beta = stage.beta or schedules.beta_at(self.config.bottleneck, state.step)
    lat = self.latents(state.params, x, k_lat, beta=beta, stage=stage, resume=resume)
    zk = lat["zK"]
    chain_metrics = {}
    if chains is not None:
      if stage.fills_chains:
        curv, z_new, visits_new = chains["curvature"], zk, 1
        if stage.continue_chains:  # a running mean of (∇log π)²: the `diagonal` rule's
          curv_new = running_curvature(resume[2], lat["info"].grad_sq,
                                       self.config.em.curvature_decay)
          if fill is not None:
            curv_new = jnp.where(fill[:, None], curv_new, curv[slot])
          curv = curv.at[slot].set(curv_new)
        if fill is not None:  # a trace-time branch: without a mask, the plain writes
          z_new = jnp.where(fill[:, None], zk, chains["z"][slot])
          visits_new = fill.astype(jnp.int32)
        chains = {"z": chains["z"].at[slot].set(z_new),
                  "visits": chains["visits"].at[slot].add(visits_new), "curvature": curv}
        state = state.replace(opt_state={**state.opt_state, "chains": chains})
      chain_metrics["chain_visits"] = jnp.mean(chains["visits"][slot].astype(jnp.float32))

    # a few updates at most: a trace-time loop, because XLA:CPU runs the conv trunk inside a
    # loop body (scan/while, even unrolled) about twice as slowly as at top level
    enc, enc_opt, enc_losses = state.params["encoder"], state.opt_state["encoder"], []
    x_enc = x
    if self.config.em.get("encoder_shift", 0):  # the encoder sees x moved, learns x's z^K
      x_enc = data.random_shift(jax.random.fold_in(k_enc, 2), x, self.config.em.encoder_shift)
    for k in jax.random.split(k_enc, self.config.em.encoder_inner_steps):
      loss, grads = jax.value_and_grad(self.encoder_loss)(enc, x_enc, zk, k)
      updates, enc_opt = self.enc_opt.update(grads, enc_opt, enc)
      enc = optax.apply_updates(enc, updates)
      enc_losses.append(loss)
    decay = self.config.train.ema_decay
    state = state.replace(
        params={**state.params, "encoder": enc},
        opt_state={**state.opt_state, "encoder": enc_opt},
        ema={**state.ema, "encoder": train_state.ema_update(state.ema["encoder"], enc, decay)})
    prior_metrics = {}
    if self.prior is not None:
      state, prior_metrics["prior_loss"] = self.prior_step(state, lat["z0"],
                                                           jax.random.fold_in(k_enc, 1))
    info = lat["info"]
    metrics = {"enc_loss": jnp.mean(jnp.stack(enc_losses)),
               "gap": jnp.mean(jnp.sum((zk - lat["z0"]) ** 2, -1)), "move": info.move_norm,
               "accept": info.accept_rate, "step_size": info.step_size,
               "z0_norm2": jnp.mean(jnp.sum(lat["z0"] ** 2, -1)), **prior_metrics,
               **chain_metrics}
    return state, metrics, {"z0": lat["z0"], "zK": zk}

  def prior_step(self, state: TrainState, z0: Array, key: Array):
    """One update of the latent prior on the encoder's own samples z⁰: (state, loss)."""
    return self.prior.step(state, z0, key, self.config.train.ema_decay)

  def apply_update(self, state: TrainState, name: str,
                   opt: optax.GradientTransformation, grads) -> TrainState:
    """One step of optimiser `opt` on the network `name`, then that network's EMA."""
    return train_state.apply_update(state, {name: opt}, {name: grads},
                                    self.config.train.ema_decay)

  # --- M-step --------------------------------------------------------------------------
  def m_step(self, state: TrainState, x: Array, latents: dict[str, Array], key: Array,
             stage: Stage | str | None = None):
    """One M-step: θ ← NLL_θ(x|z^K) + λ_align NLL_θ(x|z⁰) (λ_align the stage's). Returns
    (state, metrics). Where the stage's chain runs on another decoder (the gaussian warm-up's),
    that decoder takes the same step on its own NLL, with em.align_weight."""
    stage = self.stage_of(stage)
    lam = self.config.em.align_weight
    k_k, k_0 = jax.random.split(key)
    metrics = {}
    if self.warm_decoder is not None:
      loss_w = jnp.zeros(())
      if stage.chain_decoder == "warm_decoder":
        def warm_loss(p):
          loss = self.warm_decoder.loss(p, x, latents["zK"], k_k).mean()
          return loss + lam * self.warm_decoder.loss(p, x, latents["z0"], k_0).mean()
        loss_w, grads = jax.value_and_grad(warm_loss)(state.params["warm_decoder"])
        state = self.apply_update(state, "warm_decoder", self.dec_opt, grads)
      metrics["warm_dec_loss"] = loss_w

    lam_dec = stage.align_weight

    def loss_fn(dec_params):
      loss_k = self.decoder.loss(dec_params, x, latents["zK"], k_k).mean()
      loss_0 = self.decoder.loss(dec_params, x, latents["z0"], k_0).mean() if lam_dec else 0.0
      return loss_k + lam_dec * loss_0, (loss_k, loss_0)

    (_, (loss_k, loss_0)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params["decoder"])
    state = self.apply_update(state, "decoder", self.dec_opt, grads)
    return state, {"dec_loss_zK": loss_k, "dec_loss_z0": jnp.asarray(loss_0), **metrics}

  # --- one round -----------------------------------------------------------------------
  def em_round(self, state: TrainState, xs: Array, key: Array,
               stage: Stage | str | None = None, index: Array | None = None,
               fill: Array | None = None):
    """An E-step per batch of xs (E, B, ...), then m_updates M-steps reusing those batches'
    latents in turn, both of the `Stage` given ("em" by default). Returns
    (state, metrics); the step is not advanced. index (E, B): the examples' train-split
    indices (persistent chains); fill (E, B) bool: which examples' z^K the chains keep (all
    where None)."""
    stage = self.stage_of(stage)
    # E and m_updates are small config integers: trace-time loops (see e_step)
    num_e = xs.shape[0]
    e_metrics, lats = [], []
    for i in range(num_e):
      state, metrics, lat = self.e_step(state, xs[i], jax.random.fold_in(key, i), stage,
                                        None if index is None else index[i],
                                        None if fill is None else fill[i])
      e_metrics.append(metrics)
      lats.append(lat)
    m_metrics = []
    for i in range(self.config.em.m_updates):
      state, metrics = self.m_step(state, xs[i % num_e], lats[i % num_e],
                                   jax.random.fold_in(key, num_e + i), stage)
      m_metrics.append(metrics)
    return state, {**train_state.mean_metrics(e_metrics), **train_state.mean_metrics(m_metrics)}

  def joint_round(self, state: TrainState, xs: Array, key: Array):
    """The joint warm-up's round (em.joint_warmup_rounds): `phases.joint_round`."""
    return phases.joint_round(self, state, xs, key)

  def phase_at(self, step: int) -> str:
    """The phase of round `step` (a Python int; `phases.phase_at`). The trainer compiles one
    program per phase (`train_round(..., phase=...)`) rather than one with a `lax.cond` over the forms, which
    slows the EM round (docs/recipes.md, "One program per phase")."""
    return phases.phase_at(self.config, step, gaussian_warmup=self.warm_decoder is not None)

  def train_round(self, state: TrainState, xs: Array, key: Array, index: Array | None = None,
                  phase: str | None = None):
    """One round: `em_round`; while state.step < em.gaussian_warmup_rounds its gaussian
    warm-up form (the E-step on the auxiliary gaussian decoder, both decoders updated on its
    latents), or `joint_round` while state.step < em.joint_warmup_rounds (the warm-up's
    metrics fill EM's keys it lacks with 0). phase (static, `phase_at`): that form alone;
    None: one program that picks the form from state.step (`lax.cond`). index (E, B): the
    examples' train-split indices, needed with persistent chains (em.chain_slots). Returns
    (state with step + 1, metrics)."""
    if self.chain_slots and index is None:
      raise ValueError("em.chain_slots > 0: train_round needs the examples' index (E, B)")

    def em(state):
      shift = self.config.em.get("em_shift", 0)
      if not shift:
        return self.em_round(state, xs, key, index=index)
      # em.em_shift: a fraction of the EM round's images shifted; only the unmoved ones'
      # persistent chains continue and keep z^K
      k_shift, k_pick, k_round = jax.random.split(key, 3)
      pick = jax.random.bernoulli(k_pick, self.config.em.get("em_shift_fraction", 1.0),
                                  xs.shape[:-3])
      xs_e, moved = data.random_shift_where(k_shift, xs, shift, pick)
      return self.em_round(state, xs_e, k_round, index=index, fill=~moved)

    def gaussian_warmup(state):
      shift, xs_w, k_round, fill = self.config.em.get("warm_shift", 0), xs, key, None
      if shift:  # em.warm_shift: the warm-up's rounds on shifted images
        k_shift, k_round = jax.random.split(key)
        pick = None
        if self.config.em.get("warm_shift_decay", False):
          # each image moved with probability 1 − step / warm-up rounds: none by its end
          rounds = self.config.em.gaussian_warmup_rounds
          pick = ~jax.random.bernoulli(jax.random.fold_in(k_shift, 1),
                                       jnp.minimum(state.step / rounds, 1.0), xs.shape[:-3])
        xs_w, moved = data.random_shift_where(k_shift, xs, shift, pick)
        if self.config.em.get("warm_fill_unshifted", False):  # the chains keep unshifted z^K
          fill = ~moved
      return self.em_round(state, xs_w, k_round, "gaussian_warmup", index=index, fill=fill)

    def joint_warmup(state):
      em_metrics = jax.eval_shape(em, state)[1]
      state, metrics = self.joint_round(state, xs, key)
      return state, {k: metrics.get(k, jnp.zeros(v.shape, v.dtype))
                     for k, v in em_metrics.items()}

    forms = {"gaussian_warmup": gaussian_warmup, "joint_warmup": joint_warmup, "em": em}
    if phase is not None:
      if phase not in forms:
        raise ValueError(f"phase must be one of {sorted(forms)} or None, got {phase!r}")
      state, metrics = forms[phase](state)
    elif self.warm_decoder is not None and self.config.em.gaussian_warmup_rounds:
      state, metrics = jax.lax.cond(state.step < self.config.em.gaussian_warmup_rounds,
                                    gaussian_warmup, em, state)
    elif self.config.em.joint_warmup_rounds:
      state, metrics = jax.lax.cond(state.step < self.config.em.joint_warmup_rounds,
                                    joint_warmup, em, state)
    else:
      state, metrics = em(state)
    return state.replace(step=state.step + 1), metrics

