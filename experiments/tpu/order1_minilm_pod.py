"""Benchmark order 1 (dbpedia -> amazon -> yahoo -> agnews), MiniLM, SeqFT vs MIGU, on a TPU pod slice.

The CPU main job (experiments/configs/order1_minilm.py) at pod scale: every training record (no
``train_per_class`` cap), the whole test sets (``max_test=None``), a global batch of 256 rows split over
every chip (``mode="mesh"``: 16 rows per chip of a v4-32's 16 chips, 8 per chip of a v5e-32), parameters
replicated (MiniLM's 22M parameters fit every chip; ``mesh_shape=(-1, 2)`` would shard kernels over a model
axis of 2 chips, see ``runner.shard_spec``). Command, on every host at once (experiments/tpu/README.md)::

    python experiments/tpu/run_cl.py --config experiments/tpu/order1_minilm_pod.py --output /mnt/shared/runs/order1_pod

The output folder must be seen by every host (checkpoints are written and read by all of them). Not yet run
on a pod: no TPU was available when this file was written, so there is no measured result here. The script
and config run unchanged on one host (tests/test_tpu.py, 8 virtual CPU devices at a tiny setting).
"""

import importlib.util
from pathlib import Path

_CPU = Path(__file__).resolve().parents[1] / "configs" / "order1_minilm.py"


def get_config():
  spec = importlib.util.spec_from_file_location("order1_minilm", _CPU)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config().replace(
      mode="mesh",
      mesh_shape=None,          # every chip on the data axis
      train_per_class=None,     # all training records
      max_test=None,            # all test records
      batch_size=256,           # divisible by 8, 16, 32 and 64 chips
      eval_batch_size=256,
      checkpoint_every=200,
      output_dir="runs/order1_minilm_pod",
  )
