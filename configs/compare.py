"""The method comparison: `python -m diffenc_jax.experiments.compare --config configs/compare.py`.

Every method trains on mnist5k at latent_dim 16, batch 128 and the same number of rounds
(`num_steps`, one optimiser update of each network per round) from its own config, or
(`num_steps = 0`) by its own recipe unchanged, for `seeds` seeds (or the seeds of
`seed_list`); then the held-out suite (`evaluate.comparison_metrics`) runs. A rate–distortion
sweep trains diffenc and vae at each β of `rd_betas` (seed 0). Runs already finished in `workdir`
are reused, so an interrupted comparison continues where it stopped.
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  # method → the config module it trains with
  config.methods = "diffenc,vae,diffae,dmz,diffenc_joint"
  config.method_configs = ml_collections.ConfigDict(dict(
      diffenc="configs.mnist", vae="configs.mnist_vae", diffae="configs.mnist_diffae",
      dmz="configs.mnist_dmz", diffenc_joint="configs.mnist_joint",
      diffenc_diffdec="configs.mnist_diffdec"))
  config.seeds = 3
  config.seed_list = ""  # e.g. "1,2": these seeds instead of 0 … seeds − 1
  # training rounds of every method (the matched budget); 0 = each method's own recipe
  config.num_steps = 1500
  config.lr_schedule = "constant"  # every method's train.lr_schedule: constant | cosine
  config.weight_decay = 0.0  # every method's train.weight_decay (AdamW; 0 = Adam)
  config.rd_methods = "diffenc,vae"
  config.rd_betas = "0.25,1,4"  # β = 1 reuses the seed-0 run of the table
  config.classifier_steps = 0  # feature classifier's training steps; 0 = its default
  config.workdir = "runs/compare"
  config.results = "benchmarks/results.md"
  config.rd_plot = "benchmarks/rate_distortion.png"
  config.note = ""  # a paragraph added to the table's text (e.g. how the runs shared a device)
  return config
