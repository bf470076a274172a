"""Continual-learning metrics against matrices computed by hand."""
import math

import numpy as np
import pytest

from migu_jax.cl import metrics

# R[i, j]: accuracy on task j after training task i. Hand-computed values below.
R3 = [
    [0.90, 0.20, 0.10],
    [0.95, 0.80, 0.30],
    [0.60, 0.50, 0.95],
]
B3 = [0.10, 0.20, 0.25]  # initial model's accuracies

# AA  = (0.60 + 0.50 + 0.95) / 3                     = 2.05 / 3 = 0.683333...
# BWT = ((0.60 - 0.90) + (0.50 - 0.80)) / 2          = -0.30
# FWT = ((R[0,1] - b1) + (R[1,2] - b2)) / 2 = ((0.20 - 0.20) + (0.30 - 0.25)) / 2 = 0.025
# F   = ((max(0.90, 0.95) - 0.60) + (max(0.80) - 0.50)) / 2 = (0.35 + 0.30) / 2 = 0.325
AA3, BWT3, FWT3, F3 = 2.05 / 3, -0.30, 0.025, 0.325


def test_hand_computed_3_tasks():
  assert metrics.average_accuracy(R3) == pytest.approx(AA3)
  assert metrics.backward_transfer(R3) == pytest.approx(BWT3)
  assert metrics.forward_transfer(R3, initial=B3) == pytest.approx(FWT3)
  assert metrics.average_forgetting(R3) == pytest.approx(F3)


def test_initial_row_matrix_equals_separate_initial():
  with_row = [B3] + R3  # (T+1) x T: first row is the initial model
  assert metrics.average_accuracy(with_row) == pytest.approx(AA3)
  assert metrics.backward_transfer(with_row) == pytest.approx(BWT3)
  assert metrics.forward_transfer(with_row) == pytest.approx(FWT3)
  assert metrics.average_forgetting(with_row) == pytest.approx(F3)
  assert metrics.summarize(with_row) == pytest.approx(metrics.summarize(R3, initial=B3))


def test_summarize():
  s = metrics.summarize(np.array(R3), initial=np.array(B3))
  assert s == pytest.approx({"num_tasks": 3, "average_accuracy": AA3, "backward_transfer": BWT3,
                             "forward_transfer": FWT3, "average_forgetting": F3})
  assert all(type(v) in (int, float) for v in s.values())
  assert metrics.summarize(R3)["forward_transfer"] is None  # no initial accuracies


def test_percentages_keep_their_unit():
  assert metrics.average_accuracy(np.array(R3) * 100) == pytest.approx(AA3 * 100)
  assert metrics.backward_transfer(np.array(R3) * 100) == pytest.approx(BWT3 * 100)


def test_forgetting_ignores_accuracy_before_a_task_was_trained():
  # Task 1 scores 0.99 before it is trained (row 0) and 0.8 once trained: forgetting is measured from 0.8.
  R = [[0.9, 0.99], [0.7, 0.8]]
  assert metrics.average_forgetting(R) == pytest.approx(0.9 - 0.7)  # only task 0 counts: 0.2


def test_unneeded_nan_entries_are_allowed():
  # Only the lower triangle and diagonal evaluated (future tasks never evaluated).
  nan = float("nan")
  R = [[0.9, nan, nan], [0.95, 0.8, nan], [0.6, 0.5, 0.95]]
  assert metrics.average_accuracy(R) == pytest.approx(AA3)
  assert metrics.backward_transfer(R) == pytest.approx(BWT3)
  assert metrics.average_forgetting(R) == pytest.approx(F3)
  with pytest.raises(ValueError, match=r"R\[j-1, j\]"):
    metrics.forward_transfer(R, initial=B3)  # FWT needs the superdiagonal


@pytest.mark.parametrize("row, col, fn", [
    (2, 0, metrics.average_accuracy),  # last row
    (1, 1, metrics.backward_transfer),  # diagonal
    (0, 0, metrics.average_forgetting),  # column 0, rows 0..T-2
])
def test_nan_in_needed_entry_raises(row, col, fn):
  R = np.array(R3)
  R[row, col] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    fn(R)


def test_single_task():
  assert metrics.average_accuracy([[0.7]]) == pytest.approx(0.7)
  assert math.isnan(metrics.backward_transfer([[0.7]]))
  assert math.isnan(metrics.forward_transfer([[0.7]], initial=[0.1]))
  assert math.isnan(metrics.forward_transfer([[0.1], [0.7]]))  # (T+1) x T with T = 1
  assert math.isnan(metrics.average_forgetting([[0.7]]))
  s = metrics.summarize([[0.7]])
  assert s["num_tasks"] == 1 and s["forward_transfer"] is None


@pytest.mark.parametrize("bad, match", [
    ([0.1, 0.2], "2-D"),
    ([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]], "T x T or"),  # 2 x 3: neither T x T nor (T+1) x T
    ([[0.1, 0.2]] * 4, "T x T or"),  # 4 x 2
    (np.zeros((0, 0)), "at least one task"),
    ([[0.1, 0.2], [0.3]], "rectangular"),
    ([["a", "b"], ["c", "d"]], "numeric"),
])
def test_malformed_matrix_raises(bad, match):
  with pytest.raises(ValueError, match=match):
    metrics.average_accuracy(bad)


def test_bad_initial_raises():
  with pytest.raises(ValueError, match="one accuracy per task"):
    metrics.forward_transfer(R3, initial=[0.1, 0.2])
  with pytest.raises(ValueError, match="do not pass `initial`"):
    metrics.forward_transfer([B3] + R3, initial=B3)
  with pytest.raises(ValueError, match="needs the initial accuracies"):
    metrics.forward_transfer(R3)
