"""Figures of a continual-learning experiment (PNG, matplotlib's Agg backend).

* ``matrix_<method>_seed<s>.png``: the accuracy matrix of a run as a heatmap (the initial row first).
* ``magnitudes_initial.png`` (the paper's Figure 1): the L1-normalised output magnitudes of one linear
  layer of the initial model on each task's data: different tasks light up different output features.
* ``overlap.png`` (the paper's Figure 5): for each method, the overlap (Jaccard index) of the top
  ``1 - T`` magnitude positions between tasks, per layer and averaged over layers, from the model trained
  on each task and that task's data.

The runner captures the magnitudes (``magnitudes_initial.npz`` in the experiment folder,
``magnitudes_task_<i>.npz`` in each run folder); :func:`plot_experiment` draws everything it finds.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from migu_jax import masking  # noqa: E402
from migu_jax.cl import storage  # noqa: E402


def plot_matrix(run: dict, path: str | os.PathLike) -> Path:
  """Heatmap of one run's accuracies (percent): the initial row, then one row per trained task (a text-domain
  run: :func:`plot_perplexity_matrix`)."""
  if run.get("metric") == "perplexity":
    return plot_perplexity_matrix(run, path)
  tasks = run["tasks"]
  values = np.array([run["initial"]] + run["matrix"], dtype=float) * 100
  fig, ax = plt.subplots(figsize=(1.2 * len(tasks) + 2.5, 0.6 * len(values) + 1.8))
  im = ax.imshow(values, cmap="viridis", vmin=0, vmax=100)
  for (i, j), v in np.ndenumerate(values):
    ax.text(j, i, f"{v:.0f}", ha="center", va="center", color="white" if v < 60 else "black", fontsize=9)
  ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
  ax.set_yticks(range(len(values)), ["initial"] + [f"after {t}" for t in tasks])
  ax.set_xlabel("evaluated on")
  metrics = run["metrics"]
  aa, bwt = metrics["average_accuracy"], metrics["backward_transfer"]
  title = f"{run['method']} (seed {run['seed']}): AA {100 * aa:.1f}"
  if bwt is not None:
    title += f", BWT {100 * bwt:.1f}"
  ax.set_title(title)
  fig.colorbar(im, ax=ax, label="accuracy (%)")
  return _save(fig, path)


def plot_perplexity_matrix(run: dict, path: str | os.PathLike) -> Path:
  """Heatmap of one run's held-out perplexities (log colour scale, lower is better), the initial row first."""
  from matplotlib.colors import LogNorm

  tasks = run["tasks"]
  values = np.array([run["initial"]] + run["matrix"], dtype=float)
  fig, ax = plt.subplots(figsize=(1.3 * len(tasks) + 2.5, 0.6 * len(values) + 1.8))
  norm = LogNorm(vmin=max(values.min(), 1.0), vmax=max(values.max(), 1.01))
  im = ax.imshow(values, cmap="viridis_r", norm=norm)
  for (i, j), v in np.ndenumerate(values):
    ax.text(j, i, f"{v:.3g}", ha="center", va="center", color="white" if norm(v) > 0.6 else "black", fontsize=8)
  ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
  ax.set_yticks(range(len(values)), ["initial"] + [f"after {t}" for t in tasks])
  ax.set_xlabel("evaluated on")
  m = run["metrics"]
  title = f"{run['method']} (seed {run['seed']}): PPL {m['average_perplexity']:.2f}"
  if m.get("perplexity_increase") is not None:
    title += f", BWT {m['perplexity_increase']:+.2f} (increase = forgotten)"
  ax.set_title(title, fontsize=9)
  fig.colorbar(im, ax=ax, label="perplexity (lower is better)")
  return _save(fig, path)


def _save(fig, path, tight: bool = True) -> Path:
  path = storage.output_path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  if tight:
    fig.tight_layout()
  with path.open("wb") as f:  # a file object: remote folders (gs://) too
    fig.savefig(f, dpi=110, format="png")
  plt.close(fig)
  return path


def _by_task(npz: dict) -> dict[int, dict[str, np.ndarray]]:
  out: dict[int, dict[str, np.ndarray]] = {}
  for key in npz:
    task, layer = key.split(":", 1)
    out.setdefault(int(task), {})[layer] = npz[key]
  return out


def default_layer(layers: Sequence[str]) -> str:
  """A middle layer's first projection (e.g. ``layers_2/attention/query/kernel``), for Figure 1."""
  layers = sorted(layers)
  return layers[len(layers) // 2]


def plot_magnitude_distribution(npz_path, tasks: Sequence[str], path, layer: str | None = None) -> Path:
  """The paper's Figure 1: L1-normalised magnitudes of one layer's output features on each task."""
  by_task = _by_task(_load_npz(npz_path))
  layer = layer or default_layer(by_task[0])
  fig, ax = plt.subplots(figsize=(9, 3.6))
  for j in sorted(by_task):
    v = by_task[j][layer]
    ax.plot(v / max(v.sum(), 1e-12), lw=0.8, alpha=0.8, label=tasks[j] if j < len(tasks) else str(j))
  ax.set_xlabel("output feature")
  ax.set_ylabel("L1-normalised magnitude")
  ax.set_title(f"Initial model, {layer}")
  ax.legend(fontsize=8, ncol=min(len(by_task), 5))
  return _save(fig, path)


def top_positions(v: np.ndarray, ratio: float) -> np.ndarray:
  """Boolean mask of the ``n - floor(ratio n)`` largest entries (MIGU's kept features, ties by position):
  :func:`migu_jax.masking.top_k_rule` on the host."""
  return np.asarray(masking.top_k_rule(jnp.asarray(v), ratio))


def overlap_matrix(per_task: Sequence[dict[str, np.ndarray]], ratio: float = 0.7) -> np.ndarray:
  """Jaccard index of the top ``1 - ratio`` positions between tasks, averaged over layers: ``[T, T]``."""
  t = len(per_task)
  layers = sorted(set.intersection(*(set(m) for m in per_task)))
  out = np.zeros((t, t))
  for layer in layers:
    tops = [top_positions(m[layer], ratio) for m in per_task]
    for i in range(t):
      for j in range(t):
        inter = np.logical_and(tops[i], tops[j]).sum()
        union = np.logical_or(tops[i], tops[j]).sum()
        out[i, j] += inter / max(union, 1)
  return out / max(len(layers), 1)


def run_magnitudes(run_dir: str | os.PathLike, n_tasks: int) -> list[dict[str, np.ndarray]] | None:
  """The magnitudes captured after each task of a run, or None when some are missing."""
  paths = [storage.output_path(run_dir) / f"magnitudes_task_{i}.npz" for i in range(n_tasks)]
  if not all(p.exists() for p in paths):
    return None
  return [_load_npz(p) for p in paths]


def _load_npz(path) -> dict[str, np.ndarray]:
  with storage.output_path(path).open("rb") as f:
    return dict(np.load(f))


def plot_overlap(overlaps: dict[str, np.ndarray], tasks: Sequence[str], path, ratio: float = 0.7) -> Path:
  """The paper's Figure 5: one overlap heatmap per method (e.g. SeqFT vs MIGU), same colour scale."""
  fig, axes = plt.subplots(1, len(overlaps), figsize=(4.2 * len(overlaps) + 1.2, 3.8), squeeze=False,
                           constrained_layout=True)
  for k, (ax, (method, m)) in enumerate(zip(axes[0], overlaps.items())):
    im = ax.imshow(m, cmap="magma", vmin=0, vmax=1)
    for (i, j), v in np.ndenumerate(m):
      ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black", fontsize=8)
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_yticks(range(len(tasks)), tasks if k == 0 else [""] * len(tasks))
    off = m[~np.eye(len(m), dtype=bool)]
    ax.set_title(f"{method}: mean off-diagonal {off.mean():.2f}" if off.size else method, fontsize=10)
  fig.colorbar(im, ax=axes[0].tolist(), label=f"Jaccard of top {100 * (1 - ratio):.0f}% positions")
  return _save(fig, path, tight=False)


def plot_experiment(folder: str | os.PathLike, results: dict, *, out: str | os.PathLike | None = None
                    ) -> list[Path]:
  """Every figure for an experiment folder (into ``out``, default ``<folder>/plots``); returns the paths."""
  folder = storage.output_path(folder)
  out = storage.output_path(out) if out is not None else folder / "plots"
  written = [plot_matrix(run, out / f"matrix_{run['method']}_seed{run['seed']}.png") for run in results["runs"]]
  if not results["runs"]:
    return written
  tasks = results["runs"][0]["tasks"]
  if (folder / "magnitudes_initial.npz").exists():
    written.append(plot_magnitude_distribution(folder / "magnitudes_initial.npz", tasks,
                                               out / "magnitudes_initial.png"))
  ratio = results["config"].get("ratio", 0.7)
  overlaps = {}
  for run in results["runs"]:
    if run["seed"] != results["runs"][0]["seed"] or run["method"] in overlaps:
      continue
    mags = run_magnitudes(folder / run["method"] / f"seed_{run['seed']}", len(run["tasks"]))
    if mags is not None:
      overlaps[run["method"]] = overlap_matrix(mags, ratio)
  if overlaps:
    written.append(plot_overlap(overlaps, tasks, out / "overlap.png", ratio))
  return written
