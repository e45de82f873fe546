r"""Trains every method at matched latent size and budget and writes the results table.

    python -m diffenc_jax.experiments.compare --config configs/compare.py \
        [--config.seeds=3 --config.num_steps=1500]

`--config.num_steps=0` trains every method by its own recipe instead (its config's rounds,
learning-rate schedule and weight decay, as `python main.py --config configs/<name>.py` does);
the table then gives each method's rounds and wall time.

writes `config.results` (markdown: method × held-out PSNR, rate, probe accuracy, classifier
Fréchet distances, rounds, wall time; mean ± std over seeds) and `config.rd_plot` (held-out
PSNR against rate for diffenc and vae over a sweep of β). Each run lives in
WORKDIR/METHOD[_betaB]/seedS with its checkpoints and a `suite.json` of its metrics; a run with
a `suite.json` is not trained again.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import time

from absl import app
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "The comparison config.")

# (column, metric key, format) of the table
COLUMNS = (
    ("PSNR z⁰ (dB)", "psnr_z0", "{:.2f}"),
    ("PSNR z^K (dB)", "psnr_zK", "{:.2f}"),
    ("rate (nats)", "rate_nats", "{:.1f}"),
    ("probe acc.", "probe_acc", "{:.3f}"),
    ("recon. acc.", "recon_acc", "{:.3f}"),
    ("recon. FD", "recon_fd", "{:.2f}"),
    ("sample FD", "sample_fd", "{:.2f}"),
    ("rounds", "steps", "{:.0f}"),
    ("wall (s)", "wall_s", "{:.0f}"),
)


def split(csv: str) -> list[str]:
  return [s.strip() for s in csv.split(",") if s.strip()]


def seeds(cfg) -> list[int]:
  """The seeds of the table: `seed_list` where given, else 0 … seeds − 1."""
  return [int(s) for s in split(cfg.seed_list)] if cfg.seed_list else list(range(cfg.seeds))


def method_config(cfg, method: str, seed: int, beta: float | None = None):
  """The training config of one run: the method's own config at the matched budget, or its own
  recipe unchanged (but for the seed and β) when `cfg.num_steps` is 0."""
  config = importlib.import_module(cfg.method_configs[method]).get_config()
  config.seed = seed
  if beta is not None:
    config.bottleneck.beta = beta
  if cfg.num_steps == 0:
    return config
  config.train.num_steps = cfg.num_steps
  config.train.lr_schedule = cfg.lr_schedule
  config.train.weight_decay = cfg.weight_decay
  config.train.eval_every = cfg.num_steps
  config.train.checkpoint_every = cfg.num_steps
  config.train.log_every = max(1, cfg.num_steps // 10)
  return config


def run(cfg, method: str, seed: int, beta: float | None, classifier, config=None,
        name: str | None = None) -> dict:
  """Trains one run (unless its suite.json exists) and returns its held-out suite. `config`
  (default `method_config(cfg, method, seed, beta)`) and `name` (default METHOD[_betaB]) let a
  sibling experiment train its own variant in WORKDIR/NAME/seedS."""
  from diffenc_jax import evaluate, runs, train

  name = name or (method if beta is None else f"{method}_beta{beta:g}")
  workdir = os.path.join(cfg.workdir, name, f"seed{seed}")
  path = os.path.join(workdir, "suite.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  config = config or method_config(cfg, method, seed, beta)
  print(f"--- {name} seed {seed}: {config.train.num_steps} rounds in {workdir}", flush=True)
  start = time.time()
  train.train_and_evaluate(config, workdir)
  # the run's own clock where it has one (it adds up the processes that resumed it, and a run
  # trained beforehand by main.py in workdir keeps its wall time); else this call's
  wall = runs.previous_elapsed(os.path.join(workdir, "metrics.jsonl"), config.train.num_steps)
  wall = wall or time.time() - start
  trainer = train.Trainer(config, workdir)
  state = trainer.restore_or_init(require=True)
  suite = evaluate.comparison_metrics(config, trainer.method, state, classifier)
  suite.update(method=method, seed=seed, beta=config.bottleneck.beta, steps=int(state.step),
               wall_s=wall, rate_kind=trainer.method.rate_kind, device=describe_device())
  with open(path, "w") as f:
    json.dump(suite, f, indent=1)
  return suite


def mean_std(values: list[float], fmt: str) -> str:
  finite = [v for v in values if math.isfinite(v)]
  if len(finite) < len(values):
    return "∞"
  mean = sum(values) / len(values)
  if len(values) == 1:
    return fmt.format(mean)
  std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
  return f"{fmt.format(mean)} ± {fmt.format(std)}"


def results_table(cfg, results: dict[str, list[dict]]) -> str:
  header = ["method", "rate is"] + [c[0] for c in COLUMNS]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for method, runs in results.items():
    cells = [f"`{method}`", runs[0]["rate_kind"]]
    cells += [mean_std([r[key] for r in runs], fmt) for _, key, fmt in COLUMNS]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def rd_plot(cfg, sweep: dict[str, list[dict]], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(5, 3.6))
  for method, runs in sweep.items():
    runs = sorted(runs, key=lambda r: r["rate_nats"])
    ax.plot([r["rate_nats"] for r in runs], [r["psnr_z0"] for r in runs], "o-", label=method)
    for r in runs:
      ax.annotate(f"β={r['beta']:g}", (r["rate_nats"], r["psnr_z0"]), fontsize=7,
                  textcoords="offset points", xytext=(4, -8))
  ax.set_xscale("log")
  ax.set_xlabel("held-out rate (nats)")
  ax.set_ylabel("held-out PSNR from z⁰ (dB, pixels in [0, 1])")
  ax.set_title(f"mnist5k, d = 16, {cfg.num_steps} rounds, seed 0")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def describe_device() -> str:
  """What the wall times were measured on, e.g. "1 × NVIDIA H100 80GB HBM3 (gpu)"."""
  import jax
  devices = jax.devices()
  return f"{len(devices)} × {devices[0].device_kind} ({devices[0].platform})"


def compare(cfg) -> str:
  """Runs the comparison `cfg` (configs/compare.py) and returns the markdown it writes."""
  from diffenc_jax import metrics
  methods = split(cfg.methods)
  unknown = sorted(set(methods + split(cfg.rd_methods)) - set(cfg.method_configs))
  if unknown:
    raise ValueError(f"no config for methods {unknown}; known: {sorted(cfg.method_configs)}")
  data_config = importlib.import_module(cfg.method_configs[methods[0]]).get_config().data
  classifier = metrics.load_or_train_classifier(
      data_config, os.path.join(cfg.workdir, "classifier"),
      steps=cfg.classifier_steps or metrics.DEFAULT_CLASSIFIER_STEPS)
  results = {m: [run(cfg, m, s, None, classifier) for s in seeds(cfg)] for m in methods}
  sweep = {}
  for m in split(cfg.rd_methods):
    betas = [float(b) for b in split(cfg.rd_betas)]
    sweep[m] = [results[m][0] if (b == 1.0 and m in results) else run(cfg, m, 0, b, classifier)
                for b in betas]
  for path in (cfg.results, cfg.rd_plot):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  rd_rows = "\n".join(
      f"| `{m}` | {r['beta']:g} | {r['psnr_z0']:.2f} | {r['rate_nats']:.1f} | "
      f"{r['probe_acc']:.3f} |" for m, runs in sweep.items() for r in runs)
  rd_text = ""
  if sweep:
    rd_plot(cfg, sweep, cfg.rd_plot)
    rd_text = f"""
## Rate–distortion (seed 0): `{os.path.basename(cfg.rd_plot)}`

| method | β | PSNR z⁰ (dB) | rate (nats) | probe acc. |
|---|---|---|---|---|
{rd_rows}
"""
  every_run = [r for runs in results.values() for r in runs]
  every_run += [r for runs in sweep.values() for r in runs]
  device = " and ".join(sorted({r.get("device", "an unrecorded device") for r in every_run}))
  note = f"\n{cfg.note}\n" if cfg.note else ""
  # weight decay only when set, so tables made before the field existed render unchanged
  wd_flag = f" --config.weight_decay={cfg.weight_decay:g}" if cfg.weight_decay else ""
  wd_text = f" with AdamW weight decay {cfg.weight_decay:g}" if cfg.weight_decay else ""
  seed_flag = (f"--config.seed_list={cfg.seed_list}" if cfg.seed_list
               else f"--config.seeds={cfg.seeds}")
  seed_text = ", ".join(str(s) for s in seeds(cfg))
  command = (f"python -m diffenc_jax.experiments.compare --config configs/compare.py "
             f"--config.methods={cfg.methods}\n{seed_flag} --config.num_steps={cfg.num_steps} "
             f"--config.rd_methods={cfg.rd_methods}")
  if cfg.num_steps:
    command += f"\n--config.rd_betas={cfg.rd_betas} --config.lr_schedule={cfg.lr_schedule}{wd_flag}"
    budget = (f"{cfg.num_steps} training rounds at a {cfg.lr_schedule} learning rate{wd_text}")
  else:
    budget = ("its own recipe (`configs/<name>.py` as `python main.py` trains it: its rounds, "
              "learning-rate schedule and weight decay; the rounds column)")
  text = f"""# Method comparison on mnist5k (held-out)

Generated by
`{command}`. Every method: latent_dim
16, batch 128, {budget}, trained on
the 4,500 training digits and evaluated on the 500 held-out ones; mean ± std over seeds
{seed_text}.

- PSNR: 10 log10(1/MSE) with pixels in [0, 1], from the encoder's own code z⁰ and (diffenc) after
  Langevin refinement z^K; for the diffusion decoders (diffae, dmz) the decode is a DDIM sample.
- rate: KL(q(z|x) ‖ p(z)) in nats, computed as the "rate is" column says.
- probe acc.: logistic regression on the train split's z⁰, accuracy on the held-out split.
- recon. acc.: accuracy of a small CNN classifier (trained by the project on the train split)
  on held-out reconstructions. recon./sample FD: Fréchet distance in that classifier's 128
  penultimate features between the held-out images and their reconstructions / 500 samples
  from the prior. **Not Inception FID**: comparable only within this table.
- wall: seconds of training on {device}, from the first round (its compilation included) to the
  last, with the evaluations in between: the run's own clock (`train/elapsed_s` in its
  metrics.jsonl).
{note}
{results_table(cfg, results)}
{rd_text}"""
  with open(cfg.results, "w") as f:
    f.write(text)
  return text


def main(argv):
  del argv
  try:
    print(compare(_CONFIG.value))
  except ValueError as e:
    raise app.UsageError(str(e)) from None


if __name__ == "__main__":
  app.run(main)
