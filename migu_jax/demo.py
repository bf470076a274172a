"""A one-minute look at MIGU on a real pretrained model, offline.

Fine-tunes the packaged all-MiniLM-L6-v2 encoder (with a linear head on its
mean-pooled output) on SST-2 sentences for a few steps with
``optax.chain(migu.mask_by_magnitude(0.7), optax.adamw(...))`` and prints, per
step, the loss and the share of each linear layer's output features whose
gradient was kept (about 30% at T=0.7).

Run:
  .venv/bin/python -m migu_jax.demo [--steps 8] [--data-dir ../shared/data/CL_Benchmark]
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import migu_jax as migu
from migu_jax.cl import data as cl_data
from migu_jax.cl.locate import resolve_data_dir
from migu_jax.models import bert, from_pretrained, mean_pool


class Classifier(nn.Module):
  encoder: nn.Module
  classes: int

  @nn.compact
  def __call__(self, ids, mask):
    return nn.Dense(self.classes, name="head")(mean_pool(self.encoder(ids, mask), mask))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description="MIGU on MiniLM, offline, in a minute.")
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--ratio", type=float, default=0.7)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--data-dir", help="default: $MIGU_DATA_DIR, else ../shared/data/CL_Benchmark, else the hub")
  args = parser.parse_args(argv)

  encoder, encoder_params, tokenizer = from_pretrained("minilm")
  task = cl_data.load_task(resolve_data_dir(args.data_dir, use_shared=True), "sst-2")
  records = list(cl_data.sample_per_class(task.train, args.batch * args.steps // 2, seed=0))
  rng = np.random.default_rng(0)
  rng.shuffle(records)

  model = Classifier(bert.BertModel(encoder.config), len(task.labels))
  ids = tokenizer(["x"], return_tensors="np")["input_ids"]
  params = model.init(jax.random.key(0), ids, np.ones_like(ids))["params"]
  params["encoder"] = encoder_params
  label_index = {label: i for i, label in enumerate(task.labels)}

  def loss_fn(params, batch):
    logits, mags = migu.apply_with_magnitudes(model, {"params": params}, batch["ids"], batch["mask"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean(), mags

  tx = optax.chain(migu.mask_by_magnitude(args.ratio), optax.adamw(5e-5))
  step = migu.make_train_step(loss_fn, tx)
  params, opt_state = step.place_state(params), step.place_state(tx.init(params))
  forward = jax.jit(loss_fn)  # only to show the masks; the step computes its own

  print(f"MiniLM ({sum(x.size for x in jax.tree.leaves(params)) / 1e6:.1f}M params) on SST-2, "
        f"MIGU T={args.ratio}, {args.steps} steps of {args.batch}")
  for i in range(args.steps):
    chunk = records[i * args.batch:(i + 1) * args.batch]
    enc = tokenizer([r.sentence for r in chunk], padding="max_length", truncation=True,
                    max_length=64, return_tensors="np")
    batch = {"ids": enc["input_ids"], "mask": enc["attention_mask"],
             "label": np.array([label_index[r.label] for r in chunk], np.int32)}
    _, mags = forward(params, batch)
    masks = migu.layer_masks(params, mags, args.ratio)
    kept = np.mean([float(jnp.mean(keep)) for keep in masks.values()])
    params, opt_state, loss = step(params, opt_state, batch)
    print(f"step {i + 1:2d}  loss {float(loss):.4f}  kept output features: {kept:.1%} "
          f"(mean over {len(masks)} linear layers)")


if __name__ == "__main__":
  main()
