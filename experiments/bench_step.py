"""Cost of MIGU in a train step: plain AdamW step against the MIGU step.

Same model (a BERT encoder of MiniLM's size: 6 layers, width 384, 12 heads,
random weights), same batch (16 x 128 tokens), same compiled train-step
builder; the MIGU step adds the magnitude capture (sum |y| of every linear
output) and the mask transformation in front of AdamW. Timed interleaved in
one run, so both see the same machine state. Peak memory, flops and bytes
accessed are XLA's own account of each compiled step (peak: arguments +
outputs + temporaries - aliased donations); they do not depend on machine load.

Run:
  .venv/bin/python experiments/bench_step.py            # ~3 minutes on 2 CPU cores
  .venv/bin/python experiments/bench_step.py --repeats 3 --steps 5   # quicker
"""

from __future__ import annotations

import argparse
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import migu_jax as migu
from migu_jax.models import bert, mean_pool


class Classifier(nn.Module):
  config: bert.Config
  classes: int = 4

  @nn.compact
  def __call__(self, ids, mask):
    hidden = bert.BertModel(self.config, name="encoder")(ids, mask)
    return nn.Dense(self.classes, name="head")(mean_pool(hidden, mask))


def build(args):
  config = bert.Config(
      vocab_size=30522, hidden_size=args.width, num_hidden_layers=args.layers,
      num_attention_heads=args.width // 32, intermediate_size=4 * args.width,
  )
  model = Classifier(config)
  rng = np.random.default_rng(0)
  batch = {
      "ids": rng.integers(0, config.vocab_size, (args.batch, args.seq)).astype(np.int32),
      "mask": np.ones((args.batch, args.seq), np.int32),
      "label": rng.integers(0, 4, (args.batch,)).astype(np.int32),
  }
  params = model.init(jax.random.key(0), batch["ids"][:1], batch["mask"][:1])["params"]

  def xent(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  def plain_loss(params, batch):
    return xent(model.apply({"params": params}, batch["ids"], batch["mask"]), batch["label"]), {}

  def migu_loss(params, batch):
    logits, mags = migu.apply_with_magnitudes(model, {"params": params}, batch["ids"], batch["mask"])
    return xent(logits, batch["label"]), mags

  adamw = optax.adamw(1e-4)
  migu_tx = optax.chain(migu.mask_by_magnitude(0.7), adamw)
  steps = {
      "plain": (migu.make_train_step(plain_loss, adamw), adamw),
      "migu": (migu.make_train_step(migu_loss, migu_tx), migu_tx),
  }
  return params, batch, steps


def compiled_costs(step, params, opt_state, batch) -> dict:
  """XLA's own account of the compiled step: peak bytes, flops, bytes accessed."""
  compiled = step.compiled.lower(params, opt_state, batch).compile()
  m = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {
      "peak": m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes,
      "flops": cost.get("flops", float("nan")),
      "bytes": cost.get("bytes accessed", float("nan")),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", type=int, default=6)
  parser.add_argument("--width", type=int, default=384)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--steps", type=int, default=10, help="steps per timed block")
  parser.add_argument("--repeats", type=int, default=5, help="interleaved blocks per variant")
  args = parser.parse_args()

  params, batch, steps = build(args)
  states, times, memory = {}, {name: [] for name in steps}, {}
  batch = jax.device_put(batch)
  for name, (step, tx) in steps.items():
    p, s = step.place_state(params), step.place_state(tx.init(params))
    memory[name] = compiled_costs(step, p, s, batch)
    p, s, loss = step(p, s, batch)  # compile
    jax.block_until_ready(loss)
    states[name] = (p, s)
  for _ in range(args.repeats):
    for name, (step, _) in steps.items():
      p, s = states[name]
      start = time.perf_counter()
      for _ in range(args.steps):
        p, s, loss = step(p, s, batch)
      jax.block_until_ready((p, loss))
      times[name].append((time.perf_counter() - start) / args.steps)
      states[name] = (p, s)

  n_params = sum(x.size for x in jax.tree.leaves(params))
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {len(jax.devices())} device(s); "
        f"model {args.layers}x{args.width}, {n_params / 1e6:.1f}M params, batch {args.batch}x{args.seq}")
  for name in steps:
    t = statistics.median(times[name])
    c = memory[name]
    print(f"{name:6s} step {t * 1e3:8.1f} ms (median of {args.repeats}x{args.steps}, "
          f"min {min(times[name]) * 1e3:.1f})  peak memory {c['peak'] / 2**20:8.1f} MiB  "
          f"XLA: {c['flops'] / 1e9:.1f} GFLOP, {c['bytes'] / 2**30:.2f} GiB accessed")
  ratio = statistics.median(times["migu"]) / statistics.median(times["plain"])
  best = min(times["migu"]) / min(times["plain"])
  m, p = memory["migu"], memory["plain"]
  print(f"MIGU / plain: time {ratio:.3f} (median), {best:.3f} (best)   peak memory {m['peak'] / p['peak']:.3f}   "
        f"flops {m['flops'] / p['flops']:.3f}   bytes accessed {m['bytes'] / p['bytes']:.3f}")


if __name__ == "__main__":
  main()
