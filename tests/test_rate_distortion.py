"""The rate–distortion sweep end to end on the tiny config on 8×8 digits: 2 β × diffenc and
vae, 1 seed, 2 rounds each (table, figure, rate curve, matched-rate rows, reuse of finished
runs); the seeds' bookkeeping (one more seed at some β, mean ± std) on stand-in suites, without
training."""

import json
import os

import numpy as np
import pytest

from configs import rd_sweep, tiny
from diffenc_jax.experiments import rate_distortion


def get_config():
  """configs/tiny.py on the 8×8 digits: the sweep's method config in this test (both methods;
  `rate_distortion.point_config` sets config.method)."""
  config = tiny.get_config()
  config.data.name = "digits"
  return config


def test_sweep_writes_table_figure_and_rate_curve(tmp_path):
  cfg = rd_sweep.get_config()
  cfg.method_configs.diffenc = cfg.method_configs.vae = "tests.test_rate_distortion"
  cfg.betas = "1,100"
  cfg.extra_seed_betas = ""  # extra seeds: test_sweep_extra_seeds_and_spread, no training
  cfg.num_steps = 2
  cfg.floors = "8,2"
  cfg.beta_schedule, cfg.beta_anneal_steps = "anneal", 2
  cfg.workdir = str(tmp_path / "runs")
  cfg.results = str(tmp_path / "rd.md")
  cfg.plot = str(tmp_path / "rd.png")
  text = rate_distortion.rate_distortion(cfg)

  suite = lambda run: json.load(open(tmp_path / "runs" / run / "suite.json"))
  vae, diffenc = suite("vae_beta100_anneal/seed0"), suite("diffenc_beta100_anneal/seed0")
  assert not os.path.exists(tmp_path / "runs" / "vae_beta100_anneal" / "seed1")
  config = json.load(open(tmp_path / "runs" / "vae_beta100_anneal" / "seed0" / "config.json"))
  assert config["method"] == "vae" and config["model"]["decoder"] == "gaussian"
  assert (config["bottleneck"]["beta"], config["bottleneck"]["beta_schedule"]) == (100.0, "anneal")
  assert (config["bottleneck"]["beta_start"], config["bottleneck"]["beta_anneal_steps"]) == (1.0, 2)
  for s in (vae, diffenc):
    assert s["steps"] == 2 and 0.0 <= s["probe_acc"] <= 1.0
    assert "recon_acc" not in s and "recon_fd" not in s  # no classifier in the sweep
    for code in ("z0", "zK", "zq"):  # distortion of all three codes, PSNR from the MSE
      np.testing.assert_allclose(s[f"psnr_{code}"], -10 * np.log10(s[f"mse_{code}"]), rtol=1e-6)
  assert vae["gap"] > 0  # the VAE's z^K is its refined mean, not the mean again
  # diffenc's rate curve (the forward-noised estimate; the table's rate is the path KL's): less
  # at a lower floor (less blur... of a near-deterministic code: more nats at the higher floor)
  curve = diffenc["rate_curve"]
  assert set(curve) == {"8", "2"} and curve["8"] > curve["2"] > 0
  assert diffenc["rate_nats"] > 0
  assert "rate_curve" not in vae
  # one table row per (method, β)
  rows = [line for line in text.splitlines() if line.startswith("| `")]
  assert len(rows) == 2 * 2 + 2  # rows of the main table and of the rate-curve table
  assert f"{diffenc['psnr_z0']:.2f} |" in text
  assert "## At matched rate" in text and "configs/rd_sweep.py" in text
  assert os.path.getsize(cfg.plot) > 0
  # finished runs are reused: no suite is rewritten, the same table
  mtimes = sorted(os.path.getmtime(p) for p in (tmp_path / "runs").glob("*/seed*/suite.json"))
  assert rate_distortion.rate_distortion(cfg) == text
  assert mtimes == sorted(os.path.getmtime(p)
                          for p in (tmp_path / "runs").glob("*/seed*/suite.json"))


def test_sweep_extra_seeds_and_spread(tmp_path, monkeypatch):
  """seeds 0…seeds−1 at every β and one more at extra_seed_betas; a point of several seeds is
  written as mean ± std (n − 1). compare.run stands in: no training."""
  calls = []

  def run(cfg, method, seed, beta, classifier, config, name):
    assert classifier is None and config.eval.classifier_steps == 0
    calls.append((name, seed))
    out = {"rate_nats": beta * (1 + method.startswith("vae")) + seed, "probe_acc": 0.5,
           "wall_s": 1.0}
    for i, code in enumerate(("z0", "zK", "zq")):
      out[f"mse_{code}"] = 0.01 * (seed + 1 + i) / beta
      out[f"psnr_{code}"] = float(-10 * np.log10(out[f"mse_{code}"]))
    return out

  monkeypatch.setattr(rate_distortion.compare, "run", run)
  cfg = rd_sweep.get_config()
  cfg.method_configs.diffenc = cfg.method_configs.vae = "tests.test_rate_distortion"
  cfg.betas, cfg.seeds, cfg.extra_seed_betas = "1,100", 1, "100"
  cfg.workdir = str(tmp_path / "runs")
  cfg.results, cfg.plot = str(tmp_path / "rd.md"), str(tmp_path / "rd.png")
  text = rate_distortion.rate_distortion(cfg)
  assert sorted(calls) == sorted((f"{m}_beta{b}", s) for m in ("diffenc", "vae")
                                 for b, s in (("1", 0), ("100", 0), ("100", 1)))
  p = [-10 * np.log10(0.01 * (s + 1) / 100) for s in range(2)]
  assert f"{np.mean(p):.2f} ± {np.std(p, ddof=1):.2f}" in text
  assert os.path.getsize(cfg.plot) > 0
  cfg.extra_seed_betas = "10"
  with pytest.raises(ValueError, match="not in betas"):
    rate_distortion.sweep(cfg)


def test_at_rate_interpolates_in_log_rate_and_refuses_to_extrapolate():
  points = [(10.0, 20.0), (1.0, 10.0), (100.0, 30.0)]
  assert rate_distortion.at_rate(points, 10 ** 0.5) == 15.0
  assert rate_distortion.at_rate(points, 100.0) == 30.0
  assert rate_distortion.at_rate(points, 0.5) is None and rate_distortion.at_rate(points, 101) is None
