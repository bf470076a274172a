"""The paper's Table 11 on order 1 (MiniLM, CPU scale, seeds 0-2): output features ranked by gradient
magnitude, by weight magnitude, or by output magnitude (MIGU), against FT; plus the diagonal-Fisher
ranking and two other threshold rules of migu_jax (exact top-k, L1 mass) for MIGU.

Command: ``.venv/bin/python experiments/reproduce.py table11`` (FT and MIGU are the standard_order1
runs). Results: experiments/RESULTS.md.
"""

from cpu_scale import cpu_scale


def get_configs() -> dict:
  return {
      "importance": cpu_scale(order="1", methods=("grad_mask", "weight_mask", "fisher_mask")),
      "l1_mass": cpu_scale(order="1", methods=("migu",), threshold="l1_mass"),
  }


def get_config():
  return get_configs()["importance"].replace(output_dir="runs/repro/table11/importance")
