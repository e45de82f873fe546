"""DiffAE baseline on mnist5k: deterministic conv encoder, z-conditioned U-Net (AdaGN),
ε-MSE through z, latent DDPM prior fitted alongside. The U-Net is configs/mnist_diffdec.py's
(CPU-sized): latent_dim 16, batch 128."""

from configs import default


def get_config():
  config = default.get_config()
  config.method = "diffae"
  config.model.decoder = "diffusion"
  config.model.unet_conditioning = "adagn"
  return config
