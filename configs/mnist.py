"""Diffusion encoder + gaussian decoder on mnist5k (4,500 train / 500 held-out): the CPU default.

default.py's recipe, trained for 4,500 rounds with the learning rate decayed by a cosine to 0
and AdamW weight decay 0.1, and a latent DDPM prior fitted to z⁰ alongside for sampling (it
does not change the encoder or decoder). docs/recipes.md has the measured figures and wall times."""

from configs import default


def get_config():
  config = default.get_config()
  config.train.num_steps = 4500
  config.train.lr_schedule = "cosine"
  config.train.eval_every = 1500
  config.train.weight_decay = 0.1
  config.em.latent_prior = True
  return config
