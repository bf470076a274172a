"""What a task trains on, step by step: its examples (with replayed earlier data) and each step's batch.

Both are pure functions of the seed, the task and the step, so a run resumed at any step replays nothing
and skips nothing.

Example:
  >>> from migu_jax.cl import batching
  >>> batching.steps_per_epoch(10, 4), batching.batch_indices(10, 4, seed=0, task_index=0, step=0).shape
  (2, (4,))
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from migu_jax.cl.data import Task
from migu_jax.cl.methods import Method



def training_examples(method: Method, cfg, tasks: Sequence[Task], task_index: int, seed: int
                      ) -> list[tuple[int, Any]]:
  """Task ``task_index``'s training examples as ``(task index, record)``, with replayed earlier data.

  Replay draws ``ceil(replay_fraction * n_j)`` records of each earlier task ``j``, a pure function of
  ``(seed, task_index, j)``.
  """
  examples = [(task_index, r) for r in tasks[task_index].train]
  if method.replay and cfg.replay_fraction > 0:
    for j in range(task_index):
      pool = tasks[j].train
      n = min(len(pool), math.ceil(cfg.replay_fraction * len(pool)))
      picks = np.random.default_rng([seed, task_index, j, 7]).choice(len(pool), n, replace=False)
      examples.extend((j, pool[i]) for i in sorted(picks))
  return examples


def steps_per_epoch(n_examples: int, batch_size: int) -> int:
  """Full batches per epoch (the last partial batch is dropped; a smaller set fills one batch cyclically)."""
  return max(1, n_examples // batch_size)


def batch_indices(n_examples: int, batch_size: int, seed: int, task_index: int, step: int) -> np.ndarray:
  """Which examples step ``step`` of a task trains on: a pure function of ``(seed, task, epoch, step)``.

  Each epoch is a fresh permutation drawn from ``(seed, task_index, epoch)``, so a run resumed at any
  step replays nothing and skips nothing.
  """
  spe = steps_per_epoch(n_examples, batch_size)
  epoch, i = divmod(step, spe)
  perm = _permutation(n_examples, seed, task_index, epoch)
  return np.resize(perm[i * batch_size:], batch_size) if n_examples < batch_size else (
      perm[i * batch_size:(i + 1) * batch_size])


@functools.lru_cache(maxsize=8)
def _permutation(n: int, seed: int, task_index: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([seed, task_index, epoch]).permutation(n)
