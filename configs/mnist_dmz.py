"""DMZ on mnist5k, CPU-sized: 16 bits from the encoder's logits, hard in the forward pass of
training too (straight-through: the gradient of sigmoid(logits/τ), τ = dmz.temperature; no
logistic noise, dmz.noise_scale = 0: with the noise the codes collapse), the transformer denoiser
of configs/mnist_diffae.py (z enters by adaLN; on the U-Net, `--config.model.denoiser=unet`, it
is DMZ's one cross-attention token) predicting v and trained by the v-MSE with DDPM-IP
(γ = 0.1); the encoder at a fifth of the default rate (at the default its codes can freeze);
batch 128; decoding by respaced 20-step DDIM.
docs/recipes.md has the measured figures."""

from configs import default


def get_config():
  config = default.get_config()
  config.method = "dmz"
  config.model.decoder = "diffusion"
  config.model.denoiser = "dit"
  config.model.dec_parameterization = "v"
  config.model.dec_weighting = "v"
  config.model.unet_conditioning = "xattn"
  config.dmz.input_perturbation = 0.1
  config.dmz.straight_through = True
  config.dmz.noise_scale = 0.0
  config.dmz.sample_steps = 20
  # the encoder at a fifth of the default rate: at the default the codes can freeze, one code
  # for every digit (docs/recipes.md, "configs/mnist_dmz.py")
  config.train.enc_lr = 2e-4
  config.train.num_steps = 6000
  config.train.lr_schedule = "cosine"
  config.train.eval_every = 2000
  config.train.checkpoint_every = 1000
  config.eval.decoder_steps = 20
  return config
