"""Padding-aware magnitudes on order 1 (MiniLM, CPU scale, seeds 0-2): MIGU with padded positions left
out of ``sum |y|`` against the reference's statistics (the standard_order1 run), and MIGU with the paper's
exact count (top-k) against the quantile threshold.

Command: ``.venv/bin/python experiments/reproduce.py padding``. Results: experiments/RESULTS.md.
"""

from cpu_scale import cpu_scale


def get_configs() -> dict:
  return {
      "padding_aware": cpu_scale(order="1", methods=("migu",), padding_aware=True),
      "top_k": cpu_scale(order="1", methods=("migu",), threshold="top_k"),
  }


def get_config():
  return get_configs()["padding_aware"].replace(output_dir="runs/repro/padding/padding_aware")
