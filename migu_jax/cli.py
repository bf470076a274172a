"""The ``migu-jax`` command: run continual-learning experiments, evaluate checkpoints, report results.

Examples::

    migu-jax run --config experiments/configs/order1_minilm.py          # the CPU main job
    migu-jax run --config experiments/configs/order1_minilm.py --methods seqft,migu,replay --seeds 0,1
    migu-jax run --model minilm --order dbpedia,agnews --methods migu --ratio 0.8 --output runs/try
    migu-jax run --config experiments/configs/order1_minilm.py --mode mesh   # every device (TPU pods: experiments/tpu/)
    migu-jax eval runs/order1_minilm/migu/seed_0 --tasks yelp,sst-2 --max-test 100
    migu-jax report runs/order1_minilm runs/order2_minilm

A run started again with the same command resumes from its last checkpoint (an interrupted run reports
nothing until it is complete). SIGTERM or Ctrl-C stops a run after the current step with a checkpoint there
(exit code 143 or 130); a second process on the same output folder is refused (exit code 2). Flags override the values of ``--config``; ``--set key=value`` sets any
other field of :class:`migu_jax.cl.runner.Config`.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import sys
import time
import warnings
from pathlib import Path

# flag -> Config field (flags whose value is used as given, or parsed as a comma list / number).
_FLAGS = {
    "model": "model", "objective": "objective", "general": "general", "head": "head", "eval_mode": "eval_mode", "data_dir": "data_dir", "order": "order",
    "methods": "methods", "seeds": "seeds", "ratio": "ratio", "lr": "learning_rate",
    "batch_size": "batch_size", "micro_batches": "micro_batches", "train_per_class": "train_per_class",
    "max_test": "max_test", "epochs": "epochs", "max_length": "max_length", "output": "output_dir",
    "checkpoint_every": "checkpoint_every", "mode": "mode", "mesh_shape": "mesh_shape",
    "sharding": "sharding", "dtype": "dtype", "param_dtype": "param_dtype", "remat": "remat",
    "scan_layers": "scan_layers",
}


def load_config_module(path: str):
  """A Python config file as a module. Its folder is importable while it loads, so config files can share
  settings through a sibling module (``from cpu_scale import cpu_scale``)."""
  file = Path(path)
  if not file.is_file():
    raise SystemExit(f"migu-jax: config file {path!r} does not exist (e.g. experiments/configs/order1_minilm.py).")
  spec = importlib.util.spec_from_file_location(f"migu_config_{file.stem}", file)
  module = importlib.util.module_from_spec(spec)
  sys.path.insert(0, str(file.resolve().parent))
  try:
    spec.loader.exec_module(module)
  finally:
    sys.path.remove(str(file.resolve().parent))
  return module


def split_config_arg(arg: str) -> tuple[str, str | None]:
  """``"file.py:variant"`` -> ``("file.py", "variant")``; ``"file.py"`` -> ``("file.py", None)``."""
  path, sep, variant = arg.rpartition(":")
  if sep and path.endswith(".py") and variant and "/" not in variant and "\\" not in variant:
    return path, variant
  return arg, None


def load_config_file(arg: str) -> dict:
  """The settings of ``--config``, as a dict (big_vision style).

  ``file.py`` is its ``get_config()``; ``file.py:variant`` is ``get_configs()[variant]``, one named variant
  of a file that defines several (its docstring names them and the command of each).
  """
  path, variant = split_config_arg(arg)
  module = load_config_module(path)
  if variant is None:
    if not hasattr(module, "get_config"):
      raise SystemExit(f"migu-jax: {path} has no get_config() function returning the settings.")
    config = module.get_config()
  else:
    variants = module.get_configs() if hasattr(module, "get_configs") else {}
    if variant not in variants:
      raise SystemExit(f"migu-jax: {path} has no variant {variant!r} in get_configs(); choose one of "
                       f"{sorted(variants)} (--config {path}:NAME).")
    config = variants[variant]
  return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def _parse_value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def build_config(args):
  """The run's :class:`~migu_jax.cl.runner.Config`: config file, then flags, then ``--set``."""
  from migu_jax.cl.runner import Config

  values = load_config_file(args.config) if args.config else {}
  for flag, field in _FLAGS.items():
    value = getattr(args, flag, None)
    if value is not None:
      values[field] = value
  if args.tasks is not None:
    values["order"] = args.tasks
  for item in args.set or ():
    if "=" not in item:
      raise SystemExit(f"migu-jax: --set {item!r} must look like key=value (e.g. --set lora_rank=16).")
    key, value = item.split("=", 1)
    values[key.strip()] = _parse_value(value)
  if args.no_progress:
    values["progress"] = False
  return Config.from_dict(values)


def cmd_run(args) -> int:
  from migu_jax.cl import report, runner

  cfg = build_config(args)
  start = time.perf_counter()
  results = runner.run_experiment(cfg, plots=not args.no_plots)
  if not runner.is_writer():  # process 0 prints (and writes) for all
    return 0
  print(f"\nResults in {cfg.output_dir} (results.json, results.md, plots/); wall time "
        f"{time.perf_counter() - start:.0f} s.\n")
  print(report.comparison_table(results["comparison"]))
  for method, row in results["comparison"].items():
    if "average_perplexity" in row:
      bwt, general = row["perplexity_increase"], row.get("general_perplexity")
      print(f"{method}: PPL {row['average_perplexity']:.2f}  BWT (PPL increase) "
            + ("-" if bwt is None else f"{bwt:+.2f}") + ("" if general is None else f"  general PPL {general:.2f}"))
      continue
    bwt = row["backward_transfer"]
    print(f"{method}: AA {100 * row['average_accuracy']:.1f}  BWT " + ("-" if bwt is None else f"{100 * bwt:.1f}"))
  return 0


def _run_dirs(folder: Path) -> list[Path]:
  if (folder / "config.json").is_file():
    return [folder]
  found = sorted(p.parent for p in folder.glob("*/seed_*/config.json"))
  if not found:
    raise SystemExit(f"migu-jax eval: {folder} is neither a run folder (<output>/<method>/seed_<s>, with "
                     "config.json) nor an experiment folder holding such run folders.")
  return found


def cmd_eval(args) -> int:
  from migu_jax.cl import runner

  if args.end_tasks:
    return _eval_end_tasks(args)
  rows = []
  for run_dir in _run_dirs(Path(args.folder)):
    result = runner.evaluate_checkpoint(run_dir, order=args.tasks, max_test=args.max_test,
                                        data_dir=args.data_dir, eval_mode=args.eval_mode,
                                        progress=not args.no_progress)
    rows.append(result)
    out = run_dir / "eval.json"
    out.write_text(json.dumps(result, indent=2))
  tasks = rows[0]["tasks"]
  print("| run | checkpoint | " + " | ".join(tasks) + " | mean |")
  print("|---|---|" + "---:|" * (len(tasks) + 1))
  for r in rows:
    accs = r["accuracies"]
    scale = 1 if r.get("metric") == "perplexity" else 100
    print(f"| {r['method']} seed {r['seed']} | task {r['checkpoint']['task']} step {r['checkpoint']['step']} | "
          + " | ".join(f"{scale * a:.{2 if scale == 1 else 1}f}" for a in accs)
          + f" | {scale * sum(accs) / len(accs):.{2 if scale == 1 else 1}f} |")
  heldout = rows[0]["heldout_tasks"]
  print(f"\n(eval mode: {rows[0]['eval_mode']}"
        + (f"; held out of train.json, no test file: {', '.join(heldout)}" if heldout else "")
        + "; written to eval.json in each run folder)")
  return 0


def _eval_end_tasks(args) -> int:
  """``migu-jax eval --end-tasks``: the DAS end tasks again on each run's newest checkpoint."""
  from migu_jax.cl import runner

  settings = {k: v for k, v in (("end_task_train_per_class", args.end_task_train_per_class),
                                ("end_task_epochs", args.end_task_epochs), ("end_task_lr", args.end_task_lr),
                                ("end_task_max_test", args.max_test)) if v is not None}
  print("| run | checkpoint | end task | accuracy | macro-F1 |\n|---|---|---|---:|---:|")
  for run_dir in _run_dirs(Path(args.folder)):
    if args.tasks:
      run_cfg = json.loads((run_dir / "config.json").read_text())
      wanted = args.tasks.split(",")
      missing = sorted(set(wanted) - set(run_cfg.get("end_tasks") or {}))
      if missing:
        raise SystemExit(f"migu-jax eval --end-tasks: {run_dir} has no end task for {missing}; its domains with "
                         f"end tasks: {sorted(run_cfg.get('end_tasks') or {})}.")
      settings["end_tasks"] = {d: run_cfg["end_tasks"][d] for d in wanted}
    result = runner.end_tasks_checkpoint(run_dir, progress=not args.no_progress, **settings)
    (run_dir / "end_tasks.json").write_text(json.dumps(result, indent=2))
    for domain, r in result["end_tasks"].items():
      print(f"| {result['method']} seed {result['seed']} | task {result['checkpoint']['task']} step "
            f"{result['checkpoint']['step']} | {r['task']} ({domain}) | {100 * r['accuracy']:.1f} | "
            f"{100 * r['macro_f1']:.1f} |")
  print("\n(written to end_tasks.json in each run folder)")
  return 0


def cmd_report(args) -> int:
  from migu_jax.cl import plots, report

  texts, combined = [], {}
  for folder in args.folders:
    results = report.load_results(folder)
    combined.update({f"{Path(folder).name}: {m}": row for m, row in results["comparison"].items()})
    out = Path(args.out) / Path(folder).name if args.out else None
    written = plots.plot_experiment(folder, results, out=out)
    if args.out:
      out.mkdir(parents=True, exist_ok=True)
      (out / "results.md").write_text(report.markdown(results))
    texts.append(f"## {folder}\n\n" + report.comparison_table(results["comparison"]) + "\n\n"
                 + "\n".join(f"- {p}" for p in written))
  if len(args.folders) > 1:
    texts.insert(0, "## All folders\n\n" + report.comparison_table(combined))
  text = "\n\n".join(texts)
  print(text)
  if args.out:
    Path(args.out, "report.md").write_text(text + "\n")
  return 0


def cmd_plan(args) -> int:
  """``python -m migu_jax.plan`` in a fresh process: its virtual CPU devices must be set before JAX starts."""
  import subprocess

  argv = [f"--{k.replace('_', '-')}" if v is True else f"--{k.replace('_', '-')}={v}"
          for k, v in vars(args).items() if k not in ("command", "func") and v not in (None, False)]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "migu_jax.plan", *argv], env=env).returncode


def _method_names() -> list[str]:
  from migu_jax.cl.methods import METHODS

  return list(METHODS)


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="migu-jax", description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="command", required=True)

  run = sub.add_parser("run", help="train methods on a task sequence, evaluate after every task, report")
  run.add_argument("--config", help="a Python file whose get_config() returns the settings, or FILE.py:VARIANT "
                   "for get_configs()[VARIANT]")
  run.add_argument("--model", help="preset (minilm, smollm2-135m), local Hugging Face folder, or hub id")
  run.add_argument("--objective", choices=("task", "lm"), help="task: labeled tasks (default); lm: text domains "
                   "(group/domain folders of train.txt/test.txt) with the model's own objective, perplexity matrix")
  run.add_argument("--general", help="objective lm: a folder with test.txt, a general held-out corpus whose "
                   "perplexity is measured after every stage")
  run.add_argument("--head", help="encoder, causal_lm or seq2seq (default: by model family)")
  run.add_argument("--eval-mode", help="language models: options (log-likelihood) or generate (exact match)")
  run.add_argument("--data-dir", help="benchmark folder (default: $MIGU_DATA_DIR, else ../shared/data/CL_Benchmark)")
  order = run.add_mutually_exclusive_group()
  order.add_argument("--order", help="built-in order 1-6 or comma-separated tasks")
  order.add_argument("--tasks", help="comma-separated task list (same as --order with names)")
  run.add_argument("--methods", help="comma-separated, run side by side: " + ",".join(_method_names()))
  run.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2")
  run.add_argument("--ratio", "-T", type=float, help="MIGU's T: fraction of output features frozen per layer")
  run.add_argument("--lr", type=float, help="learning rate (AdamW, constant)")
  run.add_argument("--batch-size", type=int)
  run.add_argument("--micro-batches", type=int, help="gradient accumulation steps per batch")
  run.add_argument("--train-per-class", type=int, help="training records per label")
  run.add_argument("--max-test", type=int, help="test records per task (stratified)")
  run.add_argument("--epochs", type=int)
  run.add_argument("--max-length", type=int)
  run.add_argument("--checkpoint-every", type=int, help="save every N steps (and after every task)")
  run.add_argument("--output", help="output folder")
  run.add_argument("--mode", choices=("jit", "mesh"), help="train step: jit (one device, default) or mesh (every "
                                                          "device of every process, e.g. a TPU pod slice)")
  run.add_argument("--mesh-shape", help="mesh mode: data[,model] devices, one may be -1 (default: all on data)")
  run.add_argument("--sharding", choices=("replicated", "fsdp"), help="mesh mode: the state replicated, or split "
                   "by the model family's rules (fsdp: embed over data, mlp/heads/vocab over model)")
  run.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (default float32)")
  run.add_argument("--param-dtype", choices=("float32", "bfloat16"), help="parameter and optimizer-state dtype "
                   "(default float32, also under bfloat16 compute)")
  run.add_argument("--remat", action="store_true", default=None, help="recompute layers in the backward pass")
  run.add_argument("--scan-layers", action="store_true", default=None, help="Llama: run the decoder layers as "
                   "one nn.scan (one compiled layer, a MIGU threshold per layer)")
  run.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other Config field")
  run.add_argument("--no-progress", action="store_true", help="no progress bars")
  run.add_argument("--no-plots", action="store_true")
  run.set_defaults(func=cmd_run)

  ev = sub.add_parser("eval", help="evaluate the newest checkpoint of run folders on tasks")
  ev.add_argument("folder", help="a run folder (<output>/<method>/seed_<s>) or an experiment folder")
  ev.add_argument("--tasks", help="comma-separated tasks or an order (default: the run's)")
  ev.add_argument("--max-test", type=int)
  ev.add_argument("--data-dir")
  ev.add_argument("--eval-mode")
  ev.add_argument("--end-tasks", action="store_true",
                  help="continual pre-training runs: fine-tune the newest checkpoint on the end tasks again "
                       "(--tasks: only these domains' end tasks)")
  ev.add_argument("--end-task-train-per-class", type=int)
  ev.add_argument("--end-task-epochs", type=int)
  ev.add_argument("--end-task-lr", type=float)
  ev.add_argument("--no-progress", action="store_true")
  ev.set_defaults(func=cmd_eval)

  from migu_jax import plan

  pl = plan.add_arguments(sub.add_parser("plan", help="will a MIGU train step fit a slice? compile it for N "
                                          "(virtual) devices from shapes and print per-device memory"))
  pl.set_defaults(func=cmd_plan)

  rep = sub.add_parser("report", help="tables and plots from finished experiment folders")
  rep.add_argument("folders", nargs="+")
  rep.add_argument("--out", help="write plots and report.md here (default: plots/ inside each folder)")
  rep.set_defaults(func=cmd_report)
  return p


def _show_warning(message, category, filename, lineno, file=None, line=None):
  """Fault warnings (a damaged checkpoint skipped, a stale lock taken over) as one line each."""
  from migu_jax.cl.faults import FaultWarning

  if issubclass(category, FaultWarning):
    print(f"migu-jax: warning: {message}", file=sys.stderr if file is None else file, flush=True)
  else:
    _default_show_warning(message, category, filename, lineno, file, line)


_default_show_warning = warnings.showwarning


def quiet_after_error() -> None:
  """Nothing more after an error message: orbax's background threads and asyncio loops, cut short by the
  error, would otherwise log tracebacks while the interpreter shuts down ("Event loop is closed", "cannot
  schedule new futures after interpreter shutdown"); the message already holds the cause."""
  import logging

  logging.getLogger("absl").setLevel(logging.CRITICAL)
  default = sys.unraisablehook

  def hook(unraisable):
    text = str(unraisable.exc_value)
    if not (isinstance(unraisable.exc_value, RuntimeError) and ("Event loop is closed" in text
                                                                or "cannot schedule new futures" in text)):
      default(unraisable)

  sys.unraisablehook = hook


def main(argv=None) -> int:
  """Runs a command; errors end as one message on stderr (exit code 2; a stop signal: 128 + its number)."""
  args = parser().parse_args(argv)
  from migu_jax.cl.checkpoint import CheckpointSaveError
  from migu_jax.cl.data import DataError
  from migu_jax.cl.faults import OutputLocked, Preempted
  with warnings.catch_warnings():
    warnings.showwarning = _show_warning
    try:
      return args.func(args)
    except Preempted as e:
      print(f"migu-jax {args.command}: {e}", file=sys.stderr, flush=True)
      quiet_after_error()
      return e.exit_code
    except (DataError, ValueError, FileNotFoundError, OutputLocked, CheckpointSaveError) as e:
      print(f"migu-jax {args.command}: error: {e}", file=sys.stderr, flush=True)
      quiet_after_error()
      return 2


if __name__ == "__main__":
  sys.exit(main())
