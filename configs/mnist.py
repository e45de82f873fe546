"""Diffusion encoder + gaussian decoder on mnist5k (4,500 train / 500 held-out): the CPU default."""

from configs import default


def get_config():
  config = default.get_config()
  return config
