r"""The rate–distortion sweep: diffenc and the VAE over decades of β, gaussian decoder.

    python -m diffenc_jax.experiments.rate_distortion --config configs/rd_sweep.py \
        [--config.num_steps=… --config.betas=1,10,100,1000,10000]

trains every method of `methods` at every β of `betas` (seeds 0…seeds−1, and one seed more at
each β of `extra_seed_betas`) with `experiments.compare.run` (its matched recipe: num_steps
rounds, lr_schedule, weight_decay; the gaussian decoder), then writes

  `results`  markdown: per method and β, mean ± std over seeds of the held-out rate (nats), the
             distortion (MSE and PSNR, pixels in [0, 1]) of the encoder's code z⁰ (the VAE's
             mean), of its Langevin-refined z^K (the VAE's mean refined by the same chain), and
             of z_q, the variable whose rate is reported (diffenc: z⁰ blurred at λ_max; VAE: a
             sample of q(z|x)); probe accuracy; diffenc's rate at lower log-SNR floors
             (`evaluate.rate_curve`); and diffenc against the VAE at matched rate;
  `plot`     one figure: distortion (MSE; PSNR) against rate for both methods and their three
             codes, with the seeds' spread as error bars, and probe accuracy against rate.

Runs live in WORKDIR/METHOD_betaB[_anneal]/seedS (a run with a suite.json is reused).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
from absl import app, flags

# importing compare defines the --config flag (a config file) that this command reads too
from diffenc_jax.experiments import compare

CODES = ("z0", "zK", "zq")
# what each code is, per method, in the figure's legend
LABELS = {"vae": {"z0": "mean", "zK": "refined mean", "zq": "sample of q (rated)"}}
DEFAULT_LABELS = {"z0": "z⁰", "zK": "z^K", "zq": "z_q (rated)"}


def point_config(cfg, method: str, seed: int, beta: float):
  """The training config of one point: compare's matched recipe at β (config.method = method,
  so that one config module can serve both methods), gaussian decoder, and the sweep's β
  schedule (anneal: from min(beta_start, β) over beta_anneal_steps rounds); no feature
  classifier (eval.classifier_steps = 0)."""
  config = compare.method_config(cfg, method, seed, beta)
  config.method = method
  config.model.decoder = "gaussian"
  # the sweep reports no classifier metrics: none is trained for its evaluations either
  config.eval.classifier_steps = 0
  if cfg.beta_schedule == "anneal":
    config.bottleneck.beta_schedule = "anneal"
    config.bottleneck.beta_start = min(cfg.beta_start, beta)
    config.bottleneck.beta_anneal_steps = cfg.beta_anneal_steps
  return config


def run_name(cfg, method: str, beta: float) -> str:
  return f"{method}_beta{beta:g}" + ("_anneal" if cfg.beta_schedule == "anneal" else "")


def floors(cfg) -> list[float]:
  return [float(f) for f in compare.split(cfg.floors)]


def add_rate_curve(cfg, suite: dict, workdir: str) -> dict:
  """suite plus "rate_curve" ({floor: held-out rate}) for a diffusion-KL method, written back
  to its suite.json; computed once per run."""
  if suite.get("rate_kind") != "diffusion KL" or "rate_curve" in suite or not floors(cfg):
    return suite
  import jax
  from diffenc_jax import api, data, evaluate

  model = api.Autoencoder.load(workdir)
  images, _ = data.load_eval_split(model.config.data, "test")
  curve = evaluate.rate_curve(model.config, model.method, model.params, images, floors(cfg),
                              jax.random.key(model.config.seed + 7))
  suite["rate_curve"] = {f"{f:g}": float(r) for f, r in zip(curve["floor"], curve["rate_nats"])}
  suite["point_mass_curve"] = {f"{f:g}": float(r) for f, r in
                               zip(curve["floor"], curve["point_mass_nats"])}
  with open(os.path.join(workdir, "suite.json"), "w") as f:
    json.dump(suite, f, indent=1)
  return suite


def sweep(cfg) -> dict[str, dict[float, list[dict]]]:
  """{method: {β: [suite per seed]}}, training what is missing. The suite is
  `evaluate.comparison_metrics` without the classifier's metrics (rate, distortion, probe)."""
  methods = compare.split(cfg.methods)
  unknown = sorted(set(methods) - set(cfg.method_configs))
  if unknown:
    raise ValueError(f"no config for methods {unknown}; known: {sorted(cfg.method_configs)}")
  betas = [float(b) for b in compare.split(cfg.betas)]
  extra = {float(b) for b in compare.split(cfg.extra_seed_betas)}
  if extra - set(betas):
    raise ValueError(f"extra_seed_betas {sorted(extra - set(betas))} are not in betas")
  out = {}
  for method in methods:
    out[method] = {}
    for beta in betas:
      seeds = range(cfg.seeds + (1 if beta in extra else 0))
      name = run_name(cfg, method, beta)
      out[method][beta] = [
          add_rate_curve(cfg, compare.run(cfg, method, s, beta, None,
                                          point_config(cfg, method, s, beta), name),
                         os.path.join(cfg.workdir, name, f"seed{s}"))
          for s in seeds]
  return out


def stats(runs: list[dict], key: str) -> tuple[float, float]:
  """(mean, std over seeds (n − 1); 0 for one seed)."""
  v = np.array([r[key] for r in runs], np.float64)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def cell(runs: list[dict], key: str, fmt: str) -> str:
  mean, std = stats(runs, key)
  return fmt.format(mean) if len(runs) == 1 else f"{fmt.format(mean)} ± {fmt.format(std)}"


def at_rate(points: list[tuple[float, float]], rate: float) -> float | None:
  """Linear interpolation in log rate of a curve [(rate, value)]; None outside its range."""
  points = sorted(points)
  rates = [math.log(r) for r, _ in points]
  if not points or not rates[0] <= math.log(rate) <= rates[-1]:
    return None
  return float(np.interp(math.log(rate), rates, [v for _, v in points]))


def matched_rate_rows(results) -> list[str]:
  """Each diffenc point against the VAE's curve interpolated at diffenc's rate: the rated
  variables (diffenc's z_q, the VAE's sample of q), z⁰ vs the VAE's mean and z^K vs its refined
  mean (PSNR, dB)."""
  if not {"diffenc", "vae"} <= set(results):
    return []
  vae = {code: [(stats(runs, "rate_nats")[0], stats(runs, f"psnr_{code}")[0])
                for runs in results["vae"].values()] for code in ("zq", "z0", "zK")}
  rows = []
  for beta, runs in results["diffenc"].items():
    rate = stats(runs, "rate_nats")[0]
    cells = [f"{beta:g}", f"{rate:.1f}"]
    for code in ("zq", "z0", "zK"):
      mine, theirs = stats(runs, f"psnr_{code}")[0], at_rate(vae[code], rate)
      cells += [f"{mine:.2f}", "—" if theirs is None else f"{theirs:.2f}",
                "—" if theirs is None else f"{mine - theirs:+.2f}"]
    rows.append("| " + " | ".join(cells) + " |")
  return rows


def plot(cfg, results, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  colors = {"diffenc": "C0", "vae": "C3"}
  styles = {"z0": ("o", "-"), "zK": ("s", "--"), "zq": ("^", ":")}
  for method, by_beta in results.items():
    betas = sorted(by_beta)
    rate = np.array([stats(by_beta[b], "rate_nats") for b in betas])
    for code in CODES:
      marker, line = styles[code]
      kw = dict(color=colors.get(method), marker=marker, linestyle=line, capsize=2, ms=4,
                label=f"{method}: {LABELS.get(method, DEFAULT_LABELS)[code]}")
      mse = np.array([stats(by_beta[b], f"mse_{code}") for b in betas])
      psnr = np.array([stats(by_beta[b], f"psnr_{code}") for b in betas])
      axes[0].errorbar(rate[:, 0], mse[:, 0], xerr=rate[:, 1], yerr=mse[:, 1], **kw)
      axes[1].errorbar(rate[:, 0], psnr[:, 0], xerr=rate[:, 1], yerr=psnr[:, 1], **kw)
    probe = np.array([stats(by_beta[b], "probe_acc") for b in betas])
    axes[2].errorbar(rate[:, 0], probe[:, 0], xerr=rate[:, 1], yerr=probe[:, 1],
                     color=colors.get(method), marker="o", capsize=2, ms=4, label=method)
    for b, r, p in zip(betas, rate[:, 0], [stats(by_beta[b], "psnr_z0")[0] for b in betas]):
      axes[1].annotate(f"β={b:g}", (r, p), fontsize=6, textcoords="offset points",
                       xytext=(3, -8), color=colors.get(method))
  axes[0].set_yscale("log")
  axes[0].set_ylabel("held-out MSE (pixels in [0, 1])")
  axes[1].set_ylabel("held-out PSNR (dB)")
  axes[2].set_ylabel("linear-probe accuracy on z⁰ / mean")
  for ax in axes:
    ax.set_xscale("log")
    ax.set_xlabel("held-out rate KL(q(z|x) ‖ N(0, I)) (nats)")
    ax.grid(alpha=0.3, which="both")
  axes[1].legend(fontsize=7)
  axes[2].legend(fontsize=7)
  first = point_config(cfg, next(iter(results)), 0, 1.0)
  fig.suptitle(f"{first.data.name}, d = {first.model.latent_dim}, σ_x = "
               f"{first.model.sigma_x:g}, {cfg.num_steps} rounds; bars: std over seeds",
               fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def command(cfg) -> str:
  return (f"python -m diffenc_jax.experiments.rate_distortion --config configs/rd_sweep.py "
          f"--config.num_steps={cfg.num_steps} --config.betas={cfg.betas} "
          f"--config.seeds={cfg.seeds} --config.extra_seed_betas={cfg.extra_seed_betas} "
          f"--config.lr_schedule={cfg.lr_schedule} --config.weight_decay={cfg.weight_decay:g} "
          f"--config.beta_schedule={cfg.beta_schedule}"
          + (f" --config.beta_start={cfg.beta_start:g} "
             f"--config.beta_anneal_steps={cfg.beta_anneal_steps}"
             if cfg.beta_schedule == "anneal" else ""))


def rate_distortion(cfg) -> str:
  """Runs the sweep `cfg` (configs/rd_sweep.py) and returns the markdown it writes."""
  results = sweep(cfg)
  for path in (cfg.results, cfg.plot):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  plot(cfg, results, cfg.plot)
  columns = [("rate (nats)", "rate_nats", "{:.1f}")]
  for code in ("z0", "zK", "zq"):
    columns += [(f"MSE {code}", f"mse_{code}", "{:.4f}"), (f"PSNR {code}", f"psnr_{code}",
                                                           "{:.2f}")]
  columns += [("probe acc.", "probe_acc", "{:.3f}"), ("wall (s)", "wall_s", "{:.0f}")]
  head = ["method", "β", "seeds"] + [c[0] for c in columns]
  rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  curve_rows = []
  for method, by_beta in results.items():
    for beta, runs in by_beta.items():
      rows.append("| " + " | ".join([f"`{method}`", f"{beta:g}", str(len(runs))] +
                                    [cell(runs, k, f) for _, k, f in columns]) + " |")
      if "rate_curve" in runs[0]:
        keys = list(runs[0]["rate_curve"])
        curve_rows.append("| " + " | ".join(
            [f"`{method}`", f"{beta:g}"] +
            [f"{np.mean([r['rate_curve'][k] for r in runs]):.1f} "
             f"({np.mean([r['point_mass_curve'][k] for r in runs]):.1f})" for k in keys]) + " |")
  curve_text = ""
  if curve_rows:
    keys = [f"{f:g}" for f in floors(cfg)]
    curve_text = ("\n## diffenc's rate against the log-SNR floor (`evaluate.rate_curve`)\n\n"
                  "The forward-noised estimate (eval.rate_estimator = diffusion_kl) of z⁰ blurred "
                  "at each floor λ_f (in brackets: a deterministic code at the same z⁰ blurred "
                  "there); not the table's rate unless that is diffusion_kl (then it is the "
                  "first column's, at the latent schedule's λ_max).\n\n"
                  "| method | β | " + " | ".join(f"λ_f = {k}" for k in keys) + " |\n|" +
                  "---|" * (len(keys) + 2) + "\n" + "\n".join(curve_rows) + "\n")
  matched = matched_rate_rows(results)
  matched_text = ""
  if matched:
    matched_text = ("\n## At matched rate: diffenc against the VAE's curve\n\n"
                    "The VAE's PSNR interpolated (linear in log rate, seed means) at each diffenc "
                    "point's rate; — where that rate is outside the VAE's range.\n\n"
                    "| β | rate | PSNR z_q | VAE sample | Δ | PSNR z⁰ | VAE mean | Δ | PSNR z^K | "
                    "VAE refined mean | Δ |\n|" + "---|" * 11 + "\n" + "\n".join(matched) + "\n")
  first = point_config(cfg, next(iter(results)), 0, 1.0)
  setup = (f"{first.data.name}, gaussian decoder (σ_x = {first.model.sigma_x:g}), latent_dim "
           f"{first.model.latent_dim}, batch {first.train.batch_size}")
  every = [r for by_beta in results.values() for runs in by_beta.values() for r in runs]
  device = " and ".join(sorted({r.get("device", "an unrecorded device") for r in every}))
  note = f"\n{cfg.note}\n" if cfg.note else ""
  text = f"""# Rate–distortion on {first.data.name} (held-out), diffenc against the VAE

Generated by `{command(cfg)}`: {setup},
{cfg.num_steps} rounds per point, trained on the train split and evaluated on the held-out
split; mean ± std over seeds where a point has more than one. Wall: seconds of training
on {device}, compilation and one evaluation included. What the rate means: docs/rate.md.

- rate: KL(q(z|x) ‖ N(0, I)), nats, of the decoded z_q; diffenc's by its eval.rate_estimator
  (path_kl: the path KL of its ancestral sampler, an upper bound on the KL of that sampler's
  last noisy state z_q; diffusion_kl: the forward-noised estimate of z⁰ blurred at λ_max);
  the VAE's analytic.
- z0: the encoder's own code (diffenc: its sample z⁰; VAE: the posterior mean). zK: that code
  after em.eval_refine_steps Langevin steps on p(z) p(x|z)^(1/β) (the same chain for
  both). zq: the variable whose rate is reported (diffenc: the path sampler's last noisy
  state, or z⁰ blurred at λ_max under diffusion_kl; VAE: a sample of q(z|x)). MSE and PSNR
  with pixels in [0, 1].
- probe acc.: logistic regression on the train split's z⁰ (VAE: mean), held-out accuracy.
{note}
{chr(10).join(rows)}
{curve_text}{matched_text}"""
  with open(cfg.results, "w") as f:
    f.write(text)
  return text


def main(argv):
  del argv
  try:
    print(rate_distortion(flags.FLAGS.config))
  except ValueError as e:
    raise app.UsageError(str(e)) from None


if __name__ == "__main__":
  app.run(main)
