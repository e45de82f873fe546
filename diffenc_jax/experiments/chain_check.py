r"""Does the E-step's chain improve the encoder's codes under the decoder? One trained run.

    python -m diffenc_jax.experiments.chain_check --workdir runs/mnist_diffdec \
        [--steps=2000,2500,3000] [--draws=64] [--num=500]

prints one row per checkpoint (`--steps`, default the newest) of `evaluate.chain_check` on the
first `--num` held-out examples: the decoder's NLL of z⁰ and of the chain's z^K (for a
diffusion decoder an ELBO bound with `--draws` draws the chain did not use), its change, the
share of codes the chain improved, the change of the chain's own energy U, the gap E‖z^K − z⁰‖²,
the posterior score's norm E‖∇U(z⁰)‖ and the chain's step. docs/recipes.md reads it for
configs/mnist_diffdec.py.
"""

from __future__ import annotations

import jax
from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained run (config.json + checkpoints).")
_STEPS = flags.DEFINE_list("steps", [], "Checkpoints to check (default: the newest).")
_DRAWS = flags.DEFINE_integer("draws", 64, "ELBO draws of a diffusion decoder's NLL.")
_NUM = flags.DEFINE_integer("num", 500, "Held-out examples (the first ones).")
_EMA = flags.DEFINE_bool("use_ema", None, "Check the EMA parameters (default: the run's).")

COLUMNS = ("nll_z0", "nll_zK", "nll_change", "share_better", "energy_change", "gap",
           "score_norm", "step_size")


def row(step: int, figures: dict[str, float]) -> str:
  return f"| {step} | " + " | ".join(f"{figures[c]:.4g}" for c in COLUMNS) + " |"


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # not orbax's every restore step
  from diffenc_jax import api, data, evaluate, train
  try:
    steps = [int(s) for s in _STEPS.value] or [None]
  except ValueError:
    raise app.UsageError(f"--steps must be integers, got {_STEPS.value}") from None
  if _NUM.value < 1:
    raise app.UsageError(f"--num must be >= 1, got {_NUM.value}")
  header = True
  for step in steps:
    try:
      model = api.Autoencoder.load(_WORKDIR.value, use_ema=_EMA.value, step=step)
      images, _ = data.load_eval_split(model.config.data, "test", max_examples=_NUM.value)
      figures = evaluate.chain_check(model.config, model.method, model.params, images,
                                     jax.random.key(model.config.seed + 11), _DRAWS.value)
    except (ValueError, train.UsageError) as e:
      raise app.UsageError(str(e)) from None
    if header:
      print(f"{_WORKDIR.value}: {model.config.method}, {len(images)} held-out examples, "
            f"β = {model.config.em.beta:g}, {model.config.em.langevin.num_steps} "
            f"{model.config.em.langevin.step_rule} steps, {_DRAWS.value} ELBO draws")
      print("| round | " + " | ".join(COLUMNS) + " |\n|" + "---|" * (len(COLUMNS) + 1))
      header = False
    print(row(model.step, figures), flush=True)


if __name__ == "__main__":
  flags.mark_flag_as_required("workdir")
  app.run(main)
