"""Checkpoints to trust: a checksum saved with every state, restore of the newest readable one,
and one training run per workdir.

  state_digest(state)    sha256 over the state's leaves (key path, dtype, shape, bytes)
  save(manager, state)   an orbax save with that digest in the step's custom metadata
  restore_checked(...)   one checkpoint restored and verified against its digest
  restore_newest(...)    the newest of a run's checkpoints that restores and verifies
  WorkdirLock(workdir)   `workdir/train.lock`, holding the owner's pid and host

The digest is written by orbax with the checkpoint itself (`_CHECKPOINT_METADATA`), so it is
on disk exactly when the checkpoint is. Whether a checkpoint must have one is not read from that
file (a damaged byte there could hide the digest): the caller says so (`require_digest`, from
the run's record in config.json); only checkpoints saved before digests existed restore
unverified.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import uuid

import jax
import numpy as np
import orbax.checkpoint as ocp

from diffenc_jax import runs
from diffenc_jax.checks import UsageError

DIGEST_KEY = "state_sha256"
SHAPES_KEY = "shapes"  # {key path: "dtype shape"} of every leaf
LOCK_NAME = "train.lock"


class Unreadable(Exception):
  """A checkpoint that does not restore, or restores to other bytes than were saved."""


class Mismatch(Exception):
  """A readable checkpoint of another model: its leaves' shapes differ from the config's."""


class WorkdirInUse(Exception):
  """Another live run holds the workdir's lock."""


def first_line(error: BaseException) -> str:
  text = str(error).strip().split(" See full TensorStore details")[0]  # a repr of many lines
  return text.splitlines()[0][:300] if text else type(error).__name__


def _host_array(leaf) -> np.ndarray:
  if isinstance(leaf, jax.Array):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    if not leaf.is_fully_addressable:  # the replicated state of a multi-process run
      leaf = leaf.addressable_data(0)
  return np.ascontiguousarray(jax.device_get(leaf))


def state_digest(state) -> str:
  """sha256 (hex) of a replicated pytree: every leaf's key path, dtype, shape and bytes."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    a = _host_array(leaf)
    h.update(f"{jax.tree_util.keystr(path)} {a.dtype.str} {a.shape}\n".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def shapes(state) -> dict[str, str]:
  """{key path: 'dtype shape'} of every leaf of a pytree of arrays or ShapeDtypeStructs."""
  return {jax.tree_util.keystr(path): f"{np.dtype(leaf.dtype).name} {tuple(leaf.shape)}"
          for path, leaf in jax.tree_util.tree_leaves_with_path(state)
          if not jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)}


def save(manager: ocp.CheckpointManager, state) -> None:
  """Saves state at step int(state.step) (asynchronously), its digest and shapes with it."""
  manager.save(int(state.step), args=ocp.args.StandardSave(state),
               custom_metadata={DIGEST_KEY: state_digest(state), SHAPES_KEY: shapes(state)})


def restore_checked(manager: ocp.CheckpointManager, step: int, abstract,
                    require_digest: bool = True):
  """(state, verified): checkpoint `step` restored against `abstract` and compared with the
  digest saved with it (verified=False when it has none and require_digest is False). Raises
  Unreadable(reason) (also for a missing or unreadable digest where one is required), or
  Mismatch(reason) before reading any array when the saved shapes are not the abstract's."""
  try:
    saved = manager.metadata(step).custom_metadata or {}
  except Exception as e:  # pylint: disable=broad-except
    raise Unreadable(f"metadata: {first_line(e)}") from e
  expected, saved_shapes = saved.get(DIGEST_KEY), saved.get(SHAPES_KEY)
  if expected is None and require_digest:
    raise Unreadable("its checksum is missing or unreadable (damaged _CHECKPOINT_METADATA)")
  if saved_shapes is not None:
    wanted = shapes(abstract)
    for path in sorted(set(wanted) | set(saved_shapes)):
      if wanted.get(path) != saved_shapes.get(path):
        raise Mismatch(f"state{path} is {saved_shapes.get(path) or 'absent'} in the checkpoint, "
                       f"{wanted.get(path) or 'absent'} for this config")
  try:
    state = manager.restore(step, args=ocp.args.StandardRestore(abstract))
  except Exception as e:  # orbax and tensorstore raise many types
    raise Unreadable(first_line(e)) from e
  if expected is None:
    return state, False
  if state_digest(state) != expected:
    raise Unreadable("its data does not match the checksum saved with it")
  return state, True


# --- one run per workdir ---------------------------------------------------------------------


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's process
    return True
  return True


class WorkdirLock:
  """`workdir/train.lock` = {"pid", "host"} of the run that owns the workdir.

  `acquire` creates it atomically (written in full, then hard-linked into place), or raises
  WorkdirInUse naming the owner. A lock whose pid is dead on this host is stale (a killed run)
  and is taken over; a lock from another host cannot be checked and is never taken over."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_NAME)
    self.owner = {"pid": os.getpid(), "host": socket.gethostname()}
    self.held = False

  def _read(self) -> dict | None:
    try:
      with open(self.path) as f:
        return json.load(f)
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {}

  def acquire(self) -> None:
    tmp = f"{self.path}.{uuid.uuid4().hex}"
    with open(tmp, "w") as f:
      json.dump(self.owner, f)
    try:
      for _ in range(3):
        try:
          os.link(tmp, self.path)
          self.held = True
          return
        except FileExistsError:
          pass
        owner = self._read()
        if owner is None:  # released meanwhile
          continue
        pid, host = owner.get("pid"), owner.get("host")
        if host == self.owner["host"] and isinstance(pid, int) and not _alive(pid):
          try:  # only one of several racing runs renames the stale lock away
            stale = f"{self.path}.stale.{uuid.uuid4().hex}"
            os.rename(self.path, stale)
            os.remove(stale)
          except FileNotFoundError:
            pass
          continue
        raise WorkdirInUse(
            f"{os.path.dirname(self.path)} is in use by process {pid} on host {host} (lock file "
            f"{self.path}); one run per workdir: wait for it, or delete the lock file if that "
            f"run is gone")
      raise WorkdirInUse(f"cannot take the lock {self.path}: it keeps changing")
    finally:
      os.remove(tmp)

  def release(self) -> None:
    if self.held and self._read() == self.owner:
      os.remove(self.path)
    self.held = False

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()


def warn(message: str) -> None:
  """One warning line on stderr, from process 0."""
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
      state, verified = restore_checked(
          checkpoints, s, abstract,
          require_digest=checksummed_from is not None and s >= checksummed_from)
    except Unreadable as e:
      runs.DETAILS.warning("checkpoint %s in %s is unreadable", s, workdir, exc_info=True)
      bad.append((s, str(e)))
      continue
    except Mismatch as e:
      raise UsageError(f"cannot restore checkpoint {s} in {workdir}: it does not match "
                       f"the config: {e}") from None
    for b, why in bad:
      pass_over(b, why, s)
    if not verified:
      warn(f"checkpoint {s} in {workdir}/checkpoints has no checksum (saved by an "
            f"older version of diffenc_jax): restored unverified")
    return state
  (s, why), more = bad[0], len(bad) - 1
  raise UsageError(f"cannot restore checkpoint {s} in {workdir}: {why}"
                   + (f" (nor any of the {more} older ones)" if more else ""))


def leave_as_it_is(workdir: str, step: int, why: str, restored: int) -> None:
  """One warning line: checkpoint `step` is unreadable and stays where it is."""
  warn(f"checkpoint {step} is unreadable ({why}): {workdir}/checkpoints/{step} left as it is, "
        f"using checkpoint {restored}")
