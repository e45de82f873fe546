"""The paper's configuration on mnist5k: the diffusion encoder trained by EM against a
z-conditioned diffusion decoder (the transformer denoiser of configs/mnist_diffae.py, v-MSE).

Rounds 0–1,499 (a quarter) are a gaussian warm-up (em.gaussian_warmup_rounds): EM against an
auxiliary gaussian decoder whose z^K the diffusion decoder learns to use meanwhile (from a
diffusion decoder that ignores z, EM stays there). Its images are moved by up to a pixel with a
probability that falls from 1 to 0 over the warm-up (em.warm_shift, em.warm_shift_decay): the
early shifts make the codes linear in the digit's class, the late unshifted rounds train the
decoders on the images EM sees. Rounds 1,500–5,999 are EM against the diffusion decoder with
the encoder at its full rate. Its E-step keeps a persistent chain per training example
(em.chain_slots; no shift augmentation in EM), filled by the warm-up's unmoved visits
(em.warm_fill_unshifted), continued at every visit by 2 steps of stochastic-gradient Langevin
(one fresh ELBO draw at every step, λ drawn where the energy's gradient lives) preconditioned by
a running diagonal curvature estimate; the encoder learns the chains' states. β = 0.25
throughout. docs/recipes.md has what was measured.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.decoder = "diffusion"
  config.model.denoiser = "dit"
  config.model.dec_parameterization = "v"
  config.model.dec_weighting = "v"
  # a colder posterior, p(z) p(x|z)^(1/β): a chain that follows the β = 1 posterior pulls the
  # codes towards the prior and loses what they carry (docs/recipes.md)
  config.bottleneck.beta = 0.25
  config.em.gaussian_warmup_rounds = 1500
  config.em.warm_shift = 1
  config.em.warm_shift_decay = True
  config.em.warm_fill_unshifted = True
  config.em.m_updates = 1
  # one persistent chain per training example, continued at every visit: no shifted copies in
  # EM, which would multiply the slots and the rounds between two visits of one chain by 9
  config.data.augment_shift = 0
  config.em.chain_slots = 4500
  config.em.langevin.num_steps = 2
  config.em.langevin.step_rule = "diagonal"
  config.em.langevin.step_size = 0.5
  config.em.langevin.mala = False  # fresh draws: no fixed energy for MALA
  config.em.langevin.fresh_draws = True
  # one (λ, ε) draw, new at every step: half the E-step's passes of an antithetic pair, so
  # twice the rounds (decoder updates) in the same wall; the chain averages over its visits
  config.em.langevin.mc_samples = 1
  config.em.langevin.antithetic = False
  # λ drawn where the energy's gradient lives (it is spread over high λ as well as the
  # middle), not where z buys its nats: the step's noise, and with it the curvature estimate
  # that sets the step, is what this proposal lowers (docs/recipes.md)
  config.em.langevin.log_snr_center = 8.0
  config.em.langevin.log_snr_scale = 4.0
  config.em.eval_refine_steps = 2
  config.train.num_steps = 6000
  config.train.lr_schedule = "cosine"
  config.train.eval_every = 1500
  config.train.checkpoint_every = 250
  config.eval.decoder_steps = 20
  return config
