"""The paper's configuration on mnist5k: the diffusion encoder trained by EM against a
z-conditioned diffusion decoder (the transformer denoiser of configs/mnist_diffae.py, v-MSE).
EM starts after a DiffAE-style joint warm-up (em.joint_warmup_rounds) that makes z informative:
from a decoder that ignores z, EM stays there. docs/recipes.md has the measured figures."""

from configs import default


def get_config():
  config = default.get_config()
  config.model.decoder = "diffusion"
  config.model.denoiser = "dit"
  config.model.dec_parameterization = "v"
  config.model.dec_weighting = "v"
  config.em.joint_warmup_rounds = 1500
  config.em.m_updates = 1
  config.em.langevin.num_steps = 3
  config.em.langevin.step_rule = "snr"
  config.em.langevin.mala = False  # the snr rule's step depends on the gradient: no MALA
  config.em.langevin.mc_samples = 2  # one λ, with ε and −ε
  config.em.eval_refine_steps = 3
  config.train.num_steps = 2500
  config.train.lr_schedule = "cosine"
  config.train.eval_every = 500
  config.train.checkpoint_every = 500
  config.eval.decoder_steps = 20
  return config
