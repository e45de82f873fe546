"""DMZ baseline on mnist5k: 16 Bernoulli bits (relaxed in training, τ = dmz.temperature), one
cross-attention token into the U-Net (configs/mnist_diffdec.py's size), ε-MSE with DDPM-IP
(γ = 0.1), respaced 10-step DDIM decoding; batch 128."""

from configs import default


def get_config():
  config = default.get_config()
  config.method = "dmz"
  config.model.decoder = "diffusion"
  config.model.unet_conditioning = "xattn"
  config.dmz.input_perturbation = 0.1
  config.dmz.sample_steps = 10
  return config
