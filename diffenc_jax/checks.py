"""What the training program checks before anything is loaded, compiled or written: a bad
config, data that does not fit it, a workdir whose run it would silently change. Each failure
is one line (UsageError), which main.py prints.

  validate_config(config)         the program's sections, then each piece's (`methods.validate`)
  validate_data(config, info)     the config against the dataset it names
  check_resume(config, workdir)   a resumed run may change only RESUMABLE_FIELDS
  check_data(config, info, workdir)  the data the run in workdir was trained on
  check_writable(path), checksummed_from(workdir)
"""

from __future__ import annotations

import json

import jax

from diffenc_jax import chain, data, methods, path_rate, runs, schedules

MODES = ("train", "eval", "reconstruct", "sample", "encode")
LR_SCHEDULES = ("constant", "cosine")
# the config fields that may differ from a workdir's config.json when its run is resumed or
# evaluated: how long to train (not with a cosine schedule, which is a function of it), how
# often to log / evaluate / checkpoint, and evaluation only. Any other difference would
# silently change the run (or not restore): refused, naming the field.
RESUMABLE_FIELDS = ("train.mode", "train.num_steps", "train.log_every", "train.eval_every",
                    "train.checkpoint_every", "train.keep_checkpoints", "em.eval_refine_steps",
                    "data.num_test", "eval.*")


class UsageError(ValueError):
  """A bad config, missing data or an unusable checkpoint: reported as one line by main.py."""


def validate_config(config, num_devices: int | None = None) -> None:
  """Raises UsageError with one line on a bad config, before anything is loaded or compiled:
  the program's own sections (method, data, train, eval, the shared em fields), then each of
  the method's pieces on its own section (`methods.validate`)."""
  num_devices = num_devices or jax.device_count()

  def check(ok, message):
    if not ok:
      raise UsageError(f"bad config: {message}")

  check(config.method in methods.METHODS,
        f"unknown method {config.method!r}; choose one of {methods.METHODS}")
  check(config.train.mode in MODES, f"unknown mode {config.train.mode!r}; choose one of {MODES}")
  try:
    data.validate_data_config(config.data)
  except ValueError as e:
    raise UsageError(str(e)) from None
  m = config.model
  check(m.latent_dim > 0, f"model.latent_dim must be > 0, got {m.latent_dim}")
  for name in ("schedule", "image_schedule"):
    check(config[name].name in schedules.SCHEDULES,
          f"unknown {name}.name {config[name].name!r}; choose one of {sorted(schedules.SCHEDULES)}")
  try:
    schedules.validate_beta(config.bottleneck)
  except ValueError as e:
    raise UsageError(f"bad config: {e}") from None
  check(config.train.batches_per_round >= 1,
        f"train.batches_per_round must be >= 1, got {config.train.batches_per_round}")
  for name in ("m_updates", "encoder_inner_steps"):
    check(config.em[name] >= 1, f"em.{name} must be >= 1, got {config.em[name]}")
  check(config.data.augment_shift >= 0,
        f"data.augment_shift must be >= 0, got {config.data.augment_shift}")
  check(config.data.augment_shift == 0 or config.data.name != "toy2d",
        "data.augment_shift needs image data")
  for name, what in (("encoder_shift", "the E-step's encoder update"),
                     ("em_shift", "the EM rounds' shifts")):
    shift = config.em.get(name, 0)
    check(shift >= 0, f"em.{name} must be >= 0, got {shift}")
    check(shift == 0 or config.data.name != "toy2d", f"em.{name} needs image data")
    check(shift == 0 or config.method == "diffenc", f"em.{name} ({what}) needs method='diffenc'")
  fraction = config.em.get("em_shift_fraction", 1.0)
  check(0 < fraction <= 1, f"em.em_shift_fraction must be in (0, 1], got {fraction}")
  check(config.train.lr_schedule in LR_SCHEDULES,
        f"unknown train.lr_schedule {config.train.lr_schedule!r}; choose one of {LR_SCHEDULES}")
  check(0 <= config.train.final_lr <= 1,
        f"train.final_lr must be in [0, 1], got {config.train.final_lr}")
  check(config.train.weight_decay >= 0,
        f"train.weight_decay must be >= 0, got {config.train.weight_decay}")
  b = config.train.batch_size
  check(b > 0 and b % num_devices == 0,
        f"train.batch_size={b} is not divisible by the {num_devices} devices")
  check(config.eval.batch_size > 0 and config.eval.batch_size % num_devices == 0,
        f"eval.batch_size={config.eval.batch_size} is not divisible by the {num_devices} devices")
  check(isinstance(config.seed, int) and config.seed >= 0,
        f"seed must be an int >= 0, got {config.seed!r}")
  t = config.train
  for name in ("num_steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
    check(t[name] >= 1, f"train.{name} must be >= 1, got {t[name]}")
  for name in sorted(k for k in t.keys() if k.endswith("_lr") and k != "final_lr"):
    check(t[name] > 0, f"train.{name} must be > 0, got {t[name]}")
  check(t.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
  check(t.grad_clip > 0, f"train.grad_clip must be > 0, got {t.grad_clip}")
  check(0 <= t.ema_decay <= 1, f"train.ema_decay must be in [0, 1], got {t.ema_decay}")
  check(config.em.chain_slots >= 0, f"em.chain_slots must be >= 0, got {config.em.chain_slots}")
  check(not config.em.chain_slots or config.method == "diffenc",
        "em.chain_slots (persistent E-step chains) needs method='diffenc'")
  check(config.em.eval_refine_steps >= 0,
        f"em.eval_refine_steps must be >= 0, got {config.em.eval_refine_steps}")
  for name in ("align_weight", "prox_weight"):
    check(config.em[name] >= 0, f"em.{name} must be >= 0, got {config.em[name]}")
  for name in ("gaussian_warmup_rounds", "joint_warmup_rounds"):  # EM's own: em.DiffusionEncoder
    check(not config.em[name] or config.method == "diffenc",
          f"em.{name} (a warm-up phase of EM) needs method='diffenc'")
  check(path_rate.estimator(config) in path_rate.ESTIMATORS,
        f"unknown eval.rate_estimator {path_rate.estimator(config)!r}; choose one of "
        f"{path_rate.ESTIMATORS}")
  spacing = config.eval.get("rate_spacing", "logsnr")
  check(spacing in path_rate.SPACINGS,
        f"unknown eval.rate_spacing {spacing!r}; choose one of {path_rate.SPACINGS}")
  for name in ("rate_samples", "num_images", "decoder_steps"):
    check(config.eval[name] >= 1, f"eval.{name} must be >= 1, got {config.eval[name]}")
  check(config.eval.get("rate_steps", 1) >= 1,
        f"eval.rate_steps must be >= 1, got {config.eval.get('rate_steps')}")
  try:  # each piece's checks of its own section: the E-step's chain (every method refines
    # its code by it), then the method's pieces (`methods.validate`)
    chain.validate(config.em.langevin)
    methods.validate(config)
  except ValueError as e:
    raise UsageError(f"bad config: {e}") from None


def validate_data(config, info: data.DatasetInfo) -> None:
  """Raises UsageError with one line where the config does not fit the dataset it names."""
  n, b = info.num_train, config.train.batch_size
  if b > n:
    raise UsageError(f"bad config: train.batch_size={b} exceeds the {n} training examples of "
                     f"{info.name}")
  shift = config.data.augment_shift
  slots, copies = config.em.chain_slots, (2 * shift + 1) ** 2
  if slots and slots < n * copies:
    raise UsageError(f"bad config: em.chain_slots={slots} must be at least the {n} training "
                     f"examples of {info.name} × their {copies} shifted copies "
                     f"(data.augment_shift={shift}): one persistent chain each")
  for name in ("data.augment_shift", "em.encoder_shift", "em.warm_shift", "em.em_shift"):
    section, field = name.split(".")
    s = config[section].get(field, 0)
    if info.is_image and 2 * s >= min(info.shape[:2]):
      raise UsageError(f"bad config: {name}={s} must be below half the image "
                       f"size {info.shape[0]}x{info.shape[1]}")
  m = config.model
  if m.decoder == "diffusion" and m.denoiser == "dit":
    p = m.dit_patch_size
    if not info.is_image or info.shape[0] % p or info.shape[1] % p:
      raise UsageError(f"bad config: model.denoiser='dit' needs images whose size is a multiple "
                       f"of model.dit_patch_size={p}; {info.name} examples are {info.shape}")


def _flat(tree: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def _may_change(field: str) -> bool:
  return any(field == f or (f.endswith(".*") and field.startswith(f[:-1]))
             for f in RESUMABLE_FIELDS)


def check_resume(config, workdir: str) -> None:
  """Where workdir already holds a run (its config.json), raises UsageError naming the first
  field that differs from config and is not in RESUMABLE_FIELDS. Fields new in config (added by
  a later version of this code) are accepted."""
  try:
    saved = runs.read_config(workdir)
  except ValueError as e:
    raise UsageError(str(e)) from None
  if saved is None:
    return
  old = _flat(saved[0])
  new = _flat(json.loads(config.to_json()))
  for field in sorted(old):
    if field not in new:
      raise UsageError(f"the run in {workdir} has config field {field}, which this config "
                       f"lacks (written by another version of diffenc_jax?)")
    if old[field] != new[field] and not _may_change(field):
      raise UsageError(f"the run in {workdir} was trained with {field}={old[field]!r}, not "
                       f"{new[field]!r}; a resumed or evaluated run may change only "
                       f"{', '.join(RESUMABLE_FIELDS)} (or use another workdir)")
  rounds = old.get("train.num_steps")
  if (config.train.mode == "train" and old.get("train.lr_schedule") == "cosine"
      and rounds != config.train.num_steps):
    raise UsageError(f"the run in {workdir} follows a cosine learning-rate schedule over "
                     f"train.num_steps={rounds} rounds: resumed with {config.train.num_steps} it "
                     f"would recompute the learning rate of every later round (past its end, "
                     f"raise it again); train for longer in another workdir")


def check_data(config, info: data.DatasetInfo, workdir: str) -> dict:
  """The fingerprint of the configured data (`runs.data_fingerprint`); raises UsageError (one
  line) where the run in workdir recorded another one (its files replaced by other data). A run
  of an older version recorded none: nothing to compare."""
  fingerprint = runs.data_fingerprint(config, info)
  try:
    saved = runs.read_config(workdir)
  except ValueError as e:
    raise UsageError(str(e)) from None
  recorded = (saved[1] or {}).get("data") if saved else None
  differ = [k for k in sorted(recorded or {}) if recorded[k] != fingerprint.get(k)]
  if differ:
    show = lambda v: f"{v[:12]}…" if isinstance(v, str) and len(v) > 16 else repr(v)
    raise UsageError(
        f"the data is not what the run in {workdir} was trained on: "
        + "; ".join(f"{k} {show(recorded[k])} then, {show(fingerprint.get(k))} now"
                    for k in differ)
        + " (were its files replaced? train on other data in another workdir)")
  return fingerprint


def check_writable(path: str) -> None:
  try:
    runs.check_writable(path)
  except OSError as e:
    raise UsageError(f"cannot write to {path}: {e.strerror or e}") from None


def checksummed_from(workdir: str) -> int | None:
  """The first step from which workdir's checkpoints must carry a checksum (its config.json's
  record; 0 for a new run), or None for a run of an older version, none of whose checkpoints
  need one."""
  try:
    saved = runs.read_config(workdir)
  except ValueError as e:
    raise UsageError(str(e)) from None
  if saved is None:
    return 0
  return None if saved[1] is None else int(saved[1].get("checksummed_from", 0))
