"""Results of continual-learning runs: JSON, Markdown tables and the side-by-side comparison.

A run's result (``<output>/<method>/seed_<s>/result.json``) holds its task order, the initial accuracies,
the accuracy matrix ``R[i][j]`` (rows: after training task ``i``; columns: task ``j``; fractions), the
metrics of :func:`migu_jax.cl.metrics.summarize`, the evaluation mode, the tasks evaluated on a held-out
part of their training file, wall times and losses. An experiment's ``results.json`` gathers the runs with
the config, package versions and a comparison of the methods (mean over seeds); ``results.md`` shows the
same as tables. Only complete runs have a result.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import sys
from collections.abc import Sequence

import numpy as np

from migu_jax.cl import atomic, storage
from migu_jax.cl.metrics import summarize
from migu_jax.cl.perplexity import PERPLEXITY_METRICS, summarize_perplexity

METRICS = (("average_accuracy", "AA"), ("backward_transfer", "BWT"), ("forward_transfer", "FWT"),
           ("average_forgetting", "Forgetting"))
"""The metrics compared side by side: key in :func:`summarize` -> column name."""

_PACKAGES = ("migu-jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "transformers",
             "tokenizers")


def versions() -> dict:
  """Python, platform, devices and the versions of the packages a result depends on."""
  out = {"python": sys.version.split()[0], "platform": platform.platform()}
  for name in _PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  try:
    import jax
    out["devices"] = [str(d) for d in jax.devices()]
  except Exception:  # noqa: BLE001 - versions are informative only
    pass
  return out


def _clean(x):
  """NaN -> None, so the JSON is standard."""
  if isinstance(x, float) and math.isnan(x):
    return None
  if isinstance(x, dict):
    return {k: _clean(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_clean(v) for v in x]
  return x


END_TASK_METRICS = (("end_task_accuracy", "End-task acc"), ("end_task_macro_f1", "End-task macro-F1"))
"""The DAS protocol's means over domains (percent), compared beside the perplexity metrics."""


def metric_columns(metric: str | None) -> tuple[tuple[str, str], ...]:
  """The compared metrics of runs measured by ``metric`` (``"accuracy"`` or ``"perplexity"``)."""
  return PERPLEXITY_METRICS + END_TASK_METRICS if metric == "perplexity" else METRICS


def run_result(method: str, seed: int, tasks, meta: dict, eval_mode: str) -> dict:
  """The result of one complete run from the runner's checkpoint ``meta`` (a text-domain run's matrix holds
  perplexities: ``metric`` says which, ``general`` the general corpus' perplexity at each stage)."""
  matrix = meta["rows"]
  metric = meta.get("metric", "accuracy")
  if metric == "perplexity":
    metrics = summarize_perplexity(matrix, initial=meta["initial"], general=meta.get("general"))
    ends = list((meta.get("end_tasks") or {}).values())
    metrics["end_task_accuracy"] = float(np.mean([e["accuracy"] for e in ends])) if ends else None
    metrics["end_task_macro_f1"] = float(np.mean([e["macro_f1"] for e in ends])) if ends else None
  else:
    metrics = summarize(matrix, initial=meta["initial"])
  return _clean({
      "method": method,
      "metric": metric,
      "general": meta.get("general") or None,
      "end_tasks": meta.get("end_tasks"),
      "seed": seed,
      "tasks": [t.name for t in tasks],
      "eval_mode": eval_mode,
      "heldout_tasks": [t.name for t in tasks if t.test_is_heldout],
      "train_examples": [len(t.train) for t in tasks],
      "test_examples": [len(t.test) for t in tasks],
      "initial": meta["initial"],
      "matrix": matrix,
      "metrics": metrics,
      "steps": meta["steps"],
      "wall_time_s": {"initial_eval": meta["initial_eval_s"], "train": meta["train_s"], "eval": meta["eval_s"],
                      "total": meta["initial_eval_s"] + sum(meta["train_s"]) + sum(meta["eval_s"])},
      "final_loss": [losses[-1] if losses else None for losses in meta["losses"]],
      "params_sha256": meta.get("params_sha256"),
      "also": {m: {"initial": v["initial"], "matrix": v["rows"], "metrics": summarize(v["rows"], initial=v["initial"])}
               for m, v in (meta.get("also") or {}).items()},
      "speed": speed(meta.get("speed")),
  })


def speed(counts: dict | None) -> dict | None:
  """Train and evaluation tokens/s (real tokens of the examples, prompt and answer) and compile time.

  Train tokens/s excludes the steps that compiled (their time is ``compile_s``); evaluation tokens/s
  counts each test example's tokens once, however many options it scores, over the evaluations' wall time.
  """
  if not counts:
    return None
  rate = lambda tokens, seconds: tokens / seconds if seconds else None
  return {"train_tokens_per_s": rate(counts.get("train_tokens", 0), counts.get("train_step_s", 0.0)),
          "eval_tokens_per_s": rate(counts.get("eval_tokens", 0), counts.get("eval_s", 0.0)),
          "compile_s": counts.get("compile_s", 0.0), **counts}


def comparison(runs: Sequence[dict], mode: str | None = None) -> dict:
  """Per method: each metric's mean and standard deviation over seeds, and the seeds (``mode``: the
  metrics of that extra evaluation mode, ``run["also"][mode]``)."""
  out = {}
  for method in dict.fromkeys(r["method"] for r in runs):
    mine = [r for r in runs if r["method"] == method]
    row = {"seeds": [r["seed"] for r in mine]}
    for key, _ in metric_columns(mine[0].get("metric") if mode is None else None):
      metrics = [r["metrics"] if mode is None else r["also"][mode]["metrics"] for r in mine]
      values = [m.get(key) for m in metrics if m.get(key) is not None]
      row[key] = float(np.mean(values)) if values else None
      row[key + "_std"] = float(np.std(values)) if len(values) > 1 else None
    out[method] = row
  return out


def experiment_results(config: dict, runs: Sequence[dict], *, wall_s: float, data_dir: str) -> dict:
  """``results.json`` of an experiment: config, versions, runs and comparison."""
  return _clean({"config": config, "data_dir": data_dir, "versions": versions(), "wall_time_s": wall_s,
                 "eval_mode": sorted({r["eval_mode"] for r in runs}),
                 "heldout_tasks": sorted({t for r in runs for t in r["heldout_tasks"]}),
                 "runs": list(runs), "comparison": comparison(runs),
                 "comparison_also": {m: comparison(runs, m) for m in sorted({m for r in runs for m in r.get("also", {})})}})


def _pct(x) -> str:
  return "-" if x is None else f"{100 * x:.1f}"


def _ppl(x) -> str:
  return "-" if x is None else f"{x:.2f}"


def comparison_table(comp: dict) -> str:
  """Markdown table: one row per method, AA / BWT / FWT / forgetting in percent (mean ± std over seeds); for
  text domains the perplexity metrics (:data:`migu_jax.cl.perplexity.PERPLEXITY_METRICS`) as they are."""
  perplexity = any("average_perplexity" in row for row in comp.values())
  ends = any(row.get(k) is not None for row in comp.values() for k, _ in END_TASK_METRICS)
  columns = (PERPLEXITY_METRICS + (END_TASK_METRICS if ends else ())) if perplexity else METRICS
  lines = ["| method | " + " | ".join(name for _, name in columns) + " | seeds |",
           "|---|" + "---:|" * len(columns) + "---|"]
  for method, row in comp.items():
    cells = [metric_cell(row, key, percent=not perplexity or key.startswith("end_task")) for key, _ in columns]
    lines.append(f"| {method} | " + " | ".join(cells) + f" | {','.join(map(str, row['seeds']))} |")
  return "\n".join(lines)


def metric_cell(row: dict, key: str, *, percent: bool = True) -> str:
  """One cell of a :func:`comparison` row: ``mean ± std`` (std only over several seeds), in percent or (for
  perplexities) as it is; ``-`` when missing.

  Example:
    >>> metric_cell({"average_accuracy": 0.5, "average_accuracy_std": 0.02}, "average_accuracy")
    '50.0 ± 2.0'
  """
  cell = (_pct if percent else _ppl)(row.get(key))
  if row.get(key + "_std") is not None:
    cell += f" ± {(100 if percent else 1) * row[key + '_std']:.{1 if percent else 2}f}"
  return cell


def matrix_table(run: dict) -> str:
  """Markdown accuracy matrix of one run (percent), the initial row first (perplexities as they are, with
  a column for the general corpus when the run has one)."""
  tasks = run["tasks"]
  fmt = _ppl if run.get("metric") == "perplexity" else _pct
  general = run.get("general") or []
  extra = " general |" if general else ""
  lines = ["| after \\ on | " + " | ".join(tasks) + " |" + extra, "|---|" + "---:|" * (len(tasks) + bool(general)),
           "| initial | " + " | ".join(fmt(x) for x in run["initial"]) + " |"
           + (f" {fmt(general[0])} |" if general else "")]
  for i, (name, row) in enumerate(zip(tasks, run["matrix"])):
    lines.append(f"| {name} | " + " | ".join(fmt(x) for x in row) + " |"
                 + (f" {fmt(general[i + 1])} |" if len(general) > i + 1 else ""))
  return "\n".join(lines)


def markdown(results: dict) -> str:
  """``results.md``: the comparison, then each run's matrix."""
  cfg = results["config"]
  parts = [f"# Continual learning: {', '.join(results['config']['methods'])}", "",
           f"Model `{cfg['model']}`, order `{cfg['order']}`, eval mode {', '.join(results['eval_mode'])}; "
           + ("held-out perplexities (lower is better; BWT and forgetting are perplexity increases, positive "
            "means forgotten)" if _is_perplexity(results) else "accuracies in percent")
           + f". Wall time {results['wall_time_s']:.0f} s.", ""]
  if results["heldout_tasks"]:
    parts += [f"Tasks evaluated on a held-out part of train.json (no test file): "
              f"{', '.join(results['heldout_tasks'])}.", ""]
  parts += [comparison_table(results["comparison"]), ""]
  for mode, comp in (results.get("comparison_also") or {}).items():
    parts += [f"Evaluated by {mode}:", "", comparison_table(comp), ""]
  if results.get("tuning"):
    t = results["tuning"]
    parts += [f"Learning rates chosen on a dev split ({t['dev_per_class']} training records per label held out, "
              f"seed {t['seed']}, not the test set): " + ", ".join(
                  f"{m} {r:g}" for m, r in t["chosen"].items()) + f" (tried {', '.join(f'{r:g}' for r in t['rates'])}; "
              f"`name@rate` rows at another rate use the config's fixed learning_rate).", ""]
  for run in results["runs"]:
    parts += [f"## {run['method']}, seed {run['seed']}", "", matrix_table(run), ""]
    if run.get("end_tasks"):
      parts += ["End tasks (DAS protocol: a copy of the final model fine-tuned on each):", "",
                "| domain | end task | accuracy | macro-F1 | train / test records |", "|---|---|---:|---:|---|"]
      parts += [f"| {d} | {e['task']} | {_pct(e['accuracy'])} | {_pct(e['macro_f1'])} | {e['train_examples']} / "
                f"{e['test_examples']} |" for d, e in run["end_tasks"].items()]
      parts += [""]
  return "\n".join(parts)


def _is_perplexity(results: dict) -> bool:
  return any(r.get("metric") == "perplexity" for r in results["runs"])


def write_results(folder: str | os.PathLike, results: dict) -> None:
  """Writes ``results.json`` and ``results.md`` into ``folder`` (each replaced atomically)."""
  atomic.write_json(storage.output_path(folder) / "results.json", results)
  atomic.write_text(storage.output_path(folder) / "results.md", markdown(results))


def load_results(folder: str | os.PathLike) -> dict:
  """The ``results.json`` of an experiment folder.

  Raises:
    FileNotFoundError: there is none (the run is not finished, or the path is wrong); names the folder.
  """
  path = storage.output_path(folder) / "results.json"
  if not path.is_file():
    raise FileNotFoundError(f"{path} does not exist: {folder} is not a finished experiment folder. Finish the "
                            "run (start it again with the same command to resume) or point at another folder.")
  return json.loads(path.read_text())
