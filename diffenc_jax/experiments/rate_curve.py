r"""The held-out rate of one trained diffusion encoder as a function of its log-SNR floor.

    python -m diffenc_jax.experiments.rate_curve --workdir runs/mnist [--floors=8,6,4,2,0,-2]

prints, for each floor λ_f (≤ the run's latent schedule.logsnr_max), the mean over the
held-out split of the diffusion-KL rate integrated from λ_f (the KL to N(0, I) of the code
blurred at λ_f, α_f z⁰ + σ_f ε; `evaluate.rate_curve`) beside the KL that a deterministic
code at the same z⁰ would have there. The table's `rate_nats` is the row at logsnr_max.
docs/rate.md says how to read it.
"""

from __future__ import annotations

import jax
from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained run (config.json + checkpoints).")
_FLOORS = flags.DEFINE_list("floors", ["8", "6", "4", "2", "0", "-2"],
                            "Log-SNR floors λ_f, each <= the run's schedule.logsnr_max.")
_EMA = flags.DEFINE_bool("use_ema", None, "Evaluate the EMA parameters (default: the run's).")


def table(curve, d: int) -> str:
  lines = ["| floor λ_f | σ_f | rate (nats) | deterministic code (nats) | rate − deterministic |",
           "|---|---|---|---|---|"]
  for f, r, p in zip(curve["floor"], curve["rate_nats"], curve["point_mass_nats"]):
    lines.append(f"| {f:g} | {float(jax.nn.sigmoid(-f)) ** 0.5:.4f} | {r:.1f} | {p:.1f} | "
                 f"{r - p:+.1f} |")
  lines.append(f"\n(d = {d}: a deterministic code gains d/2 = {d / 2:g} nats per unit of λ_f.)")
  return "\n".join(lines)


def main(argv):
  del argv
  from diffenc_jax import api, data, evaluate, train
  try:
    model = api.Autoencoder.load(_WORKDIR.value, use_ema=_EMA.value)
    images, _ = data.load_eval_split(model.config.data, "test")
    curve = evaluate.rate_curve(model.config, model.method, model.params, images,
                                [float(f) for f in _FLOORS.value],
                                jax.random.key(model.config.seed + 7))
  except (ValueError, train.UsageError) as e:
    raise app.UsageError(str(e)) from None
  print(f"{_WORKDIR.value}: {model.config.method}, step {model.step}, "
        f"{len(images)} held-out examples, {model.config.eval.rate_samples} draws each")
  print(table(curve, model.latent_dim))


if __name__ == "__main__":
  flags.mark_flag_as_required("workdir")
  app.run(main)
