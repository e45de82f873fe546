"""Diffusion encoder on 2-D toy data (8 gaussians on a ring): seconds on a CPU."""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "toy2d"
  config.data.augment_shift = 0  # points, not images
  config.model.latent_dim = 2
  config.model.sigma_x = 0.05
  config.train.batch_size = 256
  config.train.num_steps = 1000
  return config
