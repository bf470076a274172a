"""Standard benchmark order 1 with SmolLM2-135M-Instruct in the generative prompt format (the label text
is the target; evaluation by option likelihood), SeqFT against MIGU, seeds 0-2. Sized for a GPU (135M
parameters, 256 tokens, 64 records per label), so it is not part of the CPU reproduction.

Command (on a machine with a GPU)::

    .venv/bin/python experiments/reproduce.py smollm2_order1

Not yet run: no GPU was lent when this file was written (experiments/RESULTS.md says so).

One variant alone, the same Config that ``reproduce.py`` runs, into the same folder (other orders:
``reproduce.py``, which passes ``order`` to ``get_configs``)::

    migu-jax run --config experiments/configs/standard_smollm2.py:full --output runs/repro/smollm2_order1/full
"""

from cpu_scale import cpu_scale


def get_configs(order: str = "1") -> dict:
  return {"full": cpu_scale(model="smollm2-135m", order=order, methods=("seqft", "migu"), head="causal_lm",
                            eval_mode="options", learning_rate=5e-5, train_per_class=64, max_test=200,
                            batch_size=16, max_length=256, length_buckets=(128, 256), eval_batch_size=64)}


def get_config():
  return get_configs()["full"].replace(output_dir="runs/repro/smollm2_order1/full")
