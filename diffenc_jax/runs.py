"""What a training run does when it is told to stop, and what it records beside its config.

  StopOnSignal()      SIGTERM / SIGINT set a flag that the training loop reads between rounds
  Stopped             raised by the loop once the current round is checkpointed
  read_config(workdir), write_config(workdir, config, record)
                      workdir/config.json: the run's config and, under RECORD_KEY, its record:
                      `checksummed_from` (the first step whose checkpoint was saved with a
                      checksum: from there on a checkpoint without a readable one is damaged)
                      and `data` (`data_fingerprint`: what it was trained on); fields that
                      moved since the run was written are read at their new place (MOVED_FIELDS)
  check_writable(path), trim_metrics(path, start), previous_elapsed(path, start)
                      a workdir that takes files; metrics.jsonl cut back to a resumed round,
                      and the training clock it had reached there
  log_to_file(workdir)
                      Python logging (orbax's warnings, tracebacks) to workdir/LOG_NAME

A run whose config.json has no record was written by an older version: its checkpoints may
lack checksums, and its data was not fingerprinted.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import signal
import sys
import threading
import uuid

import jax
import numpy as np
from jax.experimental import multihost_utils

from diffenc_jax import data

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(Exception):
  """Training stopped on a signal after checkpointing its current round; `signum` is the signal."""

  def __init__(self, signum: int, message: str):
    super().__init__(message)
    self.signum = signum


class StopOnSignal:
  """Within `with StopOnSignal() as stop:`, SIGTERM and SIGINT (Ctrl-C) only record the signal:
  `stop.requested()` turns true and training stops once its current round is checkpointed. A
  second signal raises KeyboardInterrupt at once (pending saves are still awaited). Handlers are
  installed only in the main thread (Python's rule) and restored on exit."""

  def __init__(self):
    self.signum: int | None = None
    self._previous = {}

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    if self.signum is not None:
      raise KeyboardInterrupt(f"{signal.Signals(signum).name} received twice")
    self.signum = signum

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for s in STOP_SIGNALS:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}

  def requested(self) -> bool:
    """Whether any process got a stop signal (all processes agree, so that all of them save)."""
    if jax.process_count() == 1:
      return self.signum is not None
    got = multihost_utils.process_allgather(np.int32(self.signum or 0))
    if self.signum is None and np.any(got):
      self.signum = int(np.max(got))
    return bool(np.any(got))

  @property
  def name(self) -> str:
    return signal.Signals(self.signum).name if self.signum else "a signal"


# --- workdir/config.json ------------------------------------------------------------------------

CONFIG_NAME = "config.json"
RECORD_KEY = "run_record"
# (where a config.json written before the move has a field, where it is now, moved or copied):
# the run was trained with that value, so it is read at the new place. Copied: the old field
# stays where it was (it still does something there) and sets the new one's value.
MOVED_FIELDS = (
    ("em.beta", "bottleneck.beta", "moved"),
    ("em.beta_schedule", "bottleneck.beta_schedule", "moved"),
    ("em.beta_start", "bottleneck.beta_start", "moved"),
    ("em.beta_anneal_steps", "bottleneck.beta_anneal_steps", "moved"),
    ("em.e_updates", "train.batches_per_round", "moved"),
    ("em.langevin.mc_samples", "model.dec_nll_samples", "copied"),
    ("em.encoder_noise_draws", "model.enc_noise_draws", "moved"),
) + tuple((f"diffae.prior_{name}", f"latent_prior.{name}", "moved")
          for name in ("hidden", "blocks", "lr", "normalize", "steps", "eta", "clip"))


def upgrade_fields(fields: dict) -> dict:
  """config.json's fields (nested dicts) with each field of MOVED_FIELDS that the run has at its
  old place and not at its new one put at the new place: a run written before a move reads as
  one written after it. Fields already in their new place are left as they are."""
  fields = json.loads(json.dumps(fields))

  def find(path):
    node = fields
    for key in path[:-1]:
      node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, dict) and path[-1] in node else None

  for old, new, how in MOVED_FIELDS:
    old_path, new_path = old.split("."), new.split(".")
    source = find(old_path)
    if source is None or find(new_path) is not None:
      continue
    node = fields
    for key in new_path[:-1]:
      node = node.setdefault(key, {})
    node[new_path[-1]] = (source.pop if how == "moved" else source.get)(old_path[-1])
  return fields


def read_config(workdir: str) -> tuple[dict, dict | None] | None:
  """(the config's fields, the run's record or None for an older run) of workdir/config.json,
  None where there is no such file; fields read at their current place (`upgrade_fields`).
  Raises ValueError (one line) where it is unreadable or not a JSON object."""
  path = os.path.join(workdir, CONFIG_NAME)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"unreadable {path}: {' '.join(str(e).split())}") from None
  if not isinstance(saved, dict) or not isinstance(saved.get(RECORD_KEY, {}), dict):
    raise ValueError(f"unreadable {path}: not a config (a JSON object of config fields), "
                     f"but {type(saved).__name__} {json.dumps(saved)[:60]}")
  record = saved.pop(RECORD_KEY, None)
  return upgrade_fields(saved), record


def write_config(workdir: str, config, record: dict) -> None:
  """Writes config (a ConfigDict) and the run's record to workdir/config.json atomically."""
  path = os.path.join(workdir, CONFIG_NAME)
  fields = json.loads(config.to_json())
  with open(path + ".tmp", "w") as f:
    json.dump({**fields, RECORD_KEY: record}, f, indent=1)
  os.replace(path + ".tmp", path)


def data_fingerprint(config, info) -> dict:
  """What a run records of its training data: the dataset's name, example shape, number of
  training examples and classes, and the sha256 of its first training batch (images and labels,
  with the run's seed and batch size)."""
  batch = data.TrainBatches(config.data, batch_size=config.train.batch_size, seed=config.seed).get(0)
  digest = hashlib.sha256()
  for key in ("image", "label"):
    digest.update(np.ascontiguousarray(batch[key]).tobytes())
  return {"name": info.name, "shape": [int(n) for n in info.shape],
          "num_train": int(info.num_train), "num_classes": int(info.num_classes),
          "is_image": bool(info.is_image), "first_batch_sha256": digest.hexdigest()}


# --- the workdir --------------------------------------------------------------------------------


def check_writable(path: str) -> None:
  """Raises OSError where the existing directory `path` does not take a new file (read-only,
  immutable, full); a missing `path` passes."""
  if not os.path.isdir(path):
    return
  probe = os.path.join(path, f".write_test.{uuid.uuid4().hex}")
  with open(probe, "w") as f:
    f.write("diffenc_jax")
  os.remove(probe)


def trim_metrics(metrics_path: str, start: int) -> None:
  """Drops the records of rounds after `start` (and lines cut short by a crash) from a run's
  metrics.jsonl, so that a run resumed from round `start` logs each round once."""
  if not os.path.exists(metrics_path):
    return
  with open(metrics_path) as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(record, dict) and record.get("step", start + 1) <= start:
      kept.append(line if line.endswith("\n") else line + "\n")
  if kept != lines:
    with open(metrics_path + ".tmp", "w") as f:
      f.writelines(kept)
    os.replace(metrics_path + ".tmp", metrics_path)


# --- the workdir's log file ---------------------------------------------------------------------

LOG_NAME = "diffenc_jax.log"
# records of what went wrong in full (tracebacks): written to the log file only
DETAILS = logging.getLogger("diffenc_jax.details")
DETAILS.propagate = False
DETAILS.addHandler(logging.NullHandler())


@contextlib.contextmanager
def log_to_file(workdir: str):
  """Within the block, Python logging (absl, orbax, asyncio, and DETAILS) goes to
  workdir/LOG_NAME instead of the terminal: a damaged checkpoint costs one warning line there,
  with its tracebacks in the file. Process 0 writes it; other processes' records are dropped."""
  root = logging.getLogger()
  handler = (logging.FileHandler(os.path.join(workdir, LOG_NAME), delay=True)
             if jax.process_index() == 0 else logging.NullHandler())
  handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
  previous = root.handlers[:]
  for h in previous:
    root.removeHandler(h)
  root.addHandler(handler)
  DETAILS.addHandler(handler)
  DETAILS.setLevel(logging.INFO)
  previous_hook = sys.unraisablehook
  # orbax's failed reads leave coroutines whose errors Python reports as 'Exception ignored'
  sys.unraisablehook = lambda u: DETAILS.warning(
      "%s: %s", u.err_msg or "Exception ignored in", u.object,
      exc_info=(u.exc_type, u.exc_value, u.exc_traceback))
  try:
    yield
  finally:
    gc.collect()  # reports those coroutines now, into the file
    sys.unraisablehook = previous_hook
    DETAILS.removeHandler(handler)
    root.removeHandler(handler)
    for h in previous:
      root.addHandler(h)
    handler.close()


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
