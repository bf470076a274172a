"""MIGU's T from 0.1 to 0.95 on order 1 (MiniLM, CPU scale, seeds 0-2).

Command: ``.venv/bin/python experiments/reproduce.py ratio_sweep`` (T = 0.7 is the standard_order1 run;
T = 0 would be SeqFT). Results: experiments/RESULTS.md.
"""

from cpu_scale import cpu_scale

RATIOS = (0.1, 0.3, 0.5, 0.9, 0.95)


def get_configs() -> dict:
  return {f"T_{t:g}": cpu_scale(order="1", methods=("migu",), ratio=t) for t in RATIOS}


def get_config():
  return get_configs()["T_0.5"].replace(output_dir="runs/repro/ratio_sweep/T_0.5")
