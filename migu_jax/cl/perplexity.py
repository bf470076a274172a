"""Continual pre-training metrics over a perplexity matrix (lower is better).

``P[i][j]`` is the held-out perplexity on domain ``j`` after training on domains ``0..i``; ``b_j`` the
initial model's. The metrics mirror :mod:`migu_jax.cl.metrics` with the sign read for perplexity:

* ``average_perplexity``: the mean of the last row.
* ``perplexity_increase`` (BWT): ``1/(T-1) sum_{j<T-1} (P[T-1, j] - P[j, j])``; positive means the later
  domains made earlier ones worse (forgetting), negative that they helped.
* ``perplexity_forgetting``: ``1/(T-1) sum_{j<T-1} (P[T-1, j] - min_{j<=i<T-1} P[i, j])`` (>= 0).
* ``forward_change`` (FWT): ``1/(T-1) sum_{j>=1} (P[j-1, j] - b_j)``; negative means earlier domains
  already lowered a domain's perplexity before it was trained on.
* ``general_perplexity`` and ``general_increase``: the general held-out corpus after the last domain, and
  its change from the initial model (positive: general knowledge lost), when one was given.

Example:
  >>> s = summarize_perplexity([[10.0, 30.0], [12.0, 15.0]], initial=[20.0, 40.0], general=[8.0, 8.5, 9.0])
  >>> s["average_perplexity"], s["perplexity_increase"], s["forward_change"], s["general_increase"]
  (13.5, 2.0, -10.0, 1.0)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PERPLEXITY_METRICS = (("average_perplexity", "PPL"), ("perplexity_increase", "BWT (PPL increase)"),
                      ("forward_change", "FWT (PPL change)"), ("perplexity_forgetting", "Forgetting (PPL)"),
                      ("general_perplexity", "General PPL"), ("general_increase", "General PPL increase"))
"""The metrics compared side by side: key -> column name (perplexities, not percentages)."""


def summarize_perplexity(P, initial: Sequence[float] | None = None,
                         general: Sequence[float] | None = None) -> dict:
  """The metrics of the module docstring as a dict of Python numbers (NaN where undefined, None for the
  general corpus when there is none).

  Args:
    P: the ``T x T`` perplexity matrix (rows: after each domain).
    initial: the initial model's perplexity on each domain.
    general: the general corpus' perplexity: initial model, then after each domain (``T + 1`` values).
  """
  m = np.asarray(P, dtype=float)
  if m.ndim != 2 or m.shape[0] != m.shape[1] or not m.size:
    raise ValueError(f"summarize_perplexity: expected a square T x T matrix, got shape {m.shape}.")
  t = m.shape[1]
  nan = float("nan")
  out = {"num_tasks": int(t), "average_perplexity": float(np.mean(m[-1]))}
  if t > 1:
    out["perplexity_increase"] = float(np.mean([m[-1, j] - m[j, j] for j in range(t - 1)]))
    out["perplexity_forgetting"] = float(np.mean([m[-1, j] - np.min(m[j:t - 1, j]) for j in range(t - 1)]))
  else:
    out["perplexity_increase"] = out["perplexity_forgetting"] = nan
  if initial is not None and t > 1:
    b = np.asarray(initial, dtype=float)
    out["forward_change"] = float(np.mean([m[j - 1, j] - b[j] for j in range(1, t)]))
  else:
    out["forward_change"] = None if initial is None else nan
  if general:
    out["general_perplexity"] = float(general[-1])
    out["general_increase"] = float(general[-1] - general[0])
  else:
    out["general_perplexity"] = out["general_increase"] = None
  return out


__all__ = ["PERPLEXITY_METRICS", "summarize_perplexity"]
