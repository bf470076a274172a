"""Builds a binary sentiment sequence of four domains from the benchmark's SC files (offline).

The check of issue 9 (does every method learn the first task at the main job's settings?) runs on a
sequence no test uses: SST-2, IMDB, Yelp and Amazon reviews with the labels ``negative``/``positive``.
Each domain is made from the benchmark's *training* file only (IMDB and Yelp have no test file here):
SST-2 and IMDB map Bad/Good to negative/positive; Yelp and Amazon (5-way) drop ``neutral`` and merge
``very negative``/``negative`` and ``positive``/``very positive``. The records are shuffled (seed 0) and
split 80/20 into ``train.json`` and ``test.json``; a text that occurs twice is kept once, so no test text is
ever a training text.

Command (writes ``<out>/SENT/{sst2,imdb,yelp,amazon}`` and ``<out>/SENT/PROVENANCE.md``)::

    python experiments/build_sentiment_domains.py --out /tmp/sent
    migu-jax run --config experiments/configs/order1_minilm.py --data-dir /tmp/sent \\
        --order SENT/sst2,SENT/imdb,SENT/yelp,SENT/amazon
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from migu_jax.cl.locate import SHARED_DATA

DOMAINS = {"sst2": "SST-2", "imdb": "IMDB", "yelp": "yelp", "amazon": "amazon"}
LABELS = {"Bad": "negative", "Good": "positive", "very negative": "negative", "negative": "negative",
          "positive": "positive", "very positive": "positive"}  # "neutral": dropped


def build(source: Path, out: Path, seed: int = 0, test_fraction: float = 0.2) -> dict[str, tuple[int, int]]:
  """Writes the four domains under ``out/SENT``; returns ``{domain: (train, test)}`` record counts."""
  counts = {}
  for name, folder in DOMAINS.items():
    path = source / "SC" / folder / "train.json"
    if not path.is_file():
      raise FileNotFoundError(f"build_sentiment_domains: {path} is missing; pass the CL_Benchmark folder "
                              "with --source.")
    unique = {r["sentence"]: LABELS[r["label"]] for r in json.loads(path.read_text()) if r["label"] in LABELS}
    records = [{"sentence": s, "label": label} for s, label in unique.items()]  # a repeated text once
    order = np.random.default_rng(seed).permutation(len(records))
    n_test = int(round(test_fraction * len(records)))
    split = {"test": [records[i] for i in order[:n_test]], "train": [records[i] for i in order[n_test:]]}
    target = out / "SENT" / name
    target.mkdir(parents=True, exist_ok=True)
    for part, rows in split.items():
      (target / f"{part}.json").write_text(json.dumps(rows))
    (target / "labels.json").write_text(json.dumps(["negative", "positive"]))
    counts[name] = (len(split["train"]), len(split["test"]))
  lines = [f"- {n}: SC/{DOMAINS[n]}/train.json, {tr} train / {te} test" for n, (tr, te) in counts.items()]
  (out / "SENT" / "PROVENANCE.md").write_text(
      "Binary sentiment domains built by experiments/build_sentiment_domains.py from the benchmark's training "
      f"files in {source} (seed {seed}, {test_fraction:.0%} held out as test):\n" + "\n".join(lines) + "\n")
  return counts


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--source", type=Path, default=SHARED_DATA, help="the CL_Benchmark folder")
  parser.add_argument("--out", type=Path, required=True)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  for name, (train, test) in build(args.source, args.out, args.seed).items():
    print(f"{name}: {train} train, {test} test")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
