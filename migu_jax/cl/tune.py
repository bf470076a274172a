"""Choosing each method's learning rate on a dev split carved from the training data (never the test set).

A fair comparison of continual-learning methods trains each at its own learning rate. :func:`choose_rates`
runs every method of a config at every rate of ``cfg.tune_rates`` with one seed, evaluating on
``cfg.dev_per_class`` records per label held out of each task's *training* records
(``Config.eval_split="dev"``), and picks, per method, the rate with the best final average accuracy on
dev (ties: the smaller rate). For continual pre-training (``objective="lm"``) the dev split is
``dev_per_class`` documents per domain carved out of its training file, and the best rate has the lowest
final average perplexity on them. :func:`tuned_methods` then names the runs of the real experiment: each method
at its chosen rate and at the config's own ``learning_rate`` (the paper's fixed 1e-4, say), side by side as
``"migu@3e-4"`` / ``"migu@1e-4"``.

:func:`migu_jax.cl.runner.run_experiment` does both when ``cfg.tune_rates`` is set; the dev runs live in
``<output_dir>/tune/`` (resumable like any run) and the choice in ``<output_dir>/tuning.json``.

Example:
  >>> tuned_methods(("seqft", "migu"), {"seqft": 1e-4, "migu": 3e-4}, 1e-4)
  ('seqft@0.0001', 'migu@0.0003', 'migu@0.0001')
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from migu_jax.cl import methods as methods_lib


def rate_spec(method: str, rate: float) -> str:
  """``"migu@0.0003"``: a method name with its learning rate (see :func:`migu_jax.cl.methods.split_spec`)."""
  return f"{method}@{rate:g}"


def dev_config(cfg):
  """The tuning runs' config: every method at every rate of ``cfg.tune_rates``, on the dev split (at most 50
  records per task, by the run's own evaluation mode only), one seed."""
  seed = cfg.seeds[0] if cfg.tune_seed is None else cfg.tune_seed
  specs = tuple(rate_spec(m, r) for m in cfg.methods for r in cfg.tune_rates)
  max_test = 50 if cfg.max_test is None else min(cfg.max_test, 50)
  text_only = dict(general=None, end_tasks=None) if cfg.objective == "lm" else {}  # not needed to choose
  return cfg.replace(methods=specs, seeds=(seed,), eval_split="dev", tune_rates=(), also_eval=(),
                     max_test=max_test, output_dir=str(Path(cfg.output_dir) / "tune"), magnitude_batches=0,
                     **text_only)


def pick(scores: dict[float, float], lower_is_better: bool = False) -> float:
  """The rate with the best score (the highest, or the lowest with ``lower_is_better``); ties go to the
  smaller rate.

  Example:
    >>> pick({1e-4: 0.70, 3e-4: 0.72, 3e-5: 0.72}), pick({1e-4: 40.0, 3e-4: 55.0}, lower_is_better=True)
    (3e-05, 0.0001)
  """
  best = (min if lower_is_better else max)(scores.values())
  return min(r for r, s in scores.items() if s == best)


def choose_rates(cfg, run_experiment) -> dict:
  """Runs the dev sweep of ``cfg`` with ``run_experiment`` and returns (and writes to
  ``<output_dir>/tuning.json``) ``{"chosen": {method: rate}, "dev_average_accuracy": {method: {rate: AA}},
  "seed", "dev_per_class"}`` (``"dev_average_perplexity"`` instead for text domains)."""
  for m in cfg.methods:
    if methods_lib.split_spec(m)[1] is not None:
      raise ValueError(f"Config.methods names {m!r} with its own rate and tune_rates is set; give plain method "
                       "names to tune, or drop tune_rates.")
  dev = dev_config(cfg)
  results = run_experiment(dev)
  metric = "average_perplexity" if cfg.objective == "lm" else "average_accuracy"
  scores = {m: {r: results["comparison"][rate_spec(m, r)][metric] for r in cfg.tune_rates} for m in cfg.methods}
  tuning = {"chosen": {m: pick(s, lower_is_better=metric == "average_perplexity") for m, s in scores.items()},
            f"dev_{metric}": {m: {f"{r:g}": a for r, a in s.items()} for m, s in scores.items()},
            "seed": dev.seeds[0], "dev_per_class": cfg.dev_per_class, "rates": list(cfg.tune_rates)}
  out = Path(cfg.output_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / "tuning.json").write_text(json.dumps(tuning, indent=2))
  return tuning


def tuned_methods(methods: Sequence[str], chosen: dict[str, float], fixed_rate: float | None) -> tuple[str, ...]:
  """Each method at its chosen rate, and at ``fixed_rate`` when that differs (None: chosen rates only)."""
  specs = []
  for m in methods:
    specs.append(rate_spec(m, chosen[m]))
    if fixed_rate is not None and rate_spec(m, fixed_rate) not in specs:
      specs.append(rate_spec(m, fixed_rate))
  return tuple(specs)
