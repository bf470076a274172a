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
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


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


class RunCheckpoints:
  """The checkpoints of one run (one method and seed) under ``folder``.

  Args:
    folder: where the numbered checkpoints go.
    keep: how many complete checkpoints to keep (the newest).
  """

  def __init__(self, folder: str | os.PathLike, keep: int = 2):
    self.folder = Path(folder).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=max(1, keep), enable_async_checkpointing=False,
                                           create=True, cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.folder, options=options, item_names=("state", "meta"))

  def latest(self) -> int | None:
    """Number of the newest complete checkpoint, or None."""
    return self.manager.latest_step()

  def save(self, state: Any, meta: dict) -> int:
    """Saves ``state`` (a pytree of arrays) and ``meta`` (JSON) as the next checkpoint; returns its number."""
    latest = self.latest()
    number = 0 if latest is None else latest + 1
    host = jax.tree.map(np.asarray, to_storable(state))
    self.manager.save(number, args=ocp.args.Composite(state=ocp.args.StandardSave(host),
                                                      meta=ocp.args.JsonSave(meta)), force=True)
    self.manager.wait_until_finished()
    return number

  def read_meta(self, number: int | None = None) -> dict | None:
    """The ``meta`` item of checkpoint ``number`` (default: newest), or None if there is none."""
    number = self.latest() if number is None else number
    if number is None:
      return None
    return self.manager.restore(number, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def restore(self, like: Any, number: int | None = None) -> tuple[Any, dict] | None:
    """``(state, meta)`` of checkpoint ``number`` (default: newest), shaped like ``like``; None if none.

    Raises:
      ValueError: the stored tree does not match ``like`` (the model, method or optimizer changed since
        the checkpoint was written); the message names the folder and the fix.
    """
    number = self.latest() if number is None else number
    if number is None:
      return None
    target = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), to_storable(like))
    try:
      restored = self.manager.restore(number, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(
          f"Checkpoint {self.folder / str(number)} does not match this run's parameters or optimizer "
          f"({type(e).__name__}: {str(e)[:300]}). It was written by a different model, method or optimizer "
          "setting: use a new output folder, or delete this one to start over.") from e
    return from_storable(restored.state, like), restored.meta

  def close(self):
    self.manager.close()
