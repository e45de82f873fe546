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
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from diffenc_jax import checkpointing, data, evaluate, methods, runs, train_state, visualize
from diffenc_jax.checks import (UsageError, check_data, check_resume, check_writable,
                                checksummed_from, validate_config, validate_data)

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
    return checkpointing.restore_newest(
        self.checkpoints, self.workdir, abstract, self.checksummed_from,
        steps=[step] if step is not None else steps,
        pass_over=lambda b, why, s: self._pass_over(b, why, s, set_aside))

  def _pass_over(self, step: int, why: str, restored: int, set_aside: bool) -> None:
    where = f"{self.workdir}/checkpoints/{step}"
    if not set_aside:
      checkpointing.leave_as_it_is(self.workdir, step, why, restored)
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
    checkpointing.warn(f"checkpoint {step} is unreadable ({why}): moved {where} to {target}, resuming "
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
    e = self.config.train.batches_per_round
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
    elapsed = runs.previous_elapsed(metrics_path, start) - t_last
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
