"""Perplexity metrics (lower is better) and how reports show text-domain runs."""

import math

import pytest

from migu_jax.cl import perplexity, report


def test_metrics_read_as_perplexity_increases():
  s = perplexity.summarize_perplexity([[10.0, 30.0, 40.0], [12.0, 15.0, 35.0], [14.0, 13.0, 20.0]],
                                      initial=[50.0, 45.0, 44.0])
  assert s["average_perplexity"] == pytest.approx(47 / 3)
  assert s["perplexity_increase"] == pytest.approx(((14 - 10) + (13 - 15)) / 2)  # > 0: forgotten
  assert s["perplexity_forgetting"] == pytest.approx(((14 - 10) + (13 - 15)) / 2)
  assert s["forward_change"] == pytest.approx(((30 - 45) + (35 - 44)) / 2)
  assert s["general_perplexity"] is None
  one = perplexity.summarize_perplexity([[5.0]])
  assert math.isnan(one["perplexity_increase"]) and one["forward_change"] is None
  with pytest.raises(ValueError, match="square"):
    perplexity.summarize_perplexity([[1.0, 2.0]])


def _run(method, end_tasks=None):
  meta = {"rows": [[10.0, 30.0], [12.0, 15.0]], "initial": [20.0, 40.0], "general": [8.0, 8.5, 9.0],
          "metric": "perplexity", "steps": [2, 2], "initial_eval_s": 0.0, "train_s": [1.0, 1.0],
          "eval_s": [1.0, 1.0], "losses": [[1.0], [1.0]], "end_tasks": end_tasks}
  tasks = [type("T", (), {"name": n, "test_is_heldout": False, "train": (1,), "test": (1,)}) for n in ("G/a", "G/b")]
  return report.run_result(method, 0, tasks, meta, "perplexity")


def test_report_tables_show_perplexities_general_corpus_and_end_tasks():
  ends = {"G/a": {"task": "E/a-end", "accuracy": 0.75, "macro_f1": 0.5, "train_examples": 8, "test_examples": 4}}
  runs = [_run("seqft"), _run("migu", ends)]
  assert runs[1]["metrics"]["end_task_accuracy"] == 0.75 and runs[0]["metrics"]["end_task_accuracy"] is None
  results = report.experiment_results({"methods": ["seqft", "migu"], "model": "m", "order": "G/a,G/b"}, runs,
                                      wall_s=1.0, data_dir="d")
  md = report.markdown(results)
  assert "lower is better" in md and "| G/b | 12.00 | 15.00 | 9.00 |" in md
  assert "| migu | 13.50 | 2.00 |" in md and "| 75.0 | 50.0 |" in md and "| G/a | E/a-end | 75.0 | 50.0 | 8 / 4 |" in md
  assert "End-task" not in report.comparison_table(report.comparison(runs[:1]))
