"""The training program: `train_and_evaluate(config, workdir)`, data parallel over a mesh.

Modes (config.train.mode):
  train        train from scratch, or resume from the newest checkpoint in workdir;
  eval         held-out metrics of the newest checkpoint (JSON to stdout and workdir);
  reconstruct  PNG of held-out images beside their reconstructions from z⁰ and z^K;
  sample       PNG of samples through the prior z ~ N(0, I);
  encode       latents z⁰ (and z^K) of both splits to workdir/latents.npz.

Parallelism: one `jax.jit` over a 1-D `jax.make_mesh` mesh with axis 'data': the batch is
sharded on 'data', the training state replicated, its buffers donated. Several hosts: run the
same command on every host; `jax.distributed.initialize()` is called when JAX_COORDINATOR_ADDRESS
(or a cluster environment JAX detects, e.g. TPU pods or SLURM) is set, and each process reads
its own slice of every global batch. RNG: the key of round s is fold_in(key(seed), s).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from diffenc_jax import (checkpointing, data, evaluate, methods, path_rate, posterior, runs,
                         samplers, schedules, train_state, visualize)

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
  lv = config.em.langevin
  check(lv.step_rule in samplers.STEP_RULES,
        f"unknown em.langevin.step_rule {lv.step_rule!r}; choose one of {samplers.STEP_RULES}")
  check(lv.proposal in posterior.PROPOSALS,
        f"unknown em.langevin.proposal {lv.proposal!r}; choose one of {posterior.PROPOSALS}")
  check(lv.mc_samples >= 1 and not (lv.antithetic and lv.mc_samples % 2),
        f"em.langevin.mc_samples must be >= 1 (even with antithetic), got {lv.mc_samples}")
  check(lv.log_snr_scale > 0 and lv.gn_levels >= 1 and lv.reference_samples >= 1,
        "em.langevin.log_snr_scale, gn_levels and reference_samples must be > 0")
  check(config.em.beta > 0, f"em.beta must be > 0, got {config.em.beta}")
  check(config.em.beta_schedule in schedules.BETA_SCHEDULES, f"unknown em.beta_schedule "
        f"{config.em.beta_schedule!r}; choose one of {schedules.BETA_SCHEDULES}")
  check(config.em.beta_schedule != "anneal" or (config.em.beta_start > 0 and
                                                config.em.beta_anneal_steps >= 1),
        "em.beta_schedule='anneal' needs em.beta_start > 0 and em.beta_anneal_steps >= 1")
  for name in ("e_updates", "m_updates", "encoder_inner_steps"):
    check(config.em[name] >= 1, f"em.{name} must be >= 1, got {config.em[name]}")
  check(config.data.augment_shift >= 0,
        f"data.augment_shift must be >= 0, got {config.data.augment_shift}")
  check(config.data.augment_shift == 0 or config.data.name != "toy2d",
        "data.augment_shift needs image data")
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
  for name in ("num_steps", "mc_samples"):
    check(lv[name] >= 1, f"em.langevin.{name} must be >= 1, got {lv[name]}")
  for name in ("step_size", "snr"):
    check(lv[name] > 0, f"em.langevin.{name} must be > 0, got {lv[name]}")
  check(lv.max_move >= 0, f"em.langevin.max_move must be >= 0, got {lv.max_move}")
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
  try:  # each piece's checks of its own section (`methods.validate`)
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
  if info.is_image and 2 * shift >= min(info.shape[:2]):
    raise UsageError(f"bad config: data.augment_shift={shift} must be below half the image "
                     f"size {info.shape[0]}x{info.shape[1]}")
  m = config.model
  if m.decoder == "diffusion" and m.denoiser == "dit":
    p = m.dit_patch_size
    if not info.is_image or info.shape[0] % p or info.shape[1] % p:
      raise UsageError(f"bad config: model.denoiser='dit' needs images whose size is a multiple "
                       f"of model.dit_patch_size={p}; {info.name} examples are {info.shape}")


def maybe_initialize_distributed() -> None:
  """Starts multi-process JAX when launched as one of several processes: JAX_COORDINATOR_ADDRESS
  with JAX_NUM_PROCESSES and JAX_PROCESS_ID (which jax does not read itself), or a cluster
  that jax detects (SLURM, TPU pods)."""
  if jax.distributed.is_initialized():
    return
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS") or env.get("SLURM_NTASKS", "1") != "1":
    count, index = env.get("JAX_NUM_PROCESSES"), env.get("JAX_PROCESS_ID")
    jax.distributed.initialize(num_processes=int(count) if count else None,
                               process_id=int(index) if index else None)


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


def _warn(message: str) -> None:
  if jax.process_index() == 0:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def restore_newest(checkpoints: ocp.CheckpointManager, workdir: str, abstract,
                   checksummed_from: int | None, steps: list[int], pass_over=None):
  """The first of `steps` (newest first) whose checkpoint restores against `abstract` (shapes,
  dtypes and tree structure must match exactly: never a silent partial restore) and matches its
  checksum (required from step `checksummed_from` on; None: never). Each newer one that does not
  is handed to pass_over(step, why, restored step) (default: `leave_as_it_is`). UsageError
  (one line) where none restores or the checkpoint is of another model."""
  pass_over = pass_over or (lambda b, why, s: leave_as_it_is(workdir, b, why, s))
  bad = []
  for s in steps:
    try:
      state, verified = checkpointing.restore_checked(
          checkpoints, s, abstract,
          require_digest=checksummed_from is not None and s >= checksummed_from)
    except checkpointing.Unreadable as e:
      runs.DETAILS.warning("checkpoint %s in %s is unreadable", s, workdir, exc_info=True)
      bad.append((s, str(e)))
      continue
    except checkpointing.Mismatch as e:
      raise UsageError(f"cannot restore checkpoint {s} in {workdir}: it does not match "
                       f"the config: {e}") from None
    for b, why in bad:
      pass_over(b, why, s)
    if not verified:
      _warn(f"checkpoint {s} in {workdir}/checkpoints has no checksum (saved by an "
            f"older version of diffenc_jax): restored unverified")
    return state
  (s, why), more = bad[0], len(bad) - 1
  raise UsageError(f"cannot restore checkpoint {s} in {workdir}: {why}"
                   + (f" (nor any of the {more} older ones)" if more else ""))


def leave_as_it_is(workdir: str, step: int, why: str, restored: int) -> None:
  """One warning line: checkpoint `step` is unreadable and stays where it is."""
  _warn(f"checkpoint {step} is unreadable ({why}): {workdir}/checkpoints/{step} left as it is, "
        f"using checkpoint {restored}")


class Trainer:
  """Holds the mesh, the jitted round and evaluation functions, and the checkpoint manager."""

  def __init__(self, config, workdir: str, info: data.DatasetInfo | None = None):
    self.config = config
    self.workdir = os.path.abspath(workdir)
    self.info = info or data.get_info(config.data)
    self.method = methods.get_method(config, self.info.shape)
    # Auto axes: XLA propagates the batch sharding through the step (no sharding-in-types)
    self.mesh = jax.make_mesh((jax.device_count(),), ("data",),
                              axis_types=(jax.sharding.AxisType.Auto,))
    self.replicated = NamedSharding(self.mesh, P())
    # E batches of B examples: (E, B, ...) sharded on B
    self.round_sharding = NamedSharding(self.mesh, P(None, "data"))
    # phase (static, the method's `phase_at(step)`): one program per phase of the method
    self.round = jax.jit(self.augmented_round,
                         in_shardings=(self.replicated, self.round_sharding, self.replicated,
                                       self.round_sharding),
                         out_shardings=(self.replicated, self.replicated), donate_argnums=0,
                         static_argnums=4)
    self.checksummed_from = checksummed_from(self.workdir)
    self.checkpoints = ocp.CheckpointManager(
        os.path.join(self.workdir, "checkpoints"),
        options=ocp.CheckpointManagerOptions(max_to_keep=config.train.keep_checkpoints,
                                             create=True))

  def augmented_round(self, state, xs, key, index, phase=None):
    """The method's training round on xs after `data.random_shift` (when data.augment_shift);
    index (E, B), the examples' train-split indices, reaches methods that keep per-example
    state (`uses_example_index`: persistent E-step chains); phase (`phase_of`), methods with
    warm-up phases."""
    shift = self.config.data.augment_shift
    if shift:
      k_aug, key = jax.random.split(key)
      xs, offset = data.random_shift(k_aug, xs, shift, return_offsets=True)
      # a shifted copy is an example of its own: a shift moves its code by far more than two
      # draws of the encoder differ (docs/method.md §4, persistent chains)
      index = index * (2 * shift + 1) ** 2 + offset
    kwargs = {"phase": phase} if phase is not None else {}
    if getattr(self.method, "uses_example_index", False):
      kwargs["index"] = index
    return self.method.train_round(state, xs, key, **kwargs)

  def phase_of(self, step: int) -> str | None:
    """The method's phase at round `step` (its `phase_at`; None for one-phase methods): the
    round is compiled once per phase, not as one program branching on the step."""
    phase_at = getattr(self.method, "phase_at", None)
    return phase_at(step) if phase_at is not None else None

  # --- state and checkpoints ------------------------------------------------------------
  def fresh_state(self) -> train_state.TrainState:
    init = jax.jit(self.method.init_state, out_shardings=self.replicated)
    return init(jax.random.key(self.config.seed))

  def restore_or_init(self, require: bool = False, step: int | None = None,
                      set_aside: bool = False) -> train_state.TrainState:
    """The newest readable checkpoint (or checkpoint `step`) restored against the abstract state
    (shapes, dtypes and tree structure must match exactly: never a silent partial restore) and
    checked against the digest saved with it, else a fresh state.

    A newer checkpoint that does not restore or fails its digest is passed over with one
    warning line naming it; with set_aside (training) it is moved to workdir/damaged_checkpoints/
    (never deleted) so that training can save that step again."""
    steps = sorted(self.checkpoints.all_steps(), reverse=True)
    if step is not None and step not in steps:
      raise UsageError(f"no checkpoint {step} in {self.workdir}/checkpoints; it holds steps "
                       f"{sorted(steps)}")
    if not steps:
      if require:
        raise UsageError(f"no checkpoint in {self.workdir}/checkpoints to {self.config.train.mode}")
      return self.fresh_state()
    abstract = jax.eval_shape(self.method.init_state, jax.random.key(0))
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self.replicated), abstract)
    return restore_newest(self.checkpoints, self.workdir, abstract, self.checksummed_from,
                          steps=[step] if step is not None else steps,
                          pass_over=lambda b, why, s: self._pass_over(b, why, s, set_aside))

  def _pass_over(self, step: int, why: str, restored: int, set_aside: bool) -> None:
    where = f"{self.workdir}/checkpoints/{step}"
    if not set_aside:
      leave_as_it_is(self.workdir, step, why, restored)
      return
    target = os.path.join(self.workdir, "damaged_checkpoints", str(step))
    suffix = 0
    while os.path.exists(target + (f".{suffix}" if suffix else "")):
      suffix += 1
    target += f".{suffix}" if suffix else ""
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.move(where, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
    self.checkpoints.reload()
    _warn(f"checkpoint {step} is unreadable ({why}): moved {where} to {target}, resuming "
          f"from checkpoint {restored}")

  def save(self, state: train_state.TrainState) -> None:
    checkpointing.save(self.checkpoints, state)

  def wait_for_saves(self) -> tuple[int | None, str]:
    """(the newest checkpoint on disk, '' or why a pending save failed) once every pending
    asynchronous save has finished."""
    failure = ""
    try:
      self.checkpoints.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      failure = f" (a pending save failed: {checkpointing.first_line(e)})"
    self.checkpoints.reload()
    return self.checkpoints.latest_step(), failure

  def for_evaluation(self, state: train_state.TrainState) -> train_state.TrainState:
    """The state to evaluate: with several processes each one's local copy of the replicated
    state, so that evaluation (and process 0's images) runs locally, without collectives."""
    if jax.process_count() == 1:
      return state
    return jax.tree.map(lambda a: a.addressable_data(0), state)

  # --- data -----------------------------------------------------------------------------
  def global_batch(self, batches: data.TrainBatches,
                   round_index: int) -> tuple[jax.Array, jax.Array]:
    """The (E, B, ...) images of one round and their (E, B) train-split indices, as global
    arrays sharded on the batch axis."""
    e = self.config.em.e_updates
    steps = [round_index * e + i for i in range(e)]
    images = np.stack([batches.get(s)["image"] for s in steps])
    index = np.stack([batches.indices(s) for s in steps]).astype(np.int32)
    return (jax.make_array_from_process_local_data(self.round_sharding, images),
            jax.make_array_from_process_local_data(self.round_sharding, index))

  # --- training -------------------------------------------------------------------------
  def train(self, state: train_state.TrainState | None = None,
            stop: runs.StopOnSignal | None = None) -> dict:
    """Trains from `state` (default: `restore_or_init`) to train.num_steps rounds. On any error,
    divergence or KeyboardInterrupt, pending checkpoint saves finish first and the error names
    the newest checkpoint that is on disk. On SIGTERM or SIGINT (`stop`, default: handlers
    installed here) the current round is finished and checkpointed, then runs.Stopped names it."""
    if stop is None:
      with runs.StopOnSignal() as stop:
        return self.train(state, stop)
    from tqdm import tqdm
    from tensorboardX import SummaryWriter

    cfg = self.config
    state = self.restore_or_init(set_aside=True) if state is None else state
    start = int(state.step)
    batches = data.TrainBatches(cfg.data, batch_size=cfg.train.batch_size, seed=cfg.seed,
                                process_index=jax.process_index(),
                                process_count=jax.process_count())
    test = evaluate.HeldOut.load(cfg, self.method)
    base_key = jax.random.key(cfg.seed)
    is_main = jax.process_index() == 0
    writer = SummaryWriter(os.path.join(self.workdir, "tb")) if is_main else None
    metrics_path = os.path.join(self.workdir, "metrics.jsonl")
    bar = tqdm(range(start, cfg.train.num_steps), initial=start, total=cfg.train.num_steps,
               disable=not is_main, dynamic_ncols=True)
    t_last, s_last, eval_metrics, done = time.time(), start, {}, start
    # wall seconds of training so far, over every process that resumed this run
    elapsed = previous_elapsed(metrics_path, start) - t_last
    if is_main:  # rounds after the checkpoint resumed from are logged again below
      runs.trim_metrics(metrics_path, start)
    try:
      for step in bar:
        if stop.requested():  # a signal during the restore or the last round's evaluation
          raise runs.Stopped(stop.signum, "")
        xs, index = self.global_batch(batches, step)
        state, metrics = self.round(state, xs, jax.random.fold_in(base_key, step), index,
                                    self.phase_of(step))
        done = step + 1
        if done % cfg.train.log_every == 0 or done == cfg.train.num_steps:
          metrics = self._finite(metrics, done)
          now = time.time()
          metrics["steps_per_s"] = (done - s_last) / (now - t_last)
          metrics["elapsed_s"] = elapsed + now
          t_last, s_last = now, done
          bar.set_postfix({**{k: f"{metrics[k]:.3g}" for k in self.method.progress_keys},
                           "sps": f"{metrics['steps_per_s']:.2f}"})
          self._log(writer, metrics_path, done, {"train/" + k: v for k, v in metrics.items()})
        if done % cfg.train.eval_every == 0 or done == cfg.train.num_steps:
          local = self.for_evaluation(state)
          eval_metrics = test.evaluate(local)
          self._log(writer, metrics_path, done, {"eval/" + k: v for k, v in eval_metrics.items()})
          bar.write(f"step {done}: " + ", ".join(f"{k} {v:.3f}" for k, v in eval_metrics.items()))
          if is_main:
            visualize.save_reconstructions(test, local, os.path.join(self.workdir,
                                                                     f"recon_{done:06d}.png"))
        if (done % cfg.train.checkpoint_every == 0 or done == cfg.train.num_steps
            or stop.requested()):
          self._finite(metrics, done)
          self.save(state)
      if stop.requested():
        raise runs.Stopped(stop.signum, "")
      self.checkpoints.wait_until_finished()
    except BaseException as e:
      bar.close()
      newest, failure = self.wait_for_saves()
      kept = (f"the newest checkpoint on disk is {newest} ({self.workdir}/checkpoints/{newest})"
              if newest is not None else f"no checkpoint is on disk in {self.workdir}")
      kept += failure
      if isinstance(e, FloatingPointError):
        raise FloatingPointError(f"{e}; {kept}") from None
      if isinstance(e, runs.Stopped):
        raise runs.Stopped(e.signum, f"stopped by {stop.name} after {done} rounds; {kept}"
                           ) from None
      if isinstance(e, KeyboardInterrupt):
        raise KeyboardInterrupt(f"interrupted after {done} rounds; {kept}") from None
      e.add_note(f"diffenc_jax: training stopped after {done} rounds; {kept}")
      raise
    finally:
      if writer:
        writer.close()
    return eval_metrics

  def _finite(self, metrics, done: int) -> dict[str, float]:
    """The metrics as floats; raises before a diverged state can overwrite a checkpoint."""
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    bad = sorted(k for k, v in metrics.items() if not np.isfinite(v))
    if bad:
      raise FloatingPointError(f"training diverged by round {done}: {', '.join(bad)} not finite")
    return metrics

  def _log(self, writer, path, step, metrics):
    if jax.process_index() != 0:
      return
    with open(path, "a") as f:
      f.write(json.dumps({"step": step, **metrics}) + "\n")
    for k, v in metrics.items():
      writer.add_scalar(k, v, step)
    writer.flush()


def previous_elapsed(metrics_path: str, start: int) -> float:
  """`train/elapsed_s` of the last log line at or before round `start` in a run's
  metrics.jsonl (0 for a new run): what a resumed run's clock starts from."""
  elapsed = 0.0
  if start and os.path.exists(metrics_path):
    with open(metrics_path) as f:
      for line in f:
        try:
          record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash
          continue
        if record.get("step", start + 1) <= start and "train/elapsed_s" in record:
          elapsed = record["train/elapsed_s"]
  return elapsed


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


def check_writable(path: str) -> None:
  try:
    runs.check_writable(path)
  except OSError as e:
    raise UsageError(f"cannot write to {path}: {e.strerror or e}") from None


def train_and_evaluate(config, workdir: str) -> dict:
  """Runs config.train.mode in workdir; returns the held-out metrics where the mode has them.

  Everything the config, the data and an existing run in workdir can be checked for is checked
  before anything is written or compiled (UsageError, one line). Training holds workdir's lock
  (one run per workdir) and writes config.json only once the checkpoint to resume from (if any)
  has been restored."""
  maybe_initialize_distributed()
  validate_config(config)
  try:
    info = data.get_info(config.data)
  except ValueError as e:
    raise UsageError(checkpointing.first_line(e)) from None
  validate_data(config, info)
  workdir = os.path.abspath(workdir)
  mode = config.train.mode
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UsageError(f"the workdir {workdir} is a file, not a directory")
  if mode != "train" and not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise UsageError(f"no trained run in {workdir} to {mode}: "
                     + ("no checkpoints/ folder" if os.path.isdir(workdir) else "no such directory"))
  check_resume(config, workdir)
  fingerprint = check_data(config, info, workdir)
  if mode != "train":  # what it writes goes there: fail before anything is computed
    check_writable(workdir)
  if mode == "train":
    with runs.StopOnSignal() as stop:
      return _train(config, workdir, info, fingerprint, stop)
  with runs.log_to_file(workdir):
    return _use(config, workdir, info)


def _train(config, workdir: str, info: data.DatasetInfo, fingerprint: dict,
           stop: runs.StopOnSignal) -> dict:
  """Training mode of `train_and_evaluate`: the workdir's lock held throughout."""
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise UsageError(f"cannot create the workdir {workdir}: {e.strerror or e}") from None
  check_writable(workdir)
  check_writable(os.path.join(workdir, "checkpoints"))
  with runs.log_to_file(workdir):
    return _train_locked(config, workdir, info, fingerprint, stop)


def _train_locked(config, workdir: str, info: data.DatasetInfo, fingerprint: dict,
                  stop: runs.StopOnSignal) -> dict:
  lock = checkpointing.WorkdirLock(workdir)
  error = ""
  if jax.process_index() == 0:
    try:
      lock.acquire()
    except checkpointing.WorkdirInUse as e:
      error = str(e)
  if jax.process_count() > 1 and multihost_utils.broadcast_one_to_all(np.int32(bool(error))):
    error = error or "process 0 could not take the lock of the workdir"
  if error:
    raise UsageError(error)
  try:
    trainer = Trainer(config, workdir, info)
    state = trainer.restore_or_init(set_aside=True)
    if jax.process_index() == 0:  # what `diffenc_jax.api` rebuilds the model from
      first = trainer.checksummed_from
      # a run of an older version: its checkpoints up to the one restored have no checksum
      record = {"checksummed_from": int(state.step) + 1 if first is None else first,
                "data": fingerprint}
      runs.write_config(workdir, config, record)
    return trainer.train(state, stop)
  finally:
    lock.release()


def _use(config, workdir: str, info: data.DatasetInfo) -> dict:
  """The modes of `train_and_evaluate` that use a trained run: eval, reconstruct, sample, encode."""
  mode = config.train.mode
  trainer = Trainer(config, workdir, info)
  state = trainer.for_evaluation(trainer.restore_or_init(require=True))
  test = evaluate.HeldOut.load(config, trainer.method)
  if mode == "eval":
    metrics = test.evaluate(state)
    with open(os.path.join(workdir, "eval.json"), "w") as f:
      json.dump({"step": int(state.step), **metrics}, f, indent=1)
    print(json.dumps(metrics, indent=1))
    return metrics
  if mode == "reconstruct":
    path = os.path.join(workdir, "reconstructions.png")
    visualize.save_reconstructions(test, state, path)
    print(path)
  elif mode == "sample":
    path = os.path.join(workdir, "samples.png")
    visualize.save_samples(trainer.method, state, config, path)
    print(path)
  elif mode == "encode":
    path = os.path.join(workdir, "latents.npz")
    evaluate.encode_splits(config, trainer.method, state, path)
    print(path)
  return {}
