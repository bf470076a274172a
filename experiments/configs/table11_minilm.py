"""The paper's Table 11 on order 1 (MiniLM, CPU scale, seeds 0-2): output features ranked by gradient
magnitude, by weight magnitude, or by output magnitude (MIGU), against FT; plus the diagonal-Fisher
ranking and two other threshold rules of migu_jax (exact top-k, L1 mass) for MIGU.

Command: ``.venv/bin/python experiments/reproduce.py table11`` (FT and MIGU are the standard_order1
runs). Measured (2026-12-01, AA mean ± std over seeds 0-2): gradient 62.7 ± 1.7, weight 65.5 ± 1.6,
Fisher 65.8 ± 3.0, MIGU 65.0 ± 1.1, FT 52.7 ± 3.1; MIGU with the L1-mass rule 62.5 ± 2.5.
Results: experiments/RESULTS.md.

One variant alone, the same Config that ``reproduce.py`` runs, into the same folder::

    migu-jax run --config experiments/configs/table11_minilm.py:importance --output runs/repro/table11/importance
    migu-jax run --config experiments/configs/table11_minilm.py:l1_mass --output runs/repro/table11/l1_mass
"""

from cpu_scale import cpu_scale


def get_configs() -> dict:
  return {
      "importance": cpu_scale(order="1", methods=("grad_mask", "weight_mask", "fisher_mask")),
      "l1_mass": cpu_scale(order="1", methods=("migu",), threshold="l1_mass"),
  }


def get_config():
  return get_configs()["importance"].replace(output_dir="runs/repro/table11/importance")
