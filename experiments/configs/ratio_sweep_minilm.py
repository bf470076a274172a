"""MIGU's T from 0.1 to 0.95 on order 1 (MiniLM, CPU scale, seeds 0-2).

Command: ``.venv/bin/python experiments/reproduce.py ratio_sweep`` (T = 0.7 is the standard_order1 run;
T = 0 would be SeqFT). Measured (2026-12-01, AA mean ± std over seeds 0-2): T 0.1 57.5 ± 4.7, 0.3 64.8 ± 2.2,
0.5 66.5 ± 2.5, 0.7 65.0 ± 1.1, 0.9 61.8 ± 0.6, 0.95 62.8 ± 2.5 (SeqFT 52.7 ± 3.1); about 55 s per run.
Results: experiments/RESULTS.md.

One variant alone, the same Config that ``reproduce.py`` runs, into the same folder::

    migu-jax run --config experiments/configs/ratio_sweep_minilm.py:T_0.1 --output runs/repro/ratio_sweep/T_0.1
    migu-jax run --config experiments/configs/ratio_sweep_minilm.py:T_0.3 --output runs/repro/ratio_sweep/T_0.3
    migu-jax run --config experiments/configs/ratio_sweep_minilm.py:T_0.5 --output runs/repro/ratio_sweep/T_0.5
    migu-jax run --config experiments/configs/ratio_sweep_minilm.py:T_0.9 --output runs/repro/ratio_sweep/T_0.9
    migu-jax run --config experiments/configs/ratio_sweep_minilm.py:T_0.95 --output runs/repro/ratio_sweep/T_0.95
"""

from cpu_scale import cpu_scale

RATIOS = (0.1, 0.3, 0.5, 0.9, 0.95)


def get_configs() -> dict:
  return {f"T_{t:g}": cpu_scale(order="1", methods=("migu",), ratio=t) for t in RATIOS}


def get_config():
  return get_configs()["T_0.5"].replace(output_dir="runs/repro/ratio_sweep/T_0.5")
