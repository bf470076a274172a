"""Reproduce the paper's claims at CPU scale: run the experiment configs, then tabulate them.

Each experiment is a config file of experiments/configs/ whose ``get_configs()`` returns named
:class:`~migu_jax.cl.runner.Config` s; every one runs with :func:`migu_jax.cl.runner.run_experiment` into
``<root>/<experiment>/<name>`` (default root ``runs/repro``), resuming whatever a killed run left.
The report reads the runs' ``result.json`` files (every seed that finished) and writes
``experiments/results/summary.md`` with the tables of experiments/RESULTS.md, next to its plots.

Commands (from the repository root)::

    .venv/bin/python experiments/reproduce.py                    # every CPU experiment, then the report
    .venv/bin/python experiments/reproduce.py lr_sweep layers    # some experiments, then the report
    .venv/bin/python experiments/reproduce.py --report           # only the report, from finished runs
    .venv/bin/python experiments/reproduce.py --list             # the experiments and their configs

The GPU experiment (``smollm2_order1``) runs only when named.
"""

from __future__ import annotations

import argparse
import ast
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from migu_jax.cl import report as report_lib

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "configs"
RESULTS = HERE / "results"

EXPERIMENTS: dict[str, tuple[str, dict]] = {
    "standard_order1": ("standard_minilm.py", {"order": "1"}),
    "lr_sweep": ("lr_sweep_minilm.py", {}),
    "ratio_sweep": ("ratio_sweep_minilm.py", {}),
    "layers": ("layers_minilm.py", {}),
    "table11": ("table11_minilm.py", {}),
    "padding": ("padding_minilm.py", {}),
    "long_order4": ("long_minilm.py", {"order": "4"}),
    "standard_order2": ("standard_minilm.py", {"order": "2"}),
    "long_order5": ("long_minilm.py", {"order": "5"}),
    "standard_order3": ("standard_minilm.py", {"order": "3"}),
    "long_order6": ("long_minilm.py", {"order": "6"}),
    "smollm2_order1": ("standard_smollm2.py", {"order": "1"}),
}
"""Experiment name -> (config file, keyword arguments of its ``get_configs``), in the order they run."""

GPU_ONLY = ("smollm2_order1",)

PAPER_STANDARD = {"seqft": 75.7, "migu": 78.8, "lora": 67.9, "migu_lora": 73.3, "replay": 77.4, "migu_replay": 78.6}
"""The paper's average accuracy (T5-large, orders 1-3, mean of 3 runs), for the methods it reports."""
PAPER_LONG = {"seqft": 68.3, "migu": 73.8, "lora": 46.0, "migu_lora": 61.2}
"""The same for the long benchmark (orders 4-6)."""


def configs(name: str) -> dict:
  """The named Configs of experiment ``name`` (output folders not yet set)."""
  from migu_jax.cli import load_config_module

  file, kwargs = EXPERIMENTS[name]
  return load_config_module(str(CONFIGS / file)).get_configs(**kwargs)


def run(names, root: Path, seeds=None, changes: dict | None = None, compile_cache: bool = True) -> None:
  """Runs the experiments ``names`` one after the other (each resumes where a killed one stopped), with
  ``seeds`` and any other Config ``changes`` applied to every config; ``compile_cache`` keeps XLA's
  compiled programs in ``<root>/.jax_cache`` (a process-wide JAX setting)."""
  import jax

  from migu_jax.cl import runner

  if compile_cache:  # compiled steps persist across processes: a resumed experiment skips XLA's compile
    jax.config.update("jax_compilation_cache_dir", str(root / ".jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  for name in names:
    for sub, cfg in configs(name).items():
      cfg = cfg.replace(output_dir=str(root / name / sub), **({"seeds": seeds} if seeds else {}), **(changes or {}))
      start = time.perf_counter()
      print(f"[{time.strftime('%H:%M:%S')}] {name}/{sub}: {', '.join(cfg.methods)} x seeds "
            f"{','.join(map(str, cfg.seeds))}", flush=True)
      results = runner.run_experiment(cfg)
      line = "  ".join(f"{m} AA {100 * r['average_accuracy']:.1f}" for m, r in results["comparison"].items())
      print(f"    done in {time.perf_counter() - start:.0f} s: {line}", flush=True)


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def runs_of(root: Path, experiment: str, sub: str, method: str) -> list[dict]:
  """Every finished run (``result.json``) of ``method`` in ``<root>/<experiment>/<sub>``, by seed."""
  folder = root / experiment / sub / method
  return [json.loads(p.read_text()) for p in sorted(folder.glob("seed_*/result.json"))]


def _summary(runs: list[dict]) -> dict:
  """The runs' :func:`migu_jax.cl.report.comparison` row (they are of one method)."""
  (row,) = report_lib.comparison(runs).values()
  return row


def _stat(runs: list[dict], key: str) -> str:
  return report_lib.metric_cell(_summary(runs), key) if runs else "-"


def _table(title: str, rows: list[tuple[str, list[dict]]]) -> list[str]:
  """The runner's comparison table of the rows that ran, then which did not and the wall time per run."""
  done = [(label, runs) for label, runs in rows if runs]
  lines = [f"### {title}", ""]
  if done:
    lines.append(report_lib.comparison_table({label: _summary(runs) for label, runs in done}))
    lines += ["", "Wall time per run (mean): " + ", ".join(
        f"{label} {np.mean([r['wall_time_s']['total'] for r in runs]):.0f} s" for label, runs in done) + "."]
  missing = [label for label, runs in rows if not runs]
  if missing:
    lines.append("Not run: " + ", ".join(missing) + ".")
  return lines + [""]


def _mean_aa(runs: list[dict]) -> float | None:
  return float(np.mean([100 * r["metrics"]["average_accuracy"] for r in runs])) if runs else None


STANDARD_METHODS = ("seqft", "migu", "random", "replay", "migu_replay", "lora", "migu_lora")


def _sub_of(method: str) -> str:
  return "lora" if "lora" in method else "full"


def standard_tables(root: Path) -> list[str]:
  """AA per order (mean ± std over seeds), the mean over orders, and the paper's number."""
  out = ["### Standard benchmark, orders 1-3 (AA, %, mean ± std over seeds)", "",
         "| method | order 1 | order 2 | order 3 | mean | BWT (mean) | paper (T5-large) |",
         "|---|---:|---:|---:|---:|---:|---:|"]
  for method in STANDARD_METHODS:
    per_order = [runs_of(root, f"standard_order{o}", _sub_of(method), method) for o in (1, 2, 3)]
    done = [r for runs in per_order for r in runs]
    means = [m for m in (_mean_aa(runs) for runs in per_order) if m is not None]
    bwt = [100 * r["metrics"]["backward_transfer"] for r in done]
    paper = PAPER_STANDARD.get(method, "-")
    mean = f"{np.mean(means):.1f}" if means else "-"
    bwt_mean = f"{np.mean(bwt):.1f}" if bwt else "-"
    cells = [_stat(runs, "average_accuracy") if runs else "-" for runs in per_order]
    out.append(f"| {method} | " + " | ".join(cells) + f" | {mean} | {bwt_mean} | {paper} |")
  out += ["", "Per order, with BWT, FWT and forgetting:", ""]
  for o in (1, 2, 3):
    out += _table(f"Order {o}", [(m, runs_of(root, f"standard_order{o}", _sub_of(m), m)) for m in STANDARD_METHODS])
  return out


def long_tables(root: Path) -> list[str]:
  out = ["### Long benchmark, orders 4-6 (15 tasks, one seed per order)", "",
         "| method | order 4 | order 5 | order 6 | mean AA | mean BWT | paper (T5-large) |",
         "|---|---:|---:|---:|---:|---:|---:|"]
  for method in ("seqft", "migu"):
    per_order = [runs_of(root, f"long_order{o}", "full", method) for o in (4, 5, 6)]
    done = [r for runs in per_order for r in runs]
    cells = [_stat(runs, "average_accuracy") for runs in per_order]
    mean = f"{np.mean([100 * r['metrics']['average_accuracy'] for r in done]):.1f}" if done else "-"
    bwt = f"{np.mean([100 * r['metrics']['backward_transfer'] for r in done]):.1f}" if done else "-"
    out.append(f"| {method} | " + " | ".join(cells) + f" | {mean} | {bwt} | {PAPER_LONG[method]} |")
  return out + [""]


def _sweeps(root: Path) -> tuple[list[str], dict, dict]:
  from migu_jax.cli import load_config_module

  rates = load_config_module(str(CONFIGS / "lr_sweep_minilm.py")).RATES
  ratios = load_config_module(str(CONFIGS / "ratio_sweep_minilm.py")).RATIOS
  std = lambda m: runs_of(root, "standard_order1", "full", m)  # noqa: E731
  lr_runs = {lr: {m: runs_of(root, "lr_sweep", f"lr_{lr:g}", m) for m in ("seqft", "migu")} for lr in rates}
  lr_runs[3e-4] = {m: std(m) for m in ("seqft", "migu")}
  lr_rows = []
  for lr in sorted(lr_runs):
    for m in ("seqft", "migu"):
      lr_rows.append((f"{m}, lr {lr:g}", lr_runs[lr][m]))
  t_runs = {t: runs_of(root, "ratio_sweep", f"T_{t:g}", "migu") for t in ratios}
  t_runs[0.7] = std("migu")
  t_runs[0.0] = std("seqft")
  t_rows = [(f"T = {t:g}" + (" (SeqFT)" if t == 0 else ""), t_runs[t]) for t in sorted(t_runs)]
  lines = _table("Learning-rate sweep, order 1", lr_rows) + _table("T sweep (MIGU), order 1", t_rows)
  return lines, lr_runs, t_runs


def ablation_tables(root: Path) -> list[str]:
  std = lambda m: runs_of(root, "standard_order1", "full", m)  # noqa: E731
  layers = [("all layers (MIGU)", std("migu")), ("attention only", runs_of(root, "layers", "attention", "migu")),
            ("feed-forward only", runs_of(root, "layers", "ffn", "migu")), ("none (SeqFT)", std("seqft"))]
  importance = [("FT", std("seqft")), ("gradient magnitude", runs_of(root, "table11", "importance", "grad_mask")),
                ("weight magnitude", runs_of(root, "table11", "importance", "weight_mask")),
                ("diagonal Fisher", runs_of(root, "table11", "importance", "fisher_mask")),
                ("output magnitude (MIGU)", std("migu"))]
  variants = [("MIGU, quantile threshold (reference)", std("migu")),
              ("MIGU, exact top-k count", runs_of(root, "padding", "top_k", "migu")),
              ("MIGU, L1-mass threshold", runs_of(root, "table11", "l1_mass", "migu")),
              ("MIGU, padding-aware magnitudes", runs_of(root, "padding", "padding_aware", "migu"))]
  return (_table("Layer types masked (order 1)", layers) + _table("Importance (the paper's Table 11, order 1)",
                                                                 importance)
          + _table("Threshold rule and padding-aware statistics (order 1)", variants))


def overlap_lines(root: Path) -> list[str]:
  """The observation behind MIGU: tasks light up different features, and MIGU keeps them apart."""
  from migu_jax.cl import plots

  folder = root / "standard_order1" / "full"
  lines = ["### Overlap of the top-30% magnitude positions between tasks (order 1, Jaccard, mean over layers"
           " and task pairs)", "", "| model | mean off-diagonal overlap | seeds |", "|---|---:|---:|"]
  initial = folder / "magnitudes_initial.npz"
  if initial.exists():
    by_task = plots._by_task(np.load(initial))
    m = plots.overlap_matrix([by_task[i] for i in sorted(by_task)], 0.7)
    lines.append(f"| pretrained model, each task's data | {m[~np.eye(len(m), dtype=bool)].mean():.2f} | - |")
  for method in ("seqft", "migu", "random", "replay", "migu_replay"):
    values = []
    for result in sorted((folder / method).glob("seed_*/result.json")):
      mags = plots.run_magnitudes(result.parent, len(json.loads(result.read_text())["tasks"]))
      if mags is not None:
        m = plots.overlap_matrix(mags, 0.7)
        values.append(m[~np.eye(len(m), dtype=bool)].mean())
    if values:
      lines.append(f"| after each task, {method} | {np.mean(values):.2f} ± {np.std(values):.2f} | {len(values)} |")
  lines += ["", "Two independent random 30% subsets overlap by 0.18 on average (Jaccard: 0.3² / (0.6 − 0.3²)).",
            ""]
  return lines


def _plot_sweeps(lr_runs: dict, t_runs: dict, out: Path) -> list[Path]:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  written = []
  fig, ax = plt.subplots(figsize=(5, 3.4), constrained_layout=True)
  for m in ("seqft", "migu"):
    xs = [lr for lr in sorted(lr_runs) if lr_runs[lr][m]]
    aa = [[100 * r["metrics"]["average_accuracy"] for r in lr_runs[lr][m]] for lr in xs]
    if xs:
      ax.errorbar(xs, [np.mean(a) for a in aa], yerr=[np.std(a) for a in aa], marker="o", capsize=3, label=m)
  ax.set(xscale="log", xlabel="learning rate", ylabel="AA (%)", title="Order 1, MiniLM: learning rate")
  if ax.get_legend_handles_labels()[0]:
    ax.legend()
  written.append(out / "lr_sweep.png")
  fig.savefig(written[-1], dpi=110)
  plt.close(fig)
  fig, ax = plt.subplots(figsize=(5, 3.4), constrained_layout=True)
  xs = [t for t in sorted(t_runs) if t_runs[t]]
  for key, label in (("average_accuracy", "AA"), ("backward_transfer", "BWT")):
    vals = [[100 * r["metrics"][key] for r in t_runs[t]] for t in xs]
    ax.errorbar(xs, [np.mean(v) for v in vals], yerr=[np.std(v) for v in vals], marker="o", capsize=3, label=label)
  ax.set(xlabel="T (fraction of output features frozen; 0 = SeqFT)", ylabel="%", title="Order 1, MiniLM: T")
  ax.axhline(0, color="grey", lw=0.5)
  if ax.get_legend_handles_labels()[0]:
    ax.legend()
  written.append(out / "ratio_sweep.png")
  fig.savefig(written[-1], dpi=110)
  plt.close(fig)
  return written


def report(root: Path, out: Path = RESULTS) -> Path:
  """Writes ``out/summary.md`` (default experiments/results/), the sweep plots, and copies of order 1's
  figures."""
  out.mkdir(parents=True, exist_ok=True)
  sweeps, lr_runs, t_runs = _sweeps(root)
  lines = ["# Reproduction tables", "",
           f"Generated by `experiments/reproduce.py --report` from `{root}`; accuracies in percent, mean ± std "
           "over the seeds that finished; `s / run`: wall time of one run (training and every evaluation).", ""]
  lines += standard_tables(root) + long_tables(root) + sweeps + ablation_tables(root) + overlap_lines(root)
  path = out / "summary.md"
  path.write_text("\n".join(lines))
  _plot_sweeps(lr_runs, t_runs, out)
  for name in ("overlap.png", "magnitudes_initial.png"):
    src = root / "standard_order1" / "full" / "plots" / name
    if src.exists():
      shutil.copy(src, out / f"order1_{name}")
  return path


def _parse(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("experiments", nargs="*", help=f"names (default: all but {', '.join(GPU_ONLY)})")
  p.add_argument("--root", default="runs/repro", help="where the runs go (default: runs/repro)")
  p.add_argument("--seeds", help="override the seeds, e.g. 0 (default: each config's, 0,1,2)")
  p.add_argument("--set", action="append", metavar="KEY=VALUE", help="change a Config field of every run")
  p.add_argument("--out", default=str(RESULTS), help="where the report goes (default: experiments/results)")
  p.add_argument("--report", action="store_true", help="only write the report from finished runs")
  p.add_argument("--list", action="store_true", help="list the experiments")
  args = p.parse_args(argv)
  if args.list:
    for name, (file, kwargs) in EXPERIMENTS.items():
      print(f"{name:16s} experiments/configs/{file} {kwargs or ''}")
    return 0
  unknown = [n for n in args.experiments if n not in EXPERIMENTS]
  if unknown:
    p.error(f"unknown experiment(s) {unknown}; choose from {', '.join(EXPERIMENTS)}")
  root = Path(args.root)
  if not args.report:
    names = args.experiments or [n for n in EXPERIMENTS if n not in GPU_ONLY]
    changes = {}
    for item in args.set or ():
      key, _, value = item.partition("=")
      changes[key.strip()] = _parse(value)
    run(names, root, tuple(int(s) for s in args.seeds.split(",")) if args.seeds else None, changes)
  print(f"report: {report(root, Path(args.out))}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
