"""experiments/build_sentiment_domains.py: four binary domains, test records disjoint from training."""

import importlib.util
import json
from pathlib import Path

import pytest

from migu_jax.cl.locate import SHARED_DATA

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "build_sentiment_domains.py"


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"benchmark data not found at {SHARED_DATA}")
def test_domains_are_binary_and_their_test_records_unseen(tmp_path):
  spec = importlib.util.spec_from_file_location("build_sentiment_domains", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  counts = module.build(SHARED_DATA, tmp_path)
  assert set(counts) == {"sst2", "imdb", "yelp", "amazon"}
  for name, (train, test) in counts.items():
    folder = tmp_path / "SENT" / name
    rows = {part: json.loads((folder / f"{part}.json").read_text()) for part in ("train", "test")}
    assert (len(rows["train"]), len(rows["test"])) == (train, test) and 0.15 < test / (train + test) < 0.25
    assert {r["label"] for r in rows["train"] + rows["test"]} == {"negative", "positive"}
    assert not {r["sentence"] for r in rows["test"]} & {r["sentence"] for r in rows["train"]}
  assert counts["yelp"][0] + counts["yelp"][1] < 5000  # neutral dropped
