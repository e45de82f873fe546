"""The rate–distortion sweep: `python -m diffenc_jax.experiments.rate_distortion
--config configs/rd_sweep.py`.

diffenc (configs/mnist.py) and the VAE (configs/mnist_vae.py) with the gaussian decoder
(σ_x = 0.1) at every β of `betas`, seeds 0…seeds−1 and one more seed at `extra_seed_betas`,
each for `num_steps` rounds of the matched recipe (lr_schedule, weight_decay), evaluated on the
500 held-out digits. At σ_x = 0.1 the likelihood of 784 pixels dwarfs the prior, so `betas`
spans 1…10⁴; docs/rate.md has the rates it gives and the sweep's wall time.
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.methods = "diffenc,vae"
  config.method_configs = ml_collections.ConfigDict(dict(diffenc="configs.mnist",
                                                         vae="configs.mnist_vae"))
  config.betas = "1,10,100,1000,10000"
  config.seeds = 1  # seeds 0…seeds−1 at every β
  config.extra_seed_betas = "10,100,1000"  # one more seed at these β
  config.num_steps = 1000  # rounds per point (sized in docs/rate.md)
  config.lr_schedule = "cosine"
  config.weight_decay = 0.1
  # constant | anneal: anneal runs β log-linearly from min(beta_start, β) to β over
  # beta_anneal_steps rounds (bottleneck.beta_schedule); their runs are named METHOD_betaB_anneal
  config.beta_schedule = "constant"
  config.beta_start = 1.0
  config.beta_anneal_steps = 0
  config.floors = "8,6,4,2,0"  # log-SNR floors of diffenc's rate curve (≤ its λ_max = 8)
  config.workdir = "runs/rd_sweep"
  config.results = "benchmarks/rd_sweep.md"
  config.plot = "benchmarks/rd_sweep.png"
  config.note = ""
  return config
