"""DiffAE's published 64×64 autoencoder architecture, run at 32×32 RGB (CIFAR-10 via TFDS):
GPU-sized, for benchmarks (which feed random inputs of this shape).

U-Net: 64 channels, channel_mult (1, 2, 4, 8), 2 res blocks, attention at 16×16, embedding 512,
dropout 0.1, z as DiffAE's code has it: a multiplicative scale of each ResBlock's time-modulated
features; ε-prediction with the unit ε-MSE as DiffAE trains it (set model.dec_parameterization /
dec_weighting to 'v' for the v-MSE); the latent prior on standardised z. Encoder: ResNetEncoder, 64 channels, channel_mult (1, 2, 4, 8, 8), 2 res
blocks, attention at 16×16, 512-d output. Latent prior: DiffAE's latent DDPM is a 10-layer,
2048-wide MLP with skips; here 5 residual blocks (2 Dense each) of width 2048.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.method = "diffae"
  config.data.name = "tfds"
  config.data.tfds_name = "cifar10"
  config.data.image_size = 32
  config.model.latent_dim = 512
  config.model.decoder = "diffusion"
  config.model.unet_channels = 64
  config.model.unet_channel_mult = (1, 2, 4, 8)
  config.model.unet_num_res_blocks = 2
  config.model.unet_attn_resolutions = (16,)
  config.model.unet_emb_dim = 512
  config.model.unet_dropout = 0.1
  config.model.unet_conditioning = "scale"
  config.model.dec_parameterization = "eps"
  config.model.dec_weighting = "unit"
  config.latent_prior.normalize = True
  config.diffae.encoder = "resnet"
  config.diffae.resnet_channels = 64
  config.diffae.resnet_channel_mult = (1, 2, 4, 8, 8)
  config.diffae.resnet_num_res_blocks = 2
  config.diffae.resnet_attn_resolutions = (16,)
  config.latent_prior.hidden = 2048
  config.latent_prior.blocks = 5
  config.train.batch_size = 128
  config.train.enc_lr = 1e-4
  config.train.dec_lr = 1e-4
  config.latent_prior.lr = 1e-4
  config.train.ema_decay = 0.9999
  config.eval.use_ema = True
  return config
