"""Ablation on mnist5k: the diffusion encoder of configs/mnist.py trained by one joint loss
through its latent DDIM chain instead of EM (same networks, β, gaussian decoder, batch 128)."""

from configs import default


def get_config():
  config = default.get_config()
  config.method = "diffenc_joint"
  return config
