"""Checkpoints of a continual-learning run (orbax), for exact resume.

A checkpoint holds two items:

* ``state`` (orbax ``StandardSave``): the trainable parameters (model, head, LoRA), the optimizer state
  and the run's PRNG key; typed PRNG keys (e.g. the random mask's) are stored as their key data.
* ``meta`` (JSON): the data position (``task``, ``step`` within the task), the finished evaluations (the
  initial accuracies and the accuracy-matrix rows so far), accumulated wall times, and a fingerprint of
  the settings that must not change across a resume.

Saves are synchronous and finalized atomically by orbax (written to a temporary folder, renamed when
complete; ``commit_success.txt``), so a run killed during a save restarts from the last complete
checkpoint, never from a partial one.

A complete checkpoint may still be damaged later (a full disk, a half-finished copy). :meth:`RunCheckpoints.restore`
walks back from the newest checkpoint to the newest one that reads completely, moves the damaged ones aside
(to ``damaged_checkpoints/`` next to the checkpoints folder) and says so. A checkpoint whose tree differs from
the run's (other settings) is :class:`CheckpointMismatch`, not damage. A save that fails raises
:class:`CheckpointSaveError`; the previous checkpoint stays as it was.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from migu_jax.cl import storage
from migu_jax.cl.faults import FaultWarning


class CheckpointMismatch(ValueError):
  """A checkpoint was written by a run with other settings (model, method, optimizer): its tree differs."""


class CheckpointDamaged(ValueError):
  """No checkpoint of a folder reads completely (each one is damaged)."""


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written (disk full, permissions); the previous one is intact."""


def _is_key(x) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_storable(tree):
  """The tree with PRNG keys replaced by their key data (orbax stores plain arrays)."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def from_storable(stored, like):
  """Restored arrays put back in the shape of ``like`` (PRNG keys re-wrapped, arrays on device)."""

  def restore(s, ref):
    if _is_key(ref):
      return jax.random.wrap_key_data(np.asarray(s), impl=jax.random.key_impl(ref))
    return jax.numpy.asarray(s, dtype=ref.dtype)

  return jax.tree.map(restore, stored, like)


def position(meta: dict) -> str:
  """Where a checkpoint's ``meta`` stands in the task sequence, for messages (tasks counted from 1)."""
  return f"task {meta['task'] + 1}, step {meta['step']}"


def _tree_differences(stored, target) -> list[str]:
  """Paths whose presence, shape or dtype differ between stored metadata and the target tree."""
  stored, target = ocp.tree.to_flat_dict(stored), ocp.tree.to_flat_dict(target)
  out = []
  for path in sorted(set(stored) | set(target)):
    name = ".".join(path)
    if path not in stored or path not in target:
      out.append(f"{name}: {'only in this run' if path not in stored else 'only in the checkpoint'}")
      continue
    s, t = stored[path], target[path]
    if tuple(s.shape) != tuple(t.shape) or np.dtype(s.dtype) != np.dtype(t.dtype):
      out.append(f"{name}: stored {np.dtype(s.dtype).name}{list(s.shape)}, this run "
                 f"{np.dtype(t.dtype).name}{list(t.shape)}")
  return out


class _Damaged(Exception):
  """One checkpoint failed to read (internal: restore walks back past it)."""


def _remove_settled(folder, patience: float = 10.0) -> None:
  """Removes ``folder`` once its contents stop changing (at most ``patience`` seconds).

  When one item of a save fails, the other items' writes (tensorstore threads) can go on for a moment and
  recreate folders under a temporary checkpoint folder; removing it while they do fails (ENOTEMPTY). A
  remote folder (``gs://``) is removed at once.
  """
  name = os.fspath(folder) if not isinstance(folder, str) else folder
  if "://" in name:
    with contextlib.suppress(Exception):  # noqa: BLE001 (best effort: the next save writes a new folder)
      folder.rmtree(missing_ok=True)
    return
  seen, deadline = None, time.monotonic() + patience
  while time.monotonic() < deadline:
    try:
      now = sorted((os.path.join(root, f), os.path.getsize(os.path.join(root, f)))
                   for root, _, files in os.walk(name) for f in files)
    except OSError:  # changed while listed
      now = None
    if now is not None and now == seen:
      break
    seen = now
    time.sleep(0.3)
  for _ in range(3):
    shutil.rmtree(name, ignore_errors=True)
    if not os.path.exists(name):
      return
    time.sleep(0.3)


class RunCheckpoints:
  """The checkpoints of one run (one method and seed) under ``folder``; a context manager (closes orbax).

  Args:
    folder: where the numbered checkpoints go.
    keep: how many complete checkpoints to keep (the newest). Keep 2 or more: restore falls back to an
      older one when the newest is damaged.
  """

  def __init__(self, folder: str | os.PathLike, keep: int = 2):
    self.folder = storage.output_path(folder)
    # Unfinished saves' temporary folders (a killed or failed save) are removed here, not by orbax's
    # background cleanup: that thread races a save started right after it, or a failed save's late writes.
    for stale in sorted(self.folder.glob("*.orbax-checkpoint-tmp*")) if jax.process_index() == 0 else ():
      _remove_settled(stale)
    options = ocp.CheckpointManagerOptions(max_to_keep=max(1, keep), enable_async_checkpointing=False,
                                           create=True, cleanup_tmp_directories=False)
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    self.manager = ocp.CheckpointManager(self.folder, options=options, item_handlers=handlers)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def latest(self) -> int | None:
    """Number of the newest complete checkpoint, or None."""
    return self.manager.latest_step()

  def save(self, state: Any, meta: dict) -> int:
    """Saves ``state`` (a pytree of arrays) and ``meta`` (JSON) as the next checkpoint; returns its number.

    Raises:
      CheckpointSaveError: the write failed (disk full, permissions); the message names the folder. The
        previous checkpoint is untouched (orbax writes to a temporary folder and renames it when complete).
    """
    latest = self.latest()
    number = 0 if latest is None else latest + 1
    host = jax.tree.map(np.asarray, to_storable(state))
    self._remove_unfinished(number)
    try:
      for attempt in range(3):
        try:
          self._write(number, host, meta)
          break
        except OSError as e:  # an earlier failed save's late writes into its temporary folder: once more
          if e.errno != errno.ENOTEMPTY or jax.process_count() > 1 or attempt == 2:
            raise
          self._remove_unfinished(number)
    except (OSError, ValueError, RuntimeError) as e:
      kept = ("no earlier checkpoint exists" if latest is None else
              f"checkpoint {latest}, the newest complete one, is intact and a new run resumes from it")
      self._remove_unfinished(number)
      raise CheckpointSaveError(
          f"Could not write checkpoint {number} in {self.folder} ({type(e).__name__}: {str(e)[:300]}). Free "
          f"disk space or fix the permissions there, then run the same command again; {kept}.") from e
    return number

  def _remove_unfinished(self, number: int) -> None:
    """Removes checkpoint ``number``'s temporary folder left by a failed save (process 0)."""
    if jax.process_index() == 0:
      for stale in self.folder.glob(f"{number}.orbax-checkpoint-tmp*"):
        _remove_settled(stale)

  def _write(self, number: int, host, meta: dict) -> None:
    self.manager.save(number, args=ocp.args.Composite(state=ocp.args.StandardSave(host),
                                                      meta=ocp.args.JsonSave(meta)), force=True)
    self.manager.wait_until_finished()

  def read_meta(self, number: int | None = None) -> dict | None:
    """The ``meta`` item of checkpoint ``number`` (default: newest), or None if there is none."""
    number = self.latest() if number is None else number
    if number is None:
      return None
    return self.manager.restore(number, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def _read(self, number: int, target, check_meta: Callable[[dict], None] | None) -> tuple[Any, dict]:
    """``(stored state, meta)`` of one checkpoint. Raises _Damaged if it does not read completely,
    CheckpointMismatch (or what ``check_meta`` raises) if it reads but belongs to other settings."""
    try:
      meta = self.manager.restore(number, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
      stored = self.manager.item_metadata(number).state
      if not isinstance(meta, dict) or stored is None:
        raise ValueError("the meta item or the state's tree metadata is missing")
    except Exception as e:  # noqa: BLE001 (any failure to read is damage; the settings are compared below)
      raise _Damaged(f"{type(e).__name__}: {str(e)[:200]}") from e
    if check_meta is not None:
      check_meta(meta)
    differences = _tree_differences(getattr(stored, "tree", stored), target)
    if differences:
      raise CheckpointMismatch(
          f"Checkpoint {self.folder / str(number)} holds other parameters or optimizer state than this run "
          f"({'; '.join(differences[:5])}{'; ...' if len(differences) > 5 else ''}): it was written with another "
          "model, method or optimizer setting. Resume with the settings it was written with, or choose another "
          "output folder (--output).")
    try:
      state = self.manager.restore(number, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state
    except Exception as e:  # noqa: BLE001 (the tree matched: a failure here is a damaged file)
      raise _Damaged(f"{type(e).__name__}: {str(e)[:200]}") from e
    return state, meta

  def _set_aside(self, number: int) -> epath.Path:
    """Moves damaged checkpoint ``number`` to ``damaged_checkpoints/`` (process 0; every process waits)."""
    aside = self.folder.parent / "damaged_checkpoints" / str(number)
    if jax.process_index() == 0:
      aside.parent.mkdir(parents=True, exist_ok=True)
      suffix = 1
      while aside.exists():
        aside, suffix = aside.with_name(f"{number}.{suffix}"), suffix + 1
      (self.folder / str(number)).rename(aside)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"migu_jax set aside checkpoint {number}")
    return aside

  def restore(self, like: Any, number: int | None = None, *,
              check_meta: Callable[[dict], None] | None = None) -> tuple[Any, dict] | None:
    """``(state, meta)`` of the newest checkpoint that reads completely, shaped like ``like``; None if none.

    Walks back from the newest checkpoint (or from ``number``): one that fails to read (a truncated or
    missing file, unreadable metadata) is moved to ``damaged_checkpoints/`` with a :class:`FaultWarning`
    that names it and the checkpoint the run resumes from.

    Args:
      like: a tree shaped like the stored state (PRNG keys where keys were stored).
      number: the newest checkpoint to consider (default: every one).
      check_meta: called with each readable checkpoint's ``meta`` before its state is read; it raises
        when the checkpoint belongs to other settings (e.g. the runner's identity check).

    Raises:
      CheckpointMismatch: the stored tree differs from ``like`` (the model, method or optimizer changed).
      CheckpointDamaged: checkpoints exist but none reads completely.
    """
    numbers = sorted((n for n in self.manager.all_steps() if number is None or n <= number), reverse=True)
    target = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), to_storable(like))
    damaged = []
    for n in numbers:
      try:
        state, meta = self._read(n, target, check_meta)
      except _Damaged as e:
        damaged.append((n, str(e)))
        continue
      if damaged:
        moved = [(n_, why, self._set_aside(n_)) for n_, why in damaged]
        self.manager.reload()
        warnings.warn("; ".join(f"Checkpoint {self.folder / str(n_)} is damaged ({why}), moved to {aside}"
                                for n_, why, aside in moved)
                      + f". Resuming from checkpoint {n} ({position(meta)}).", FaultWarning, stacklevel=2)
      return from_storable(state, like), meta
    if damaged:
      raise CheckpointDamaged(
          f"No checkpoint in {self.folder} reads completely: "
          + "; ".join(f"{n_}: {why}" for n_, why in damaged)
          + ". Restore them from a copy if there is one; otherwise move the folder aside to start over.")
    return None

  def close(self):
    self.manager.close()
