"""The paper's continual fine-tuning protocol at full scale, for one GPU or a TPU slice.

The setting of the paper's Table 1/8 (v2 text and the reference code, wenyudu/MIGU): every training record of
each task of the order, batch 64, AdamW at a constant 1e-4 (weight decay 0 as the code; ``--weight-decay
0.01`` as the table), clipping at 1.0, 1 epoch (the reference's 2 for WiC in order 5 and MNLI in order 6),
T = 0.7, the first task unmasked, 3 seeds, the label generated greedily and scored by exact match after the
reference's normalisation. The model is SmolLM2-135M-Instruct (offline) by default, or any Llama or T5
folder saved by transformers (``--model /path/to/t5-large``), or a hub id where a network exists.

Before it trains, the script measures this machine: a short probe run at the same batch size and length
(``--probe-per-class`` records per label, a few steps and a small evaluation) gives training and
evaluation tokens per second and the compile time, and with the token counts of the full training and test
files they give the expected wall time, printed per run and in all. ``--estimate`` stops there.

Commands (from the repository root)::

    python experiments/paper_scale.py --estimate                       # the expected wall time, minutes
    python experiments/paper_scale.py                                  # SmolLM2, order 1, 3 seeds
    python experiments/paper_scale.py --model /data/t5-large --order 2 --output runs/paper_t5_order2

Several chips (a TPU slice, several GPUs): ``--mesh`` trains on a mesh of every device (the data axis);
on a pod, run it through ``experiments/tpu/run_cl.py``'s launcher instead (same ``--config`` mechanism).

At a tiny size on CPU (the test, tests/test_paper_scale.py)::

    python experiments/paper_scale.py --tiny --model <tiny llama folder> --data-dir <data> --output <dir>
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from migu_jax.cl import runner

PAPER = dict(
    eval_mode="generate",
    methods=("seqft", "migu"),
    seeds=(0, 1, 2),
    ratio=0.7,
    learning_rate=1e-4,
    schedule="constant",
    weight_decay=0.0,
    clip_norm=1.0,
    batch_size=64,
    epochs=1,
    train_per_class=None,
    max_test=None,
    max_length=512,
    pad_multiple=64,
    eval_batch_size=64,
    checkpoint_every=200,
    magnitude_batches=0,
)
"""The paper's protocol, as :class:`migu_jax.cl.runner.Config` settings."""

TINY = dict(batch_size=4, train_per_class=2, max_test=2, max_length=48, pad_multiple=16, eval_batch_size=4,
            seeds=(0,), checkpoint_every=1000)
"""The dry run of the tests: the same code path, a few steps."""


def paper_config(args) -> runner.Config:
  """The run's Config from the command line."""
  values = dict(PAPER, model=args.model, order=args.order, output_dir=args.output,
                methods=tuple(args.methods.split(",")), weight_decay=args.weight_decay,
                progress=not args.no_progress)
  if args.data_dir:
    values["data_dir"] = args.data_dir
  if args.seeds:
    values["seeds"] = tuple(int(s) for s in args.seeds.split(","))
  if args.also_options:
    values["also_eval"] = ("options",)
  if args.mesh:
    values["mode"] = "mesh"
  if args.tiny:
    values.update(TINY)
  return runner.Config(**values)


def token_counts(cfg: runner.Config) -> dict:
  """Real tokens (prompt and answer) of every task's training and test records at ``cfg``'s settings."""
  tasks = runner.load_tasks(cfg, cfg.seeds[0])
  head = runner._head(cfg, tasks)  # noqa: SLF001 (the runner's own head: the same tokenization)
  train = {t.name: runner.example_tokens(head, [(j, r) for r in t.train]) for j, t in enumerate(tasks)}
  test = {t.name: runner.example_tokens(head, [(j, r) for r in t.test]) for j, t in enumerate(tasks)}
  steps = {t.name: math.ceil(len(t.train) / cfg.batch_size) for t in tasks}
  return {"train_tokens": train, "test_tokens": test, "steps": steps,
          "train_records": {t.name: len(t.train) for t in tasks}, "test_records": {t.name: len(t.test) for t in tasks}}


def probe(cfg: runner.Config, per_class: int) -> dict:
  """This machine's speed at ``cfg``'s batch size and length: one MIGU run on ``per_class`` records per label
  and as many test records (its own folder, ``<output>/probe``); returns its ``speed`` and wall time."""
  small = cfg.replace(train_per_class=per_class, max_test=per_class, seeds=cfg.seeds[:1], methods=("migu",),
                      also_eval=(), output_dir=str(Path(cfg.output_dir) / "probe"), checkpoint_every=10_000)
  start = time.perf_counter()
  result = runner.run_sequence(small, "migu", small.seeds[0])
  return {**result["speed"], "wall_s": time.perf_counter() - start}


def estimate(cfg: runner.Config, counts: dict, speed: dict) -> dict:
  """Expected seconds per run and in all: training tokens at the probe's training rate, every evaluation
  (after each task, of every task's test set; the initial one once per output folder) at its evaluation
  rate, plus one compilation per run."""
  train_rate, eval_rate = speed["train_tokens_per_s"], speed["eval_tokens_per_s"]
  n_tasks = len(counts["train_tokens"])
  modes = 1 + len(cfg.also_eval)
  train_s = sum(counts["train_tokens"].values()) / train_rate
  eval_s = modes * n_tasks * sum(counts["test_tokens"].values()) / eval_rate
  per_run = train_s + eval_s + speed["compile_s"]
  runs = len(cfg.methods) * len(cfg.seeds)
  initial = modes * sum(counts["test_tokens"].values()) / eval_rate
  return {"train_s": train_s, "eval_s": eval_s, "compile_s": speed["compile_s"], "per_run_s": per_run,
          "runs": runs, "initial_eval_s": initial, "total_s": runs * per_run + initial}


def _hours(seconds: float) -> str:
  return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="smollm2-135m", help="preset, a Llama/T5 folder, or a hub id")
  parser.add_argument("--data-dir", default=None, help="the CL_Benchmark folder (default: ../shared's)")
  parser.add_argument("--order", default="1", help="a standard order 1..6 or task names")
  parser.add_argument("--methods", default="seqft,migu")
  parser.add_argument("--seeds", default=None, help="default 0,1,2")
  parser.add_argument("--weight-decay", type=float, default=0.0, help="0 as the reference code; 0.01 as the table")
  parser.add_argument("--also-options", action="store_true", help="also score by option likelihood")
  parser.add_argument("--mesh", action="store_true", help="train on a mesh of every device (data parallel)")
  parser.add_argument("--output", default="runs/paper_scale")
  parser.add_argument("--probe-per-class", type=int, default=32)
  parser.add_argument("--estimate", action="store_true", help="print the expected wall time and stop")
  parser.add_argument("--tiny", action="store_true", help="a dry run at a tiny size (tests)")
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)

  cfg = paper_config(args)
  counts = token_counts(cfg)
  speed = probe(cfg, 2 if args.tiny else args.probe_per_class)
  plan = estimate(cfg, counts, speed)
  out = Path(cfg.output_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / "estimate.json").write_text(json.dumps({"counts": counts, "probe": speed, "estimate": plan}, indent=2))
  print(f"paper_scale: {cfg.model}, order {cfg.order}, {plan['runs']} runs ({', '.join(cfg.methods)} x seeds "
        f"{list(cfg.seeds)}), {sum(counts['steps'].values())} steps of {cfg.batch_size} per run")
  print(f"  probe: train {speed['train_tokens_per_s']:.0f} tok/s, eval {speed['eval_tokens_per_s']:.0f} tok/s, "
        f"compile {speed['compile_s']:.0f} s")
  print(f"  expected: {_hours(plan['per_run_s'])} per run (train {_hours(plan['train_s'])}, eval "
        f"{_hours(plan['eval_s'])}), {_hours(plan['total_s'])} in all; written to {out / 'estimate.json'}")
  if args.estimate:
    return 0
  start = time.perf_counter()
  results = runner.run_experiment(cfg)
  print(f"paper_scale: done in {_hours(time.perf_counter() - start)} (expected {_hours(plan['total_s'])}); "
        f"results in {out}")
  for method, row in results["comparison"].items():
    print(f"  {method}: AA {100 * row['average_accuracy']:.1f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
