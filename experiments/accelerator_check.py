"""Accelerator check: MIGU's cost, JAX against PyTorch, and a short continual-learning run on one GPU.

Prints, in about 8 minutes on one GPU (e.g. an H200):

1. the MIGU / plain AdamW train-step ratio for SmolLM2-135M (random weights) at 64 x 256 tokens,
   bfloat16 activations and float32 statistics, the two steps interleaved in one process, with
   XLA's peak memory of each;
2. the JAX / PyTorch train-step ratio on the same device (``experiments/bench_models.py``; skipped
   when torch is not installed or at ``--tiny`` size);
3. a short standard order-1 run of SmolLM2 with MIGU at the paper's settings
   (``experiments/configs/standard_smollm2.py``, fewer records: ``--train-per-class``, ``--max-test``)
   with its wall time and the runner's own tokens/s and compile time.

Command (on the GPU machine, from the repository root)::

    python experiments/accelerator_check.py

On CPU at a tiny size (the test, tests/test_accelerator_check.py)::

    python experiments/accelerator_check.py --tiny --model <tiny llama folder> --data-dir <data>
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE / "configs")]

import migu_jax as migu  # noqa: E402
from migu_jax.models import llama  # noqa: E402


def migu_ratio(cfg: llama.Config, batch: int, seq: int, repeats: int) -> dict:
  """MIGU / plain step time (median of ``repeats`` interleaved steps) and peak memory, random weights."""
  from bench_step import compiled_costs

  model = llama.LlamaForCausalLM(cfg)
  params = llama.params.init_params(cfg)
  rng = np.random.default_rng(0)
  data = {"ids": rng.integers(3, cfg.vocab_size, (batch, seq)).astype(np.int32),
          "mask": np.ones((batch, seq), np.int32)}

  def xent(logits, ids, mask):
    lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
    lp = jnp.take_along_axis(lp, ids[:, 1:, None], -1)[..., 0]
    return -(lp * mask[:, 1:]).sum() / mask[:, 1:].sum()

  def plain_loss(p, b):
    return xent(model.apply({"params": p}, b["ids"], b["mask"]), b["ids"], b["mask"]), {}

  def migu_loss(p, b):
    logits, mags = migu.apply_with_magnitudes(model, {"params": p}, b["ids"], b["mask"])
    return xent(logits, b["ids"], b["mask"]), mags

  adamw = optax.adamw(5e-5)
  variants = {"plain": (plain_loss, adamw), "migu": (migu_loss, optax.chain(migu.mask_by_magnitude(0.7), adamw))}
  data = jax.device_put(data)
  states, times, costs = {}, {v: [] for v in variants}, {}
  for name, (loss_fn, tx) in variants.items():
    step = migu.make_train_step(loss_fn, tx)
    p, s = step.place_state(params), step.place_state(tx.init(params))
    costs[name] = compiled_costs(step, p, s, data)
    start = time.perf_counter()
    p, s, loss = step(p, s, data)
    jax.block_until_ready(loss)
    costs[name]["compile_s"] = time.perf_counter() - start
    states[name] = (step, p, s)
  for _ in range(repeats + 1):  # the first round warms up
    for name in variants:
      step, p, s = states[name]
      start = time.perf_counter()
      p, s, loss = step(p, s, data)
      jax.block_until_ready((p, loss))
      times[name].append(time.perf_counter() - start)
      states[name] = (step, p, s)
  plain, mig = (statistics.median(times[v][1:]) for v in ("plain", "migu"))
  return {"plain_s": plain, "migu_s": mig, "ratio": mig / plain,
          "peak_ratio": costs["migu"]["peak"] / costs["plain"]["peak"],
          "plain_peak_mib": costs["plain"]["peak"] / 2**20, "migu_peak_mib": costs["migu"]["peak"] / 2**20,
          "compile_s": {v: c["compile_s"] for v, c in costs.items()}}


def torch_ratio(batch: int, seq: int, repeats: int) -> dict | None:
  """JAX / PyTorch train step for SmolLM2 (random weights) on the GPU, or None without torch/GPU."""
  try:
    import torch
  except ImportError:
    return None
  if not torch.cuda.is_available():
    return None
  import bench_models
  return bench_models.bench("smollm2", batch, seq, repeats, 1, device="cuda", random_init=True)


def cl_run(args, output_dir: str) -> dict:
  """A short order-1 MIGU run at the paper's settings; its result and wall time."""
  from migu_jax.cl import runner
  import standard_smollm2

  cfg = standard_smollm2.get_configs("1")["full"].replace(
      methods=("migu",), seeds=(0,), train_per_class=args.train_per_class, max_test=args.max_test,
      output_dir=output_dir, magnitude_batches=0, progress=False)
  changes = {k: v for k, v in dict(model=args.model, data_dir=args.data_dir).items() if v}
  if args.tiny:
    changes.update(order="dbpedia,amazon", max_length=32, length_buckets=(32,), batch_size=4, eval_batch_size=8)
  cfg = cfg.replace(**changes)
  start = time.perf_counter()
  result = runner.run_sequence(cfg, "migu", 0)
  return {"wall_s": time.perf_counter() - start, "result": result}


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--tiny", action="store_true", help="tiny sizes for a CPU test")
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--repeats", type=int, default=8)
  ap.add_argument("--model", default=None, help="the CL run's model (default: the config's smollm2-135m)")
  ap.add_argument("--data-dir", default=None)
  ap.add_argument("--train-per-class", type=int, default=16)
  ap.add_argument("--max-test", type=int, default=100)
  args = ap.parse_args(argv)

  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"load average {os.getloadavg()[0]:.2f}", flush=True)
  if args.tiny:
    cfg = llama.Config.of_size("tiny", dtype=jnp.bfloat16)
    batch, seq, repeats = 2, 16, 2
    args.train_per_class, args.max_test = min(args.train_per_class, 2), min(args.max_test, 4)
  else:
    cfg = llama.Config.of_size("smollm2-135m", dtype=jnp.bfloat16)
    batch, seq, repeats = args.batch, args.seq, args.repeats
  out = {}
  r = out["migu"] = migu_ratio(cfg, batch, seq, repeats)
  print(f"1. MIGU / plain step, SmolLM2{' (tiny)' if args.tiny else '-135M'} {batch}x{seq}, bfloat16 "
        f"activations, float32 statistics: {r['ratio']:.3f} ({r['migu_s'] * 1e3:.1f} vs {r['plain_s'] * 1e3:.1f} ms, "
        f"median of {repeats}); peak memory {r['peak_ratio']:.3f} ({r['migu_peak_mib']:.0f} vs "
        f"{r['plain_peak_mib']:.0f} MiB); compile {r['compile_s']['migu']:.1f} / {r['compile_s']['plain']:.1f} s",
        flush=True)
  t = out["torch"] = None if args.tiny else torch_ratio(16, 256, 5)
  print("2. JAX / PyTorch step (SmolLM2-135M, 16x256, float32): " + (
      "skipped (tiny size, no torch or no GPU)" if t is None else
      f"{t['ratio']:.3f} ({t['ours_s'] * 1e3:.1f} vs {t['torch_s'] * 1e3:.1f} ms)"), flush=True)
  with tempfile.TemporaryDirectory() as folder:
    c = out["cl"] = cl_run(args, folder)
  res, speed = c["result"], c["result"]["speed"] or {}
  fmt = lambda x: "n/a" if x is None else f"{x:.0f}"
  print(f"3. order 1 ({', '.join(res['tasks'])}), MIGU, {args.train_per_class} records per label, "
        f"{args.max_test} test: wall {c['wall_s']:.1f} s, AA {100 * res['metrics']['average_accuracy']:.1f}; "
        f"train {fmt(speed.get('train_tokens_per_s'))} tok/s, eval {fmt(speed.get('eval_tokens_per_s'))} tok/s, "
        f"compile {speed.get('compile_s', 0.0):.1f} s", flush=True)
  return out


if __name__ == "__main__":
  main()
