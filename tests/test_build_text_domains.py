"""experiments/build_text_domains.py: domains disjoint from their end tasks, PROVENANCE beside the output."""

import sys
from pathlib import Path

import pytest

from tiny_cl import DATA, needs_data

REPO = Path(__file__).resolve().parents[1]


@needs_data
def test_domains_are_disjoint_from_end_tasks_and_load(tmp_path):
  sys.path.insert(0, str(REPO / "experiments"))
  try:
    import build_text_domains as build
  finally:
    sys.path.remove(str(REPO / "experiments"))
  from migu_jax.cl import data, text

  assert build.main(["--source", str(DATA), "--out", str(tmp_path), "--train-docs", "300", "--test-docs", "50",
                     "--end-train", "100", "--end-test", "100", "--general-docs", "20"]) == 0
  for spec in build.DOMAINS:
    domain = text.load_domain(tmp_path, spec.name)
    assert domain.train and domain.test and not set(domain.train) & set(domain.test)
    end = data.load_task(tmp_path, f"{spec.end_category}/{spec.name.split('/')[1]}-end", train_per_class=None,
                         max_test=None)
    end_docs = {build.document(r.sentence) for r in end.train + end.test}
    assert not end_docs & (set(domain.train) | set(domain.test)), spec.name
  assert len(text.load_corpus(tmp_path / "general" / "boolq").test) == 20
  assert "| news/agnews |" in (tmp_path / "PROVENANCE.md").read_text()
  with pytest.raises(SystemExit, match="inside the repository"):
    build.main(["--source", str(DATA), "--out", str(REPO / "data_here")])
