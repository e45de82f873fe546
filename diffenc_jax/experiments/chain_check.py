r"""Does the E-step's chain follow the decoder's posterior, and what does z buy? One trained run.

    python -m diffenc_jax.experiments.chain_check --workdir runs/mnist_diffdec \
        [--steps=2000,2500,3000] [--draws=64] [--num=500] \
        [--reference_steps=200 --reference_draws=8 --reference_step_size=0.05] \
        [--information --bins=10 --bin_draws=8] [--visits=5,10,20,40] \
        [--langevin=step_size=0.5,log_snr_center=8]

prints one row per checkpoint (`--steps`, default the newest) of `posterior_check.chain_check` on
the first `--num` held-out examples: the decoder's NLL of z⁰ and of the chain's z^K (for a
diffusion decoder an ELBO bound with `--draws` draws the chain did not use), its change, the
share of codes the chain improved, the change of the chain's own energy U, the gap E‖z^K − z⁰‖²,
the posterior score's norm E‖∇U(z⁰)‖ and the chain's step; with --reference_steps, the NLL
reached by long reference chains from z⁰ and from a prior draw, and the share of the way to it
that the E-step's chain covers. With --information (diffusion decoder), a table per log-SNR bin
of `posterior_check.z_information`: the nats per unit λ that z⁰ buys over the code of another
held-out example, and the E-step gradient's signal and one-draw noise there, and the one-draw
second moment of the gradient estimate under the E-step's λ proposal, λ uniform, and the best
proposal piecewise constant on the bins. With --visits, the persistent chains of training run on
the frozen checkpoint (`posterior_check.persistent_visits`) from the held-out z⁰, one row per
number of visits: how far a chain gets in as many visits as training gives it (the reference
chains run once, for the last row; every row's coverage is against it). --langevin replaces
fields of the run's em.langevin (the E-step's sampler) for this check only: another sampler on
the same checkpoint.
"""

from __future__ import annotations

import jax
import numpy as np
from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained run (config.json + checkpoints).")
_STEPS = flags.DEFINE_list("steps", [], "Checkpoints to check (default: the newest).")
_DRAWS = flags.DEFINE_integer("draws", 64, "ELBO draws of a diffusion decoder's NLL.")
_NUM = flags.DEFINE_integer("num", 500, "Held-out examples (the first ones).")
_EMA = flags.DEFINE_bool("use_ema", None, "Check the EMA parameters (default: the run's).")
_REF_STEPS = flags.DEFINE_integer("reference_steps", 0, "Steps of the reference chains (0: none).")
_REF_DRAWS = flags.DEFINE_integer("reference_draws", 8, "Fresh ELBO draws per reference step.")
_REF_STEP = flags.DEFINE_float("reference_step_size", 0.05, "The reference chains' step.")
_INFO = flags.DEFINE_bool("information", False, "Print what z buys per log-SNR bin.")
_PERSISTENT = flags.DEFINE_bool(
    "persistent", False, "Score the run's persistent chains (em.chain_slots) as z^K, on the "
    "first --num training examples whose chain has run (a check of the sampler, not of the "
    "model): each example's unshifted copy.")
_VISITS = flags.DEFINE_list(
    "visits", [], "Score the persistent chains after these numbers of visits on the frozen "
    "checkpoint instead of one E-step from z⁰ (held-out examples).")
_LANGEVIN = flags.DEFINE_list(
    "langevin", [], "field=value pairs replacing the run's em.langevin fields for this check.")
_BINS = flags.DEFINE_integer("bins", 10, "Log-SNR bins of --information.")
_BIN_DRAWS = flags.DEFINE_integer("bin_draws", 8, "Draws per example and bin (--information).")

COLUMNS = ("nll_z0", "nll_zK", "nll_change", "share_better", "energy_change", "gap",
           "score_norm", "step_size")
REFERENCE_COLUMNS = ("nll_ref", "nll_ref_prior", "coverage")


def row(step, figures: dict[str, float], columns) -> str:
  return f"| {step} | " + " | ".join(f"{figures[c]:.4g}" for c in columns) + " |"


def information_table(model, images, key, bins: int, bin_draws: int) -> str:
  """The markdown table of `posterior_check.z_information` on images, z' = the code of the next
  held-out example."""
  from diffenc_jax import evaluate, posterior, posterior_check
  method, params = model.method, model.params
  decoder = method.decoder
  edges = posterior_check.default_edges(decoder.schedule, bins)

  @jax.jit
  def batch(x, k):
    k_lat, k_info = jax.random.split(k)
    z0 = method.latents(params, x, k_lat, 0)["z0"]
    return posterior_check.z_information(decoder, params["decoder"], x, z0,
                                         jax.numpy.roll(z0, 1, axis=0), k_info, edges, bin_draws)

  parts = evaluate.in_batches(batch, images, min(100, len(images)), key)
  f = posterior_check.combine_bins(parts, edges, bin_draws)
  lv = model.config.em.langevin
  mass = np.asarray(posterior.proposal_mass(
      decoder.schedule, edges, lv.proposal, log_snr_center=lv.log_snr_center,
      log_snr_scale=lv.log_snr_scale, num_samples=lv.mc_samples, antithetic=lv.antithetic))
  lines = ["| log-SNR bin | nats/unit λ that z⁰ buys | ± se | nats in bin | gradient signal | "
           "one-draw noise | draws for SNR 1 | E-step's λ mass |", "|---|---|---|---|---|---|---|---|"]
  for i in range(bins):
    lines.append(f"| [{f['lambda_lo'][i]:.1f}, {f['lambda_hi'][i]:.1f}] | "
                 f"{f['gain_per_lambda'][i]:.3g} | {f['gain_se'][i]:.2g} | "
                 f"{f['gain_nats'][i]:.3g} | {f['grad_signal'][i]:.3g} | "
                 f"{f['grad_noise_one_draw'][i]:.3g} | {f['draws_needed'][i]:.3g} | "
                 f"{mass[i]:.3g} |")
  lines.append(f"| total | | | {np.sum(f['gain_nats']):.4g} | | | | |")
  m = posterior_check.proposal_second_moments(f["grad_second_moment"], mass)
  lines.append(f"\none-draw second moment of the E-step's gradient estimate, Σ_b E‖ĝ_b‖²/q_b: "
               f"its proposal ({lv.proposal}, centre {lv.log_snr_center:g}, scale "
               f"{lv.log_snr_scale:g}) {m['proposal']:.4g}; λ uniform {m['uniform']:.4g}; the "
               f"best proposal constant on these bins {m['best']:.4g}")
  return "\n".join(lines)


def set_langevin(config, overrides: dict[str, str]) -> None:
  """Sets config.em.langevin's fields from strings, each parsed as the field's current type (the
  sampler reads them when it is traced, so a loaded method follows them)."""
  lv = config.em.langevin
  for name, text in overrides.items():
    if name not in lv:
      raise ValueError(f"em.langevin has no field {name!r}; it has {', '.join(sorted(lv))}")
    kind = type(lv[name])
    try:
      if kind is bool:
        if text.lower() not in ("true", "false", "1", "0"):
          raise ValueError(text)
        value = text.lower() in ("true", "1")
      else:
        value = kind(text)
    except ValueError:
      raise ValueError(f"em.langevin.{name} must be of type {kind.__name__}, "
                       f"got {text!r}") from None
    lv[name] = value


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # not orbax's every restore step
  from diffenc_jax import api, data, posterior_check, train
  try:
    steps = [int(s) for s in _STEPS.value] or [None]
    visits = sorted({int(v) for v in _VISITS.value})
  except ValueError:
    raise app.UsageError(f"--steps and --visits must be integers, got {_STEPS.value}, "
                         f"{_VISITS.value}") from None
  if visits and (visits[0] < 1 or _PERSISTENT.value):
    raise app.UsageError(f"--visits must be >= 1 and cannot go with --persistent, got {visits}")
  for name, value, low in (("num", _NUM.value, 1), ("reference_steps", _REF_STEPS.value, 0),
                           ("reference_draws", _REF_DRAWS.value, 1), ("bins", _BINS.value, 1),
                           ("bin_draws", _BIN_DRAWS.value, 2)):
    if value < low:
      raise app.UsageError(f"--{name} must be >= {low}, got {value}")
  if _REF_STEP.value <= 0:
    raise app.UsageError(f"--reference_step_size must be > 0, got {_REF_STEP.value}")
  overrides = {}
  for item in _LANGEVIN.value:
    name, sep, value = item.partition("=")
    if not sep or not name:
      raise app.UsageError(f"--langevin takes field=value pairs, got {item!r}")
    overrides[name.strip()] = value.strip()
  columns = COLUMNS + (REFERENCE_COLUMNS if _REF_STEPS.value else ())
  header = True
  for step in steps:
    try:
      model = api.Autoencoder.load(_WORKDIR.value, use_ema=_EMA.value, step=step)
      key = jax.random.key(model.config.seed + 11)
      set_langevin(model.config, overrides)
      z_chain = None
      if _PERSISTENT.value:
        state = train.Trainer(model.config, _WORKDIR.value).restore_or_init(require=True,
                                                                          step=model.step)
        chains = state.opt_state.get("chains")
        if chains is None:
          raise ValueError(f"{_WORKDIR.value} has no persistent chains (em.chain_slots = 0)")
        images, _ = data.load_eval_split(model.config.data, "train")
        s = model.config.data.augment_shift  # the unshifted copy's slot (train.augmented_round)
        slots = np.arange(len(images)) * (2 * s + 1) ** 2 + s * (2 * s + 1) + s
        seen = np.flatnonzero(np.asarray(chains["visits"])[slots] > 0)[:_NUM.value]
        images, z_chain = images[seen], np.asarray(chains["z"])[slots[seen]]
      else:
        images, _ = data.load_eval_split(model.config.data, "test", max_examples=_NUM.value)
      rows = []
      if visits:  # every row scores its states under the same draws, z⁰ and reference
        states = posterior_check.persistent_visits(model.config, model.method, model.params,
                                                   images, jax.random.fold_in(key, 2), visits)
        reference = None  # the reference chains run once, with the last row
        for v in reversed(visits):
          figures = posterior_check.chain_check(
              model.config, model.method, model.params, images, key, _DRAWS.value,
              reference_steps=_REF_STEPS.value if reference is None else 0,
              reference_draws=_REF_DRAWS.value, reference_step_size=_REF_STEP.value,
              z_chain=states[v], reference=reference)
          if _REF_STEPS.value:
            reference = (figures["nll_ref"], figures["nll_ref_prior"])
          rows.insert(0, (f"{model.step} ({v} visits)", figures))
      else:
        rows.append((model.step, posterior_check.chain_check(
            model.config, model.method, model.params, images, key, _DRAWS.value,
            reference_steps=_REF_STEPS.value, reference_draws=_REF_DRAWS.value,
            reference_step_size=_REF_STEP.value, z_chain=z_chain)))
      info = None
      if _INFO.value:
        if model.method.decoder.kind != "diffusion":
          raise ValueError("--information needs a diffusion decoder")
        info = information_table(model, images, jax.random.fold_in(key, 1), _BINS.value,
                                 _BIN_DRAWS.value)
    except (ValueError, train.UsageError) as e:
      raise app.UsageError(str(e)) from None
    if header:
      lv = model.config.em.langevin
      print(f"{_WORKDIR.value}: {model.config.method}, {len(images)} "
            f"{'training' if _PERSISTENT.value else 'held-out'} examples, "
            f"β = {model.config.bottleneck.beta:g}, {lv.num_steps} {lv.step_rule} steps, "
            f"{lv.mc_samples} draws{' (fresh)' if lv.get('fresh_draws', False) else ''}, "
            f"step {lv.step_size:g}, λ {lv.proposal} (centre {lv.log_snr_center:g}, scale "
            f"{lv.log_snr_scale:g}), {_DRAWS.value} ELBO draws")
      print("| round | " + " | ".join(columns) + " |\n|" + "---|" * (len(columns) + 1))
      header = False
    for label, figures in rows:
      print(row(label, figures, columns), flush=True)
    if info:
      print(f"\nround {model.step}: what z⁰ buys over another example's code, per log-SNR bin\n"
            + info + "\n", flush=True)


if __name__ == "__main__":
  flags.mark_flag_as_required("workdir")
  app.run(main)
