"""Continual-learning metrics from an accuracy matrix.

``R[i, j]`` is the accuracy on task ``j`` after training on tasks ``0..i`` (rows: training stage, columns:
evaluated task), for ``T`` tasks. The matrix is either

* ``T x T``, with the initial (before any training) accuracies ``b_j`` given separately when needed, or
* ``(T+1) x T``, whose first row is ``b`` and whose other rows are the ``T x T`` matrix.

Accuracies may be fractions or percentages; the metrics keep the unit. Entries a metric does not use may be
NaN (e.g. tasks not yet evaluated); a NaN in an entry it needs is an error.

With a single task (``T = 1``) there is nothing to transfer or forget: BWT, FWT and forgetting are NaN
(undefined), and AA is ``R[0, 0]``.

References:
  Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning", NeurIPS 2017 (AA, BWT, FWT).
  Chaudhry et al., "Riemannian Walk for Incremental Learning", ECCV 2018 (forgetting).
  Du et al., "Unlocking Continual Learning Abilities in Language Models", 2024 (reports AA).

Example:
  >>> R = [[0.75, 0.25],
  ...      [0.5, 1.0]]
  >>> for key, value in summarize(R, initial=[0.25, 0.5]).items():
  ...   print(key, value)
  num_tasks 2
  average_accuracy 0.75
  backward_transfer -0.25
  forward_transfer -0.25
  average_forgetting 0.25
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ArrayLike = Sequence[Sequence[float]] | np.ndarray


def _split(R: ArrayLike, initial: Sequence[float] | np.ndarray | None = None
           ) -> tuple[np.ndarray, np.ndarray | None]:
  """Validate ``R``; return the ``T x T`` matrix and the initial accuracies (or None)."""
  try:
    m = np.asarray(R, dtype=np.float64)
  except (TypeError, ValueError) as e:
    raise ValueError(f"Accuracy matrix must be numeric and rectangular: {e}") from e
  if m.ndim != 2:
    raise ValueError(f"Accuracy matrix must be 2-D (rows: after task i, columns: task j), got shape {m.shape}.")
  rows, t = m.shape
  if t < 1:
    raise ValueError(f"Accuracy matrix needs at least one task (column), got shape {m.shape}.")
  if rows == t + 1:
    if initial is not None:
      raise ValueError("The accuracy matrix is (T+1) x T, so its first row already holds the initial accuracies; "
                       "do not pass `initial` as well.")
    return m[1:], m[0]
  if rows != t:
    raise ValueError(f"Accuracy matrix must be T x T or (T+1) x T (first row: initial accuracies), got shape "
                     f"{m.shape}.")
  if initial is None:
    return m, None
  b = np.asarray(initial, dtype=np.float64)
  if b.shape != (t,):
    raise ValueError(f"`initial` must hold one accuracy per task ({t}), got shape {b.shape}.")
  return m, b


def _need(values: np.ndarray, what: str) -> np.ndarray:
  if np.isnan(values).any():
    raise ValueError(f"Accuracy matrix has NaN in {what}, which this metric needs. Evaluate those tasks first.")
  return values


def average_accuracy(R: ArrayLike) -> float:
  """Average accuracy after the last task, the paper's headline metric.

  ``AA = (1/T) * sum_j R[T-1, j]``.

  Example:
    >>> average_accuracy([[0.75, 0.25], [0.5, 1.0]])
    0.75
  """
  m, _ = _split(R)
  return float(np.mean(_need(m[-1], "the last row")))


def backward_transfer(R: ArrayLike) -> float:
  """Backward transfer: how training on later tasks changed accuracy on earlier ones (negative = forgetting).

  ``BWT = 1/(T-1) * sum_{j<T-1} (R[T-1, j] - R[j, j])``; NaN when ``T = 1``.

  Example:
    >>> backward_transfer([[0.75, 0.25], [0.5, 1.0]])
    -0.25
  """
  m, _ = _split(R)
  t = m.shape[1]
  if t == 1:
    return float("nan")
  final = _need(m[-1, :-1], "the last row")
  diag = _need(np.diag(m)[:-1], "the diagonal")
  return float(np.mean(final - diag))


def forward_transfer(R: ArrayLike, initial: Sequence[float] | np.ndarray | None = None) -> float:
  """Forward transfer: how training on earlier tasks changed accuracy on a task before it is trained on.

  ``FWT = 1/(T-1) * sum_{j>=1} (R[j-1, j] - b_j)``, with ``b_j`` the initial model's accuracy on task ``j``
  (``initial``, or the first row of a ``(T+1) x T`` matrix); NaN when ``T = 1``.

  Example:
    >>> forward_transfer([[0.75, 0.25], [0.5, 1.0]], initial=[0.25, 0.5])
    -0.25
  """
  m, b = _split(R, initial)
  if b is None:
    raise ValueError("forward_transfer needs the initial accuracies: pass `initial` or a (T+1) x T matrix whose "
                     "first row holds them.")
  t = m.shape[1]
  if t == 1:
    return float("nan")
  above = _need(np.diag(m, k=1), "the entries just above the diagonal (R[j-1, j])")
  return float(np.mean(above - _need(b[1:], "the initial accuracies")))


def average_forgetting(R: ArrayLike) -> float:
  """Average forgetting: how far each earlier task fell from its best accuracy once learned.

  ``F = 1/(T-1) * sum_{j<T-1} (max_{j<=i<T-1} R[i, j] - R[T-1, j])``; NaN when ``T = 1``.

  The maximum runs over the stages after task ``j`` was trained (``i >= j``), so an accuracy task ``j`` had
  before it was trained on (which ``i < j`` would add) does not count as knowledge to forget; those entries
  may be NaN.

  Example:
    >>> average_forgetting([[0.75, 0.25], [0.5, 1.0]])
    0.25
  """
  m, _ = _split(R)
  t = m.shape[1]
  if t == 1:
    return float("nan")
  drops = []
  for j in range(t - 1):
    best = np.max(_need(m[j:t - 1, j], f"column {j} from row {j} to row {t - 2}"))
    drops.append(best - _need(m[-1, j], "the last row"))
  return float(np.mean(drops))


def summarize(R: ArrayLike, initial: Sequence[float] | np.ndarray | None = None) -> dict:
  """All metrics as a dict of Python numbers.

  Keys: ``num_tasks``, ``average_accuracy``, ``backward_transfer``, ``forward_transfer`` (None when there
  are no initial accuracies: no ``initial`` and a ``T x T`` matrix), ``average_forgetting``.

  Example:
    >>> s = summarize([[0.5]])
    >>> s["average_accuracy"], s["backward_transfer"], s["forward_transfer"]
    (0.5, nan, None)
  """
  m, b = _split(R, initial)
  full = m if b is None else np.vstack([b, m])
  return {
      "num_tasks": int(m.shape[1]),
      "average_accuracy": average_accuracy(m),
      "backward_transfer": backward_transfer(m),
      "forward_transfer": None if b is None else forward_transfer(full),
      "average_forgetting": average_forgetting(m),
  }
