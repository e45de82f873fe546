"""Diffusion encoder + z-conditioned diffusion (U-Net) decoder on mnist5k."""

from configs import default


def get_config():
  config = default.get_config()
  config.model.decoder = "diffusion"
  config.em.langevin.step_rule = "fixed"
  config.em.langevin.step_size = 0.02
  config.em.langevin.max_move = 1.0
  config.em.langevin.mala = False  # a capped move has no proposal density
  config.em.langevin.mc_samples = 2
  config.em.beta = 1.0
  return config
