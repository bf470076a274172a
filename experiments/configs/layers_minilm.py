"""Layer-type ablation of MIGU on order 1 (MiniLM, CPU scale, seeds 0-2): the mask
on the attention projections only (query, key, value, out), on the feed-forward layers only
(intermediate, output), or on all (the standard_order1 run). Unmasked layers keep their whole gradient.

Command: ``.venv/bin/python experiments/reproduce.py layers``. Measured (2026-12-01, AA mean ± std over
seeds 0-2): attention only 61.0 ± 3.9, feed-forward only 65.2 ± 3.1, all 65.0 ± 1.1, none (SeqFT)
52.7 ± 3.1. Results: experiments/RESULTS.md.

One variant alone, the same Config that ``reproduce.py`` runs, into the same folder::

    migu-jax run --config experiments/configs/layers_minilm.py:attention --output runs/repro/layers/attention
    migu-jax run --config experiments/configs/layers_minilm.py:ffn --output runs/repro/layers/ffn
"""

from cpu_scale import cpu_scale


def get_configs() -> dict:
  return {layers: cpu_scale(order="1", methods=("migu",), mask_targets=(layers,)) for layers in ("attention", "ffn")}


def get_config():
  return get_configs()["attention"].replace(output_dir="runs/repro/layers/attention")
