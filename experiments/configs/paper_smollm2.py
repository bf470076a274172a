"""The paper's own setting at CPU scale: a language model that generates its labels (SmolLM2-135M-Instruct,
Llama architecture, offline), standard order 1, SeqFT vs MIGU vs the random mask, 2 seeds.

Command (from the repository root; hours on 2 CPU cores, resumable: start it again after any interruption)::

    JAX_COMPILATION_CACHE_DIR=runs/jax_cache migu-jax run --config experiments/configs/paper_smollm2.py

Protocol (issue 9):
* Learning rate per method chosen on a dev split carved from each task's training records (4 per label, at
  most 40 per task, seed 0; never the test set) among 3e-5, 1e-4 and 3e-4; each method then runs at its
  chosen rate *and* at the paper's fixed 1e-4 (rows ``name@rate``; ``tuning.json`` says which was chosen).
* The causal-LM head learns ``" " + label + eos`` after the reference prompt; evaluation by greedy generation
  and exact match after the reference's normalisation (the paper's metric, the main matrix) and by option
  likelihood (``also_eval``), each with AA, BWT, FWT and forgetting.
* AdamW, constant rate, weight decay 0 (the reference code), clipping at 1.0, batch 16, 1 epoch, T = 0.7,
  first task unmasked, the tied LM head's embedding masked by vocabulary row (as the reference's shared
  ``lm_head`` weight); batches padded to their longest row rounded up to 32 tokens (the reference pads to the
  longest row; the rounding bounds the compiled shapes on CPU).
* Scale (sized for 2 CPU cores): 16 training records per label (dbpedia 224, amazon 80, yahoo 160, agnews
  64: 33 steps per run), 40 test records per task, prompts cut to 128 tokens. A first try at 32 per label
  and 100 test records took over an hour per dev run on this machine; at this size a dev run takes about
  16 min on the idle 2-core machine (about 16 s per step of 16 rows), and the process peaks at 12-15 GB
  resident (the train step's working set: XLA counts 5.2 GB of temporaries; RESULTS.md A3).

Results: experiments/RESULTS.md (section "SmolLM2, the paper's setting").
"""

from migu_jax.cl.runner import Config


def get_config() -> Config:
  return Config(
      model="smollm2-135m",
      head="causal_lm",
      eval_mode="generate",
      also_eval=("options",),
      order="1",
      methods=("seqft", "migu", "random"),
      seeds=(0, 1),
      ratio=0.7,
      train_per_class=16,
      max_test=40,
      learning_rate=1e-4,                 # the paper's fixed rate, run beside each method's dev-chosen one
      tune_rates=(3e-5, 1e-4, 3e-4),
      dev_per_class=4,
      weight_decay=0.0,
      batch_size=16,
      max_length=128,
      pad_multiple=32,
      length_buckets=(64, 96, 128),
      eval_batch_size=32,
      checkpoint_every=10,
      keep_checkpoints=2,
      magnitude_batches=1,
      output_dir="runs/paper_smollm2",
  )
