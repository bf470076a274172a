"""Standard benchmark (orders 1-3), MiniLM at CPU scale: SeqFT, MIGU, random mask, replay, MIGU+replay,
LoRA and MIGU+LoRA, seeds 0-2 (the paper's standard-benchmark comparison at small scale).

Commands (from the repository root)::

    .venv/bin/python experiments/reproduce.py standard_order1 standard_order2 standard_order3

or one order with the runner: ``migu-jax run --config experiments/configs/standard_minilm.py --order 2
--output runs/repro/standard_order2/full`` (full fine-tuning methods; LoRA is ``get_configs()["lora"]``).

The full fine-tuning methods share the CPU scale (lr 3e-4, see cpu_scale.py); the LoRA methods train
rank-8 adapters on query and value at lr 1e-3 (at 3e-4 they barely move in 33 steps). Replay mixes 2%
of each earlier task's training records in (the paper's setting). Measured (2026-12-01, 2 CPU cores,
AA mean over seeds 0-2, orders 1 / 2 / 3): SeqFT 52.7 / 60.2 / 56.3, MIGU 65.0 / 65.5 / 64.8, random
64.3 / 62.2 / 64.2, replay 50.3 / 61.2 / 58.7, MIGU+replay 64.7 / 61.2 / 64.0, LoRA 64.3 / 62.0 / 64.3,
MIGU+LoRA 64.0 / 62.3 / 60.0; 45-85 s per run. Results: experiments/RESULTS.md.

One variant alone, the same Config that ``reproduce.py`` runs, into the same folder (other orders:
``reproduce.py``, which passes ``order`` to ``get_configs``)::

    migu-jax run --config experiments/configs/standard_minilm.py:full --output runs/repro/standard_order1/full
    migu-jax run --config experiments/configs/standard_minilm.py:lora --output runs/repro/standard_order1/lora
"""

from cpu_scale import cpu_scale


def get_configs(order: str = "1") -> dict:
  return {
      "full": cpu_scale(order=order, methods=("seqft", "migu", "random", "replay", "migu_replay")),
      "lora": cpu_scale(order=order, methods=("lora", "migu_lora"), learning_rate=1e-3, lora_rank=8,
                        lora_alpha=16.0, lora_targets=("query", "value")),
  }


def get_config():
  return get_configs()["full"].replace(output_dir="runs/repro/standard_order1/full")
