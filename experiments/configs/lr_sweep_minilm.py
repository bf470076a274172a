"""Learning-rate sweep of SeqFT and MIGU on order 1 (MiniLM, CPU scale, seeds 0-2), so MIGU is compared
with the best-tuned baseline (the paper: FT at lr 3e-5 beats the FT it compares MIGU with).

Command: ``.venv/bin/python experiments/reproduce.py lr_sweep`` (lr 3e-4 is the standard_order1 run).
Measured (2026-12-01, 2 CPU cores, AA mean ± std over seeds 0-2; lr 1e-4 / 3e-4 / 1e-3): SeqFT
67.8 ± 2.1 / 52.7 ± 3.1 / 15.5 ± 0.8, MIGU 62.8 ± 3.0 / 65.0 ± 1.1 / 19.5 ± 6.0; about 50 s per run.
Results: experiments/RESULTS.md.

One variant alone, the same Config that ``reproduce.py`` runs, into the same folder::

    migu-jax run --config experiments/configs/lr_sweep_minilm.py:lr_0.0001 --output runs/repro/lr_sweep/lr_0.0001
    migu-jax run --config experiments/configs/lr_sweep_minilm.py:lr_0.001 --output runs/repro/lr_sweep/lr_0.001
"""

from cpu_scale import cpu_scale

RATES = (1e-4, 1e-3)


def get_configs() -> dict:
  return {f"lr_{lr:g}": cpu_scale(order="1", methods=("seqft", "migu"), learning_rate=lr) for lr in RATES}


def get_config():
  return get_configs()["lr_0.0001"].replace(output_dir="runs/repro/lr_sweep/lr_0.0001")
