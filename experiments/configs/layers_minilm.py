"""Layer-type ablation of MIGU on order 1 (MiniLM, CPU scale, seeds 0-2): the mask
on the attention projections only (query, key, value, out), on the feed-forward layers only
(intermediate, output), or on all (the standard_order1 run). Unmasked layers keep their whole gradient.

Command: ``.venv/bin/python experiments/reproduce.py layers``. Results: experiments/RESULTS.md.
"""

from cpu_scale import cpu_scale


def get_configs() -> dict:
  return {layers: cpu_scale(order="1", methods=("migu",), mask_targets=(layers,)) for layers in ("attention", "ffn")}


def get_config():
  return get_configs()["attention"].replace(output_dir="runs/repro/layers/attention")
