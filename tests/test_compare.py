"""The comparison command end to end on the tiny config: table, plot, reuse of finished runs."""

import json
import os

from configs import compare as compare_config
from diffenc_jax.experiments import compare


def test_compare_writes_table_and_plot_and_reuses_runs(tmp_path):
  cfg = compare_config.get_config()
  cfg.method_configs.diffenc = "configs.tiny"
  cfg.methods = "diffenc"
  cfg.seeds = 2
  cfg.num_steps = 2
  cfg.rd_methods = "diffenc"
  cfg.rd_betas = "1,4"
  cfg.classifier_steps = 5
  cfg.workdir = str(tmp_path / "runs")
  cfg.results = str(tmp_path / "results.md")
  cfg.rd_plot = str(tmp_path / "rd.png")
  text = compare.compare(cfg)

  suites = {}
  for run in ("diffenc/seed0", "diffenc/seed1", "diffenc_beta4/seed0"):
    with open(tmp_path / "runs" / run / "suite.json") as f:
      suites[run] = json.load(f)
  assert suites["diffenc_beta4/seed0"]["beta"] == 4.0
  assert {s["steps"] for s in suites.values()} == {2}
  for s in suites.values():
    assert 0.0 <= s["probe_acc"] <= 1.0 and 0.0 <= s["recon_acc"] <= 1.0
    assert s["sample_fd"] >= 0.0 and s["psnr_z0"] > 0.0
  # the table's diffenc row is the mean ± std (n−1) of the two seeds
  p = [suites[f"diffenc/seed{i}"]["psnr_z0"] for i in range(2)]
  mean, std = sum(p) / 2, abs(p[0] - p[1]) / 2 ** 0.5
  assert f"{mean:.2f} ± {std:.2f}" in text
  assert os.path.getsize(cfg.rd_plot) > 0
  # each run records the device its wall time was measured on, and the table names it
  assert {s["device"] for s in suites.values()} == {compare.describe_device()}
  assert f"seconds of training on {compare.describe_device()}" in text
  # a run's wall is its own clock: the last train/elapsed_s of its metrics.jsonl
  for run, suite in suites.items():
    with open(tmp_path / "runs" / run / "metrics.jsonl") as f:
      clock = [json.loads(l)["train/elapsed_s"] for l in f if "train/elapsed_s" in l]
    assert suite["wall_s"] == clock[-1] > 0
  # a finished run is reused, not trained again: suites untouched, the same table rows
  mtimes = {r: os.path.getmtime(tmp_path / "runs" / r / "suite.json") for r in suites}
  again = compare.compare(cfg)
  assert mtimes == {r: os.path.getmtime(tmp_path / "runs" / r / "suite.json") for r in suites}
  rows = lambda t: [line for line in t.splitlines() if line.startswith("| `")]
  assert rows(again) == rows(text)


def test_method_config_sets_the_matched_budget_and_schedule():
  cfg = compare_config.get_config()
  cfg.num_steps, cfg.lr_schedule, cfg.weight_decay = 7, "cosine", 0.05
  config = compare.method_config(cfg, "vae", seed=3, beta=4.0)
  assert config.method == "vae"
  assert (config.train.num_steps, config.train.lr_schedule) == (7, "cosine")
  assert config.train.weight_decay == 0.05
  assert (config.seed, config.bottleneck.beta, config.train.eval_every) == (3, 4.0, 7)
  # configs/mnist.py's own 4,500 cosine rounds and weight decay do not leak into the comparison
  diffenc = compare.method_config(compare_config.get_config(), "diffenc", seed=0)
  assert (diffenc.train.num_steps, diffenc.train.lr_schedule) == (1500, "constant")
  assert diffenc.train.weight_decay == 0.0


def test_recipe_mode_keeps_each_methods_own_config():
  """num_steps = 0: every method trains as `python main.py --config configs/<name>.py` would,
  but for the seed; seed_list picks the seeds."""
  from configs import mnist, mnist_diffdec
  cfg = compare_config.get_config()
  cfg.num_steps = 0
  for method, module in (("diffenc", mnist), ("diffenc_diffdec", mnist_diffdec)):
    config = compare.method_config(cfg, method, seed=2)
    own = module.get_config()
    own.seed = 2
    assert config.to_dict() == own.to_dict()
  assert compare.seeds(cfg) == [0, 1, 2]
  cfg.seed_list = "1, 2"
  assert compare.seeds(cfg) == [1, 2]
