"""Builds offline text domains for continual pre-training from the labeled CL_Benchmark on disk.

Each domain (``<out>/<group>/<domain>/{train,test}.txt``, one document per line) is made of the benchmark's
sentences with their field names dropped (``"Title: X\\nText: Y"`` -> ``"X Y"``); beside it, its end task for
the DAS protocol (``<out>/<category>/<domain>-end/{train,test,labels}.json``, the benchmark's labeled layout)
and a general held-out corpus from other sources (``<out>/general/boolq/test.txt``: BoolQ's Wikipedia
passages). A domain's documents never contain a record of its end task (train or test): they are drawn from
what is left once the end task's records are set aside, compared by text. Everything is seeded; a
``PROVENANCE.md`` beside the output says where each file came from and how many records it holds.

The output goes outside the repository (default ``~/.cache/migu_jax/text_domains``); the script refuses a
folder inside it.

Usage (about 10 s)::

    python experiments/build_text_domains.py --out ~/.cache/migu_jax/text_domains
    migu-jax run --model minilm --objective lm --data-dir ~/.cache/migu_jax/text_domains \\
        --order news/agnews,encyclopedia/dbpedia,reviews/products,reviews/movies \\
        --general ~/.cache/migu_jax/text_domains/general/boolq --methods seqft,migu,random --seeds 0,1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "CL_Benchmark"
DEFAULT_OUT = Path("~/.cache/migu_jax/text_domains").expanduser()
FIELD_NAMES = ("Title:", "Text:", "Question:", "Answer:", "question:", "passage:")


@dataclasses.dataclass(frozen=True)
class DomainSpec:
  """A text domain: the benchmark files its documents come from, and its end task (category, files)."""

  name: str
  docs_from: tuple[str, ...]
  end_category: str
  end_labels: str
  end_train: str
  end_test: str
  end_train_cap: int | None = None  # when the documents come from the end task's train file, leave them some


DOMAINS = (
    DomainSpec("news/agnews", ("TC/agnews/test.json",), "TC", "TC/agnews/labels.json", "TC/agnews/train.json",
               "TC/agnews/test.json"),
    DomainSpec("encyclopedia/dbpedia", ("TC/dbpedia/test.json",), "TC", "TC/dbpedia/labels.json",
               "TC/dbpedia/train.json", "TC/dbpedia/test.json"),
    DomainSpec("reviews/products", ("SC/yelp/train.json", "SC/amazon/test.json"), "SC", "SC/amazon/labels.json",
               "SC/amazon/train.json", "SC/amazon/test.json"),
    DomainSpec("reviews/movies", ("SC/IMDB/train.json",), "SC", "SC/SST-2/labels.json", "SC/SST-2/train.json",
               "SC/SST-2/test.json"),
    DomainSpec("questions/yahoo", ("TC/yahoo/train.json",), "TC", "TC/yahoo/labels.json", "TC/yahoo/train.json",
               "TC/yahoo/test.json", end_train_cap=100),
)
"""The domains: documents from one set of files, end task from the benchmark task of the same kind."""

GENERAL = ("general/boolq", "BoolQA/BoolQA/test.json")
"""The general held-out corpus: BoolQ's Wikipedia passages (no domain draws on BoolQ)."""


def document(sentence: str) -> str:
  """A benchmark sentence as one line of text: field names dropped, lines and spaces joined.

  Example:
    >>> document("Title: Up\\nText:  HOUSTON -- a  flight\\n")
    'Up HOUSTON -- a flight'
  """
  parts = []
  for line in sentence.splitlines():
    line = line.strip()
    for field in FIELD_NAMES:
      if line.startswith(field):
        line = line[len(field):]
        break
    parts.append(line)
  return " ".join(" ".join(parts).split())


def records(source: Path, rel: str) -> list[dict]:
  path = source / rel
  if not path.is_file():
    raise SystemExit(f"build_text_domains: {path} is missing; point --source at a CL_Benchmark copy "
                     "(see its PROVENANCE.md).")
  return json.loads(path.read_text())


def shuffled(items: list, seed: int, salt: str) -> list:
  items = list(items)
  random.Random(f"{seed}:{salt}").shuffle(items)
  return items


def build_domain(spec: DomainSpec, source: Path, out: Path, args) -> dict:
  """Writes one domain and its end task; returns the counts for PROVENANCE.md."""
  end_test = shuffled(records(source, spec.end_test), args.seed, spec.name + ":test")[:args.end_test]
  taken = {r["sentence"] for r in end_test}
  end_train = [r for r in shuffled(records(source, spec.end_train), args.seed, spec.name + ":train")
               if r["sentence"] not in taken][:min(args.end_train, spec.end_train_cap or args.end_train)]
  taken |= {r["sentence"] for r in end_train}
  docs, seen = [], set()
  for rel in spec.docs_from:
    for r in records(source, rel):
      text = document(r["sentence"])
      if r["sentence"] not in taken and text and text not in seen:
        seen.add(text)
        docs.append(text)
  docs = shuffled(docs, args.seed, spec.name + ":docs")
  n_test = min(args.test_docs, len(docs) // 5)  # a small domain keeps most of its documents for training
  test_docs, train_docs = docs[:n_test], docs[n_test:n_test + args.train_docs]
  folder = out / spec.name
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "train.txt").write_text("".join(d + "\n" for d in train_docs))
  (folder / "test.txt").write_text("".join(d + "\n" for d in test_docs))
  end = out / spec.end_category / (spec.name.split("/")[1] + "-end")
  end.mkdir(parents=True, exist_ok=True)
  (end / "train.json").write_text(json.dumps(end_train, ensure_ascii=False))
  (end / "test.json").write_text(json.dumps(end_test, ensure_ascii=False))
  (end / "labels.json").write_text((source / spec.end_labels).read_text())
  return {"domain": spec.name, "docs_from": ", ".join(spec.docs_from), "train_docs": len(train_docs),
          "test_docs": len(test_docs), "end_task": f"{spec.end_category}/{end.name}",
          "end_from": f"{spec.end_train} / {spec.end_test}", "end_train": len(end_train), "end_test": len(end_test)}


def build_general(source: Path, out: Path, args) -> dict:
  passages = []
  for r in records(source, GENERAL[1]):
    passage = r["sentence"].split("passage:", 1)[-1]
    passages.append(document(passage))
  passages = shuffled(list(dict.fromkeys(p for p in passages if p)), args.seed, "general")[:args.general_docs]
  folder = out / GENERAL[0]
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "test.txt").write_text("".join(p + "\n" for p in passages))
  return {"folder": GENERAL[0], "from": GENERAL[1], "docs": len(passages)}


def provenance(source: Path, rows: list[dict], general: dict, args) -> str:
  lines = ["# Text domains built from CL_Benchmark", "",
           f"Built by `experiments/build_text_domains.py` of migu_jax (`python experiments/build_text_domains.py "
           f"--source {source} --out {args.out} --seed {args.seed} --train-docs {args.train_docs} --test-docs "
           f"{args.test_docs} --end-train {args.end_train} --end-test {args.end_test} --general-docs "
           f"{args.general_docs}`) from the local CL_Benchmark copy at `{source}` (see its PROVENANCE.md: O-LoRA's "
           "CL_Benchmark; the source datasets' licences apply).", "",
           "Documents are the benchmark's `sentence` fields with their field names (`Title:`, `Text:`, ...) dropped "
           "and lines joined, one per line, deduplicated. Each domain's end task (`<category>/<domain>-end`, the "
           "labeled layout) sets its test records (a seeded sample of the end task's test file) and train records "
           "aside first; the domain's documents are drawn from what is left, so no end-task record (train or "
           "test) is a domain document (compared by exact text).", "",
           "| domain | documents from | train docs | test docs | end task | end task from (train / test) | "
           "end train | end test |", "|---|---|---:|---:|---|---|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['domain']} | {r['docs_from']} | {r['train_docs']} | {r['test_docs']} | {r['end_task']} | "
                 f"{r['end_from']} | {r['end_train']} | {r['end_test']} |")
  lines += ["", f"General held-out corpus: `{general['folder']}/test.txt`, {general['docs']} Wikipedia passages of "
            f"BoolQ (`{general['from']}`), a source no domain uses.", "",
            "Notes: `TC/dbpedia/train.json` and both yahoo files of the local copy are partial prefixes of the "
            "originals (see the benchmark's PROVENANCE.md), so the encyclopedia end task trains on at most 574 "
            "records and the questions domain is small; yelp and IMDB have no test file there, so they serve as "
            "documents only.", ""]
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="the CL_Benchmark folder")
  p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write (outside the repository)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--train-docs", type=int, default=2000, help="training documents per domain (at most)")
  p.add_argument("--test-docs", type=int, default=200, help="held-out documents per domain")
  p.add_argument("--end-train", type=int, default=1000, help="end-task training records (at most)")
  p.add_argument("--end-test", type=int, default=500, help="end-task test records (at most)")
  p.add_argument("--general-docs", type=int, default=300)
  p.add_argument("--domains", help="comma-separated domain names (default: all)")
  args = p.parse_args(argv)
  out = args.out.expanduser().resolve()
  if out == REPO or REPO in out.parents:
    raise SystemExit(f"build_text_domains: {out} is inside the repository; write data elsewhere (--out).")
  specs = [s for s in DOMAINS if not args.domains or s.name in args.domains.split(",")]
  rows = [build_domain(s, args.source, out, args) for s in specs]
  general = build_general(args.source, out, args)
  (out / "PROVENANCE.md").write_text(provenance(args.source, rows, general, args))
  for r in rows:
    print(f"{r['domain']}: {r['train_docs']} train / {r['test_docs']} test documents; end task {r['end_task']} "
          f"{r['end_train']} / {r['end_test']}")
  print(f"general: {general['docs']} documents; written to {out} (PROVENANCE.md there)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
