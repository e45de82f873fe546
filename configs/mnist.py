"""Diffusion encoder + gaussian decoder on mnist5k (4,500 train / 500 held-out): the CPU default.

default.py's recipe with a v-predicting encoder trained by the v-MSE, for 4,500 rounds with the
learning rate decayed by a cosine to 0 and AdamW weight decay 0.1, and a latent DDPM prior fitted
to z⁰ alongside for sampling (it does not change the encoder or decoder). The v encoder's
ε̂ = σ_t z + α_t v̂ is the prior's exact predictor when the network outputs 0, and the v-MSE
trains it at every log-SNR, so a code that carries nothing is rated at nothing (docs/rate.md).
docs/recipes.md has the measured figures and wall times."""

from configs import default


def get_config():
  config = default.get_config()
  config.train.num_steps = 4500
  config.train.lr_schedule = "cosine"
  config.train.eval_every = 1500
  config.train.weight_decay = 0.1
  config.em.latent_prior = True
  config.model.enc_parameterization = "v"
  config.model.enc_weighting = "v"
  return config
