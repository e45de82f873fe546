"""β-VAE baseline on mnist5k: Gaussian encoder, the default gaussian MLP decoder, β =
bottleneck.beta.

Matched with configs/mnist.py (the diffusion encoder): latent_dim 16, batch 128, same decoder,
same encoder trunk (model.enc_channels, model.enc_features), same σ_x and β.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.method = "vae"
  return config
