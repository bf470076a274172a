"""Llama-2-7B, continual fine-tuning on benchmark order 1, SeqFT vs MIGU, on a v4-32 or v5e-32 slice.

The paper's protocol (its Table 1/8 for full fine-tuning) at the paper's largest model size: every training
record of dbpedia -> amazon -> yahoo -> agnews, the label generated greedily after the reference's prompt and
scored by exact match (option likelihood beside it), batch 64, AdamW at a constant 1e-4, weight decay 0 (the
reference code), clipping at 1.0, one epoch, T = 0.7, the first task unmasked, 3 seeds.

At this size the state does not fit a chip replicated (6.74 B parameters with float32 AdamW state: 81 GB), so:
FSDP (every parameter, gradient, AdamW moment and MIGU statistic split over the 32 chips by the Llama
family's rules, ``migu_jax/models/llama/sharding.py``), bfloat16 compute with float32 parameters, state and
statistics, remat, and the 32 decoder layers scanned (one layer's weights gathered at a time; MIGU's
threshold still per layer). Evaluation runs on the same mesh with the parameters sharded as trained.
``experiments/tpu/plans/llama2_7b_scan_fsdp_v5e32.txt`` is the compiled plan of this step at 32 x 512 tokens
(fits a v5e: 11.3 of 16 GB per chip); batch 64 x 512 is the same per-chip memory for the state and about
twice the activations (check with ``migu-jax plan ... --batch-size 64``).

Weights: ``LLAMA2_7B`` names a local folder saved by transformers (``config.json`` + safetensors) on every
host or a hub id (``meta-llama/Llama-2-7b-hf``, gated: log in first). Output: a bucket every host writes
(``--output gs://BUCKET/runs/llama2_7b_order1``). Command, on every host at once (experiments/tpu/README.md)::

    LLAMA2_7B=/mnt/shared/llama-2-7b-hf python experiments/tpu/run_cl.py \\
        --config experiments/tpu/llama2_7b_pod.py --output gs://BUCKET/runs/llama2_7b_order1

Not run: no TPU slice was available when this file was written; there is no measured result here.
"""

import os

from migu_jax.cl.runner import Config


def get_config() -> Config:
  return Config(
      model=os.environ.get("LLAMA2_7B", "meta-llama/Llama-2-7b-hf"),
      head="causal_lm",
      eval_mode="generate",
      also_eval=("options",),
      order="1",
      methods=("seqft", "migu"),
      seeds=(0, 1, 2),
      ratio=0.7,
      train_per_class=None,      # every training record
      max_test=None,             # every test record
      learning_rate=1e-4,
      weight_decay=0.0,
      batch_size=64,             # 2 rows per chip of a 32-chip slice
      eval_batch_size=64,
      max_length=512,
      epochs=1,
      checkpoint_every=200,
      magnitude_batches=0,
      mode="mesh",
      mesh_shape=None,           # every chip on the data axis
      sharding="fsdp",
      dtype="bfloat16",
      param_dtype="float32",
      remat=True,
      scan_layers=True,
      output_dir="runs/llama2_7b_order1",
  )
