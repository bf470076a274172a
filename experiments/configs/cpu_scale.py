"""The CPU scale shared by the reproduction configs (experiments/reproduce.py), not a run by itself.

MiniLM (all-MiniLM-L6-v2, offline), 16 training records per label, one epoch, batch 16, AdamW at a
constant 3e-4 with clipping at 1.0, 50 test records per task, prompts cut to 128 tokens, seeds 0, 1, 2,
MIGU's T = 0.7 with the first task unmasked. About 45 s per run of a 4-task order on 2 CPU cores.
"""

from migu_jax.cl.runner import Config


def cpu_scale(**changes) -> Config:
  """The shared CPU-scale :class:`Config`, with ``changes``."""
  return Config(
      model="minilm",
      seeds=(0, 1, 2),
      ratio=0.7,
      train_per_class=16,
      max_test=50,
      epochs=1,
      batch_size=16,
      learning_rate=3e-4,
      max_length=128,
      length_buckets=(64, 96, 128),
      eval_batch_size=32,
      checkpoint_every=1000,     # a checkpoint after every task is enough at this size
      keep_checkpoints=1,
      progress=False,
  ).replace(**changes)


def get_config() -> Config:
  return cpu_scale(order="1", methods=("seqft", "migu"), output_dir="runs/cpu_scale")
