"""Train-step time of our Flax models vs the same models in PyTorch transformers.

One train step = forward, backward and an AdamW update (optax.adamw, jitted,
parameters donated / torch.optim.AdamW), float32, on the same CPU in the same
process. Steps of the two frameworks alternate (ours, torch, ours, torch, ...)
so that machine noise hits both alike; medians are reported. The load
average is printed: on a shared machine, other processes slow both, and
PyTorch's OpenMP threads usually more.

Losses (identical in both frameworks):
  * minilm: mean squared mean-pooled sentence embedding (an encoder-only loss);
  * smollm2: next-token cross-entropy of the causal LM.

Run (the figures in experiments/bench_models.md):
  python experiments/bench_models.py --models minilm smollm2 --batch 16 --seq 128

Smaller, e.g. for a quick check:
  python experiments/bench_models.py --models smollm2 --batch 2 --seq 64 --repeats 3

Random weights of the presets' shapes (no preset packages needed):
  python experiments/bench_models.py --random-init

On a GPU (both frameworks on the device; float32 matmuls in full precision,
or TF32 in both); not run yet, so unverified:
  python experiments/bench_models.py --device cuda --random-init --matmul-precision highest
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

from migu_jax.models import from_pretrained, mean_pool, save_pretrained

LR = 1e-5


def _batch(vocab: int, batch: int, seq: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, vocab, size=(batch, seq)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[: batch // 2, seq - seq // 4:] = 0   # half the rows padded by a quarter
  return ids, mask


def _jax_step(model, kind):
  tx = optax.adamw(LR)

  def loss_fn(params, ids, mask):
    out = model.apply({"params": params}, ids, mask)
    if kind == "minilm":
      return jnp.mean(mean_pool(out, mask) ** 2)
    logits = out[:, :-1].astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:])
    weights = mask[:, 1:].astype(jnp.float32)
    return (nll * weights).sum() / weights.sum()

  def step(params, opt_state, ids, mask):
    loss, grads = jax.value_and_grad(loss_fn)(params, ids, mask)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return tx, jax.jit(step, donate_argnums=(0, 1))


def _load(kind, random_init):
  if not random_init:
    return from_pretrained("minilm" if kind == "minilm" else "smollm2-135m")[:2]
  from migu_jax.models import bert, llama
  if kind == "minilm":
    cfg = bert.Config.of_size("minilm-l6")
    return bert.BertModel(cfg), bert.params.init_params(cfg)
  cfg = llama.Config.of_size("smollm2-135m")
  params = llama.params.init_params(cfg)
  # Flax's Embed init has std 1; HF's 0.02 keeps the tied logits (and loss) sane.
  params["embed"]["embedding"] = params["embed"]["embedding"] * 0.02
  return llama.LlamaForCausalLM(cfg), params


def _torch_model(kind, model, params, folder):
  import transformers
  save_pretrained(model, params, folder)
  if kind == "minilm":
    return transformers.AutoModel.from_pretrained(folder)
  return transformers.LlamaForCausalLM.from_pretrained(folder)


def _torch_loss(kind, tmodel, ids, mask):
  if kind == "minilm":
    h = tmodel(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask[..., None].float()
    return (((h * m).sum(1) / m.sum(1)) ** 2).mean()
  logits = tmodel(input_ids=ids, attention_mask=mask).logits[:, :-1]
  nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                          ids[:, 1:].reshape(-1), reduction="none")
  w = mask[:, 1:].reshape(-1).float()
  return (nll * w).sum() / w.sum()


def bench(kind: str, batch: int, seq: int, repeats: int, warmup: int, device: str = "cpu",
          random_init: bool = False) -> dict:
  model, params = _load(kind, random_init)
  ids, mask = _batch(model.config.vocab_size, batch, seq)
  with tempfile.TemporaryDirectory() as folder:
    tmodel = _torch_model(kind, model, params, folder).to(device)
  tmodel.train()
  # Dropout off in both (our models are deterministic).
  for m in tmodel.modules():
    if isinstance(m, torch.nn.Dropout):
      m.p = 0.0
  topt = torch.optim.AdamW(tmodel.parameters(), lr=LR)
  tids = torch.tensor(ids, dtype=torch.long, device=device)
  tmask = torch.tensor(mask, device=device)
  sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

  tx, step = _jax_step(model, kind)
  opt_state = tx.init(params)
  jids, jmask = jnp.asarray(ids), jnp.asarray(mask)

  def ours():
    nonlocal params, opt_state
    t = time.perf_counter()
    params, opt_state, loss = step(params, opt_state, jids, jmask)
    loss.block_until_ready()
    return time.perf_counter() - t, float(loss)

  def theirs():
    t = time.perf_counter()
    topt.zero_grad(set_to_none=True)
    loss = _torch_loss(kind, tmodel, tids, tmask)
    loss.backward()
    topt.step()
    sync()
    return time.perf_counter() - t, float(loss.detach())

  t0 = time.perf_counter()
  first_loss = ours()[1]                      # compiles
  compile_s = time.perf_counter() - t0
  torch_first = theirs()[1]
  for _ in range(warmup):
    ours(), theirs()
  times_ours, times_torch = [], []
  for _ in range(repeats):
    times_ours.append(ours()[0])
    times_torch.append(theirs()[0])
  o, p = statistics.median(times_ours), statistics.median(times_torch)
  tokens = batch * seq
  return dict(model=kind, batch=batch, seq=seq, ours_s=o, torch_s=p, ratio=o / p,
              ours_tok_s=tokens / o, torch_tok_s=tokens / p, compile_s=compile_s,
              first_loss_ours=first_loss, first_loss_torch=torch_first,
              ours_all=times_ours, torch_all=times_torch)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--models", nargs="+", default=["minilm", "smollm2"], choices=["minilm", "smollm2"])
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--smollm2-batch", type=int, default=None,
                  help="batch for smollm2 only (default: --batch)")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--warmup", type=int, default=1)
  ap.add_argument("--device", default="cpu", help="torch device; JAX uses its default backend")
  ap.add_argument("--random-init", action="store_true",
                  help="random weights of the presets' shapes (no preset packages needed)")
  ap.add_argument("--matmul-precision", choices=["default", "highest", "tf32"], default="default",
                  help="float32 matmuls on GPU: 'highest' (full float32 in both) or 'tf32' (both)")
  args = ap.parse_args()
  if args.matmul_precision != "default":
    tf32 = args.matmul_precision == "tf32"
    jax.config.update("jax_default_matmul_precision", "tensorfloat32" if tf32 else "highest")
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
  print(f"device: torch {args.device}, jax {jax.devices()[0].device_kind}; "
        f"matmul precision {args.matmul_precision}; random init {args.random_init}")
  print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
  print("load average (1, 5, 15 min) at start: %.1f %.1f %.1f" % os.getloadavg())
  print("model    batch x seq  ours s/step  torch s/step  ours/torch  ours tok/s  torch tok/s  compile s  first loss ours/torch")
  for kind in args.models:
    b = args.smollm2_batch if (kind == "smollm2" and args.smollm2_batch) else args.batch
    r = bench(kind, b, args.seq, args.repeats, args.warmup, args.device, args.random_init)
    print(f"{r['model']:8} {r['batch']:5} x {r['seq']:<4} {r['ours_s']:11.3f}  {r['torch_s']:12.3f}  "
          f"{r['ratio']:10.2f}  {r['ours_tok_s']:10.0f}  {r['torch_tok_s']:11.0f}  {r['compile_s']:9.1f}  "
          f"{r['first_loss_ours']:.4f}/{r['first_loss_torch']:.4f}", flush=True)
    print(f"         all ours: {[round(t, 3) for t in r['ours_all']]}  all torch: "
          f"{[round(t, 3) for t in r['torch_all']]}", flush=True)
  print("load average (1, 5, 15 min) at end: %.1f %.1f %.1f" % os.getloadavg())


if __name__ == "__main__":
  main()
