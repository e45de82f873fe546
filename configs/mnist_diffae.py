"""DiffAE on mnist5k, CPU-sized: deterministic conv encoder → z (16), a z-conditioned transformer
denoiser (7×7 patches = 16 tokens, width 128, 4 blocks, adaLN-Zero) predicting v and trained by
the v-MSE, gradient through z into the encoder; a latent DDPM prior fitted alongside on the
standardised codes (DiffAE's z-normalisation). Batch 128; decoding by 20-step DDIM.
docs/recipes.md has the measured figures. `--config.model.denoiser=unet` gives DiffAE's own
U-Net (z as a multiplicative scale of its ResBlocks' features), slower per round on a CPU
(docs/recipes.md, "DiffAE and DMZ")."""

from configs import default


def get_config():
  config = default.get_config()
  config.method = "diffae"
  config.model.decoder = "diffusion"
  config.model.denoiser = "dit"
  config.model.dec_parameterization = "v"
  config.model.dec_weighting = "v"
  config.model.unet_conditioning = "scale"
  config.latent_prior.normalize = True
  config.train.num_steps = 6000
  config.train.lr_schedule = "cosine"
  config.train.eval_every = 2000
  config.train.checkpoint_every = 1000
  config.eval.decoder_steps = 20
  return config
