"""Long benchmark (orders 4-6, 15 tasks), MiniLM at CPU scale: SeqFT against MIGU, one seed per order
(the three orders stand in for seeds). 30 test records per task; yelp, imdb and multirc have no test
file here and are evaluated on a seeded held-out part of their training file.

Command: ``.venv/bin/python experiments/reproduce.py long_order4 long_order5 long_order6``.
Measured (2026-12-01, 2 CPU cores, about 3 minutes per run): order 4, AA SeqFT 49.3, MIGU 53.8 (one
seed), order 5 SeqFT 40.2, MIGU 56.0; order 6 not run yet. Results: experiments/RESULTS.md.

One variant alone, the same Config that ``reproduce.py`` runs, into the same folder (other orders:
``reproduce.py``, which passes ``order`` to ``get_configs``)::

    migu-jax run --config experiments/configs/long_minilm.py:full --output runs/repro/long_order4/full
"""

from cpu_scale import cpu_scale


def get_configs(order: str = "4") -> dict:
  return {"full": cpu_scale(order=order, methods=("seqft", "migu"), seeds=(0,), max_test=30)}


def get_config():
  return get_configs()["full"].replace(output_dir="runs/repro/long_order4/full")
