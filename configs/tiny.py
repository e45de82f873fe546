"""A tiny diffusion-encoder config for tests and the notebook: seconds on a CPU."""

from configs import default


def get_config():
  config = default.get_config()
  config.data.num_test = 64
  config.model.latent_dim = 4
  config.model.enc_channels = (8, 16)
  config.model.enc_features = 32
  config.model.enc_hidden = 32
  config.model.enc_blocks = 1
  config.model.dec_hidden = (32,)
  config.model.unet_channels = 8
  config.model.unet_channel_mult = (1, 2)
  config.model.unet_emb_dim = 32
  config.encoder_sampler.num_steps = 4
  config.em.langevin.num_steps = 3
  config.model.enc_noise_draws = 2
  config.em.eval_refine_steps = 2
  config.train.batch_size = 16
  config.train.num_steps = 4
  config.train.log_every = 2
  config.train.eval_every = 4
  config.train.checkpoint_every = 2
  config.eval.batch_size = 32
  config.eval.rate_samples = 2
  config.eval.rate_steps = 20
  config.eval.num_images = 4
  config.eval.decoder_steps = 3
  config.eval.classifier_steps = 0
  config.eval.probe = False
  return config
