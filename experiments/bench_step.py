"""Cost of MIGU in a train step: plain AdamW step against the MIGU step.

Four models, each at 16 x 128 tokens (or --batch x --seq) with random weights:

* ``bert``: a BERT encoder of MiniLM's size (6 layers, width 384, 12 heads)
  with a classification head, from ``migu_jax.models``;
* ``mlm``: the same encoder with the masked-LM head of continual pre-training
  (``BertForMaskedLM``, decoder tied to the 30,522-row word embedding), the
  loss on 15% of the positions; MIGU's statistics then include one value per
  vocabulary row (the tied decoder's output) and its mask covers the
  embedding's rows (the paper's Table 10 setting);
* ``stack``: a bare stack of 6 pre-LayerNorm blocks of width 384 built from
  plain ``nn.Dense`` layers (attention projections and a 4x MLP), the kind of
  model a user writes by hand;
* ``causal``: SmolLM2-135M's shapes (Llama, 30 layers, width 576, LM head tied
  to the 49,152-row embedding), the causal-LM loss at every position: the
  continual pre-training of a decoder (``--layers``/``--width`` do not apply;
  a step of 16 x 128 takes about 18 s here, so pass ``--batch 8``).

Both steps come from the same builder (``migu.make_train_step``); the MIGU step
adds the magnitude capture (sum |y| of every linear output) and
``mask_by_magnitude(0.7)`` in front of AdamW. The variants are timed
interleaved in one process (plain block, MIGU block, plain, ...), so both see
the same machine state; the load average before and after is printed, since a
loaded machine makes single runs vary. Peak memory, flops and bytes accessed
are XLA's own account of each compiled step (peak: arguments + outputs +
temporaries - aliased donations); they do not depend on machine load.

Run:
  .venv/bin/python experiments/bench_step.py            # ~9 minutes on 2 CPU cores (estimated: bert and stack ~5, mlm ~4)
  .venv/bin/python experiments/bench_step.py --models stack --repeats 4 --steps 2   # quicker
  .venv/bin/python experiments/bench_step.py --models causal --batch 8 --repeats 4 --steps 2   # ~8 minutes
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import migu_jax as migu
from migu_jax.models import bert, llama, mean_pool
from migu_jax.models.bert.mlm import BertForMaskedLM

MODELS = ("bert", "mlm", "stack", "causal")


class Classifier(nn.Module):
  config: bert.Config
  classes: int = 4

  @nn.compact
  def __call__(self, ids, mask):
    hidden = bert.BertModel(self.config, name="encoder")(ids, mask)
    return nn.Dense(self.classes, name="head")(mean_pool(hidden, mask))


class Block(nn.Module):
  """A pre-LayerNorm transformer block of plain ``nn.Dense`` layers."""

  width: int
  heads: int

  @nn.compact
  def __call__(self, x, mask):
    b, s, d = x.shape
    h = nn.LayerNorm()(x)
    q, k, v = (nn.Dense(d, name=n)(h).reshape(b, s, self.heads, d // self.heads) for n in "qkv")
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // self.heads)
    logits = jnp.where(mask[:, None, None, :] > 0, logits, -1e9)
    attn = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v).reshape(b, s, d)
    x = x + nn.Dense(d, name="o")(attn)
    h = nn.LayerNorm()(x)
    return x + nn.Dense(d, name="down")(nn.gelu(nn.Dense(4 * d, name="up")(h)))


class DenseStack(nn.Module):
  """Embedding, ``layers`` pre-LN blocks, final LayerNorm, mean pool, linear head."""

  vocab: int
  width: int
  layers: int
  classes: int = 4

  @nn.compact
  def __call__(self, ids, mask):
    x = nn.Embed(self.vocab, self.width)(ids)
    for i in range(self.layers):
      x = Block(self.width, self.width // 32, name=f"block_{i}")(x, mask)
    return nn.Dense(self.classes, name="head")(mean_pool(nn.LayerNorm()(x), mask))


def build(name: str, args):
  """``(params, batch, {variant: (train_step, tx)})`` for one model."""
  smollm2 = llama.Config.of_size("smollm2-135m")
  vocab = smollm2.vocab_size if name == "causal" else 30522
  config = bert.Config(
      vocab_size=vocab, hidden_size=args.width, num_hidden_layers=args.layers,
      num_attention_heads=args.width // 32, intermediate_size=4 * args.width,
  )
  if name == "bert":
    model = Classifier(config)
  elif name == "mlm":
    model = BertForMaskedLM(config)  # called as (input_ids, attention_mask) like the others
  elif name == "stack":
    model = DenseStack(vocab, args.width, args.layers)
  elif name == "causal":
    model = llama.LlamaForCausalLM(smollm2)
  else:
    raise ValueError(f"bench_step: unknown model {name!r}; expected one of {MODELS}.")
  rng = np.random.default_rng(0)
  shape = (args.batch, args.seq)
  # One weighted cross entropy for all: mlm predicts a token at 15% of the positions (weight 1, elsewhere 0),
  # causal one at every position; the classifiers predict one of 4 labels per row (weight 1).
  targets, classes = (shape, vocab) if name in ("mlm", "causal") else (shape[:1], 4)
  batch = {
      "ids": rng.integers(0, vocab, shape).astype(np.int32),
      "mask": np.ones(shape, np.int32),
      "label": rng.integers(0, classes, targets).astype(np.int32),
      "weight": (rng.random(targets) < 0.15 if name == "mlm" else np.ones(targets)).astype(np.float32),
  }
  if name == "causal":  # the next token of each position (the last one predicts nothing)
    batch["label"] = np.roll(batch["ids"], -1, axis=1)
    batch["weight"][:, -1] = 0.0
  params = model.init(jax.random.key(0), batch["ids"][:1], batch["mask"][:1])["params"]

  def xent(logits, batch):
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return (nll * batch["weight"]).sum() / batch["weight"].sum()

  def plain_loss(params, batch):
    return xent(model.apply({"params": params}, batch["ids"], batch["mask"]), batch), {}

  def migu_loss(params, batch):
    logits, mags = migu.apply_with_magnitudes(model, {"params": params}, batch["ids"], batch["mask"])
    return xent(logits, batch), mags

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


def bench(name: str, args) -> dict:
  """Times one model's two steps interleaved; returns the ratios."""
  params, batch, steps = build(name, args)
  states, times, costs = {}, {v: [] for v in steps}, {}
  batch = jax.device_put(batch)
  for variant, (step, tx) in steps.items():
    p, s = step.place_state(params), step.place_state(tx.init(params))
    costs[variant] = compiled_costs(step, p, s, batch)
    start = time.perf_counter()
    p, s, loss = step(p, s, batch)  # compile
    jax.block_until_ready(loss)
    costs[variant]["compile"] = time.perf_counter() - start
    p, s, loss = step(p, s, batch)  # warm-up
    jax.block_until_ready(loss)
    states[variant] = (p, s)
  for _ in range(args.repeats):
    for variant, (step, _) in steps.items():
      p, s = states[variant]
      start = time.perf_counter()
      for _ in range(args.steps):
        p, s, loss = step(p, s, batch)
      jax.block_until_ready((p, loss))
      times[variant].append((time.perf_counter() - start) / args.steps)
      states[variant] = (p, s)

  n_params = sum(x.size for x in jax.tree.leaves(params))
  shape = "SmolLM2-135M's shapes" if name == "causal" else f"{args.layers}x{args.width}"
  print(f"[{name}] model {shape}, {n_params / 1e6:.1f}M params, batch {args.batch}x{args.seq}")
  for variant in steps:
    t, c = statistics.median(times[variant]), costs[variant]
    print(f"  {variant:6s} step {t * 1e3:8.1f} ms (median of {args.repeats}x{args.steps}, "
          f"min {min(times[variant]) * 1e3:.1f}, first call {c['compile']:.1f} s)  "
          f"peak memory {c['peak'] / 2**20:8.1f} MiB  "
          f"XLA: {c['flops'] / 1e9:.2f} GFLOP, {c['bytes'] / 2**30:.3f} GiB accessed")
  m, p = costs["migu"], costs["plain"]
  ratios = {
      "time": statistics.median(times["migu"]) / statistics.median(times["plain"]),
      "best": min(times["migu"]) / min(times["plain"]),
      "peak": m["peak"] / p["peak"], "flops": m["flops"] / p["flops"], "bytes": m["bytes"] / p["bytes"],
  }
  print(f"  MIGU / plain: time {ratios['time']:.3f} (median), {ratios['best']:.3f} (best)   "
        f"peak memory {ratios['peak']:.3f}   flops {ratios['flops']:.3f}   bytes accessed {ratios['bytes']:.3f}")
  return ratios


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
  parser.add_argument("--layers", type=int, default=6)
  parser.add_argument("--width", type=int, default=384)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--steps", type=int, default=5, help="steps per timed block")
  parser.add_argument("--repeats", type=int, default=8, help="interleaved blocks per variant")
  args = parser.parse_args()

  load = os.getloadavg()
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {len(jax.devices())} device(s), "
        f"{os.cpu_count()} CPU(s); load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
  ratios = {name: bench(name, args) for name in args.models}
  load = os.getloadavg()
  print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
  print("MIGU / plain (median time): " + ", ".join(f"{n} {r['time']:.3f}" for n, r in ratios.items()))
  return ratios


if __name__ == "__main__":
  main()
