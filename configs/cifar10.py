"""Diffusion encoder + diffusion decoder on CIFAR-10 via TFDS (prepare it first with
`tfds build cifar10`): GPU-sized."""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "tfds"
  config.data.tfds_name = "cifar10"
  config.model.latent_dim = 128
  config.model.decoder = "diffusion"
  config.model.enc_channels = (64, 128, 256)
  config.model.enc_features = 512
  config.model.enc_hidden = 512
  config.model.unet_channels = 128
  config.model.unet_channel_mult = (1, 2, 2)
  config.model.unet_num_res_blocks = 2
  config.model.unet_attn_resolutions = (16,)
  config.model.unet_emb_dim = 512
  config.model.unet_dropout = 0.1
  config.em.langevin.step_rule = "fixed"
  config.em.langevin.step_size = 0.01
  config.em.langevin.max_move = 1.0
  config.em.langevin.mala = False  # a capped move has no proposal density
  config.em.langevin.mc_samples = 2
  config.train.batch_size = 128
  config.train.num_steps = 200_000
  config.train.enc_lr = 2e-4
  config.train.dec_lr = 2e-4
  config.train.eval_every = 10_000
  config.train.checkpoint_every = 5_000
  config.eval.use_ema = True
  config.train.ema_decay = 0.9999
  return config
