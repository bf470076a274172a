"""Padding-aware magnitudes on order 1 (MiniLM, CPU scale, seeds 0-2): MIGU with padded positions left
out of ``sum |y|`` against the reference's statistics (the standard_order1 run), and MIGU with the paper's
exact count (top-k) against the quantile threshold.

Command: ``.venv/bin/python experiments/reproduce.py padding``. Measured (2026-12-01, AA mean ± std over
seeds 0-2): padding-aware 65.2 ± 0.6, exact top-k 64.8 ± 0.6, the reference (quantile, padding counted)
65.0 ± 1.1. Results: experiments/RESULTS.md.

One variant alone, the same Config that ``reproduce.py`` runs, into the same folder::

    migu-jax run --config experiments/configs/padding_minilm.py:padding_aware --output runs/repro/padding/padding_aware
    migu-jax run --config experiments/configs/padding_minilm.py:top_k --output runs/repro/padding/top_k
"""

from cpu_scale import cpu_scale


def get_configs() -> dict:
  return {
      "padding_aware": cpu_scale(order="1", methods=("migu",), padding_aware=True),
      "top_k": cpu_scale(order="1", methods=("migu",), threshold="top_k"),
  }


def get_config():
  return get_configs()["padding_aware"].replace(output_dir="runs/repro/padding/padding_aware")
