"""Building the CL_Benchmark layout from the Hugging Face hub, for machines without a local copy.

Each benchmark task is converted from its public source dataset into ``{"sentence", "label"}`` records with the
benchmark's label strings and sentence formats (``"sentence 1: ...\\nsentence 2: ..."`` for NLI, ``"Title: ...
\\nText: ...\\n"`` for topics, ...), written as ``<out>/<category>/<task>/{train,test,labels}.json``.

The result follows the O-LoRA files closely but is not byte-identical to them: O-LoRA sampled its own subsets
(here: at most ``train_per_class`` training records per label and ``max_test`` test records, seeded), the
evaluation split is the source's validation split where its test labels are hidden (GLUE, SuperGLUE), and AG
News and the Amazon reviews on the hub have no separate title field.

This module is only used when no data folder is given (see :func:`migu_jax.cl.data.resolve_data_dir`); it
needs network access and is not exercised by the offline tests.
"""

from __future__ import annotations

import dataclasses
import os
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path

from migu_jax.cl import atomic
from migu_jax.cl.data import DataError, Record, resolve_task, sample_per_class, sample_stratified

HUB_URL = "https://huggingface.co"


@dataclasses.dataclass(frozen=True)
class HubSource:
  """Where a benchmark task comes from on the hub and how one row becomes a record.

  Attributes:
    path: the hub dataset id.
    config: its configuration name, or None.
    train_split / test_split: the splits used for train.json and test.json.
    labels: the benchmark's label strings, in labels.json order.
    label_of: the source's integer label -> benchmark label string, by position.
    sentence: one source row -> the benchmark's sentence text.
    label_key: the source column holding the integer label.
  """

  path: str
  config: str | None
  train_split: str
  test_split: str
  labels: tuple[str, ...]
  label_of: tuple[str, ...]
  sentence: Callable[[dict], str]
  label_key: str = "label"


def _title_text(row: dict) -> str:
  return f"Title: {row['title']}\nText: {row['content']}\n"


def _yahoo(row: dict) -> str:
  # O-LoRA drops the "Question:" body when it is empty and shows the title as the question.
  title, body, answer = row["question_title"], row["question_content"], row["best_answer"]
  if body:
    return f"Title: {title}\nQuestion: {body}\nAnswer: {answer}\n"
  return f"Question: {title}\nAnswer: {answer}\n"


def _pair(first: str, second: str, a: str, b: str) -> Callable[[dict], str]:
  return lambda row: f"{first}: {row[a]}\n{second}: {row[b]}"


def _copa(row: dict) -> str:
  return (f'Which sentence is the {row["question"]} of "{row["premise"]}"? Choose one between A and B.\n'
          f'A: {row["choice1"]}\nB: {row["choice2"]}')


_SENTIMENT5 = ("very negative", "negative", "neutral", "positive", "very positive")
_TRUE_FALSE = ("True", "False")
_FALSE_TRUE = ("False", "True")
_NLI3 = ("entailment", "neutral", "contradiction")

SOURCES: dict[str, HubSource] = {
    "agnews": HubSource("fancyzhx/ag_news", None, "train", "test",
                        ("World", "Sports", "Business", "Science or Technology"),
                        ("World", "Sports", "Business", "Science or Technology"),
                        lambda row: f"Text: {row['text']}\n"),
    "dbpedia": HubSource(
        "fancyzhx/dbpedia_14", None, "train", "test",
        ("Company", "Educational Institution", "Artist", "Athlete", "Office Holder", "Mean of Transportation",
         "Building", "Natural Place", "Village", "Animal", "Plant", "Album", "Film", "Written Work"),
        ("Company", "Educational Institution", "Artist", "Athlete", "Office Holder", "Mean of Transportation",
         "Building", "Natural Place", "Village", "Animal", "Plant", "Album", "Film", "Written Work"),
        _title_text),
    "yahoo": HubSource(
        "community-datasets/yahoo_answers_topics", None, "train", "test",
        ("Society & Culture", "Science & Mathematics", "Health", "Education & Reference", "Computers & Internet",
         "Sports", "Business & Finance", "Entertainment & Music", "Family & Relationships",
         "Politics & Government"),
        ("Society & Culture", "Science & Mathematics", "Health", "Education & Reference", "Computers & Internet",
         "Sports", "Business & Finance", "Entertainment & Music", "Family & Relationships",
         "Politics & Government"),
        _yahoo, label_key="topic"),
    "yelp": HubSource("Yelp/yelp_review_full", None, "train", "test", _SENTIMENT5, _SENTIMENT5,
                      lambda row: f"Text: {row['text']}\n"),
    "amazon": HubSource("SetFit/amazon_reviews_multi_en", None, "train", "test", _SENTIMENT5, _SENTIMENT5,
                        lambda row: f"Text: {row['text']}\n"),
    "imdb": HubSource("stanfordnlp/imdb", None, "train", "test", ("Good", "Bad"), ("Bad", "Good"),
                      lambda row: row["text"]),
    "sst-2": HubSource("nyu-mll/glue", "sst2", "train", "validation", ("Good", "Bad"), ("Bad", "Good"),
                       lambda row: f"Text: {row['sentence']}"),
    "mnli": HubSource("nyu-mll/glue", "mnli", "train", "validation_matched", ("neutral", "entailment",
                      "contradiction"), _NLI3, _pair("sentence 1", "sentence 2", "premise", "hypothesis")),
    "rte": HubSource("nyu-mll/glue", "rte", "train", "validation", ("contradiction", "entailment"),
                     ("entailment", "contradiction"), _pair("sentence 1", "sentence 2", "sentence1", "sentence2")),
    "qqp": HubSource("nyu-mll/glue", "qqp", "train", "validation", _FALSE_TRUE, _FALSE_TRUE,
                     _pair("first sentence", "second sentence", "question1", "question2")),
    "cb": HubSource("aps/super_glue", "cb", "train", "validation", ("entailment", "contradiction", "neutral"),
                    ("entailment", "contradiction", "neutral"),
                    _pair("sentence 1", "sentence 2", "premise", "hypothesis")),
    "boolqa": HubSource("aps/super_glue", "boolq", "train", "validation", _TRUE_FALSE, _FALSE_TRUE,
                        _pair("question", "passage", "question", "passage")),
    "copa": HubSource("aps/super_glue", "copa", "train", "validation", ("A", "B"), ("A", "B"), _copa),
    "multirc": HubSource("aps/super_glue", "multirc", "train", "validation", _FALSE_TRUE, _FALSE_TRUE,
                         lambda row: (f"paragraph: {row['paragraph']}\nquestion: {row['question']}\n"
                                      f"candidate answer: {row['answer']}")),
    "wic": HubSource("aps/super_glue", "wic", "train", "validation", _TRUE_FALSE, _FALSE_TRUE,
                     lambda row: f"word: {row['word']}\n{row['sentence1']}\n{row['sentence2']}"),
}


def hub_reachable(timeout: float = 3.0) -> bool:
  """Whether the Hugging Face hub (``$HF_ENDPOINT`` if set) answers within ``timeout`` seconds.

  False at once, without touching the network, when HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set.
  """
  if any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
    return False
  url = os.environ.get("HF_ENDPOINT") or HUB_URL
  try:
    with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
      return True
  except Exception:  # Any failure (DNS, refused, proxy, TLS, HTTP error) means: do not use the hub.
    return False


def _convert(name: str, source: HubSource, split: str) -> tuple[Record, ...]:
  import datasets  # Lazy: heavy, and only this path needs it.

  try:
    rows = datasets.load_dataset(source.path, source.config, split=split)
  except Exception as e:
    raise DataError(f"Could not download {source.path}"
                    f"{'/' + source.config if source.config else ''} ({split}) for task {name!r}: {e}. "
                    "Check the network, or pass --data-dir / set MIGU_DATA_DIR to a local copy laid out like "
                    "../shared/data/CL_Benchmark.") from e
  key = source.label_key
  try:
    return tuple(Record(source.sentence(row), source.label_of[row[key]]) for row in rows
                 if 0 <= row[key] < len(source.label_of))  # GLUE marks hidden test labels as -1.
  except KeyError as e:
    raise DataError(f"{source.path} ({split}) has no column {e} that task {name!r} needs (columns: "
                    f"{rows.column_names}); the hub dataset changed: update SOURCES[{name!r}] in {__name__}.") from e


def build_from_hub(out_dir: str | os.PathLike, tasks: Iterable[str], *, train_per_class: int = 1000,
                   max_test: int = 7600, seed: int = 0) -> Path:
  """Download and convert benchmark tasks into ``out_dir/<category>/<task>/{train,test,labels}.json``.

  Args:
    out_dir: destination folder (created).
    tasks: benchmark task names (see :data:`SOURCES`).
    train_per_class: training records kept per label (O-LoRA's train files hold about 1000 per label).
    max_test: test records kept, stratified (O-LoRA's larger test files hold 7600).
    seed: sampling seed.

  Returns:
    ``out_dir``.

  Raises:
    DataError: a task has no hub source, or a download fails.

  Example (needs network access, so not run by the tests)::

    build_from_hub("/tmp/CL_Benchmark", ["agnews", "sst-2"])
  """
  out = Path(out_dir)
  for name in tasks:
    ref = resolve_task(name)
    if ref.name not in SOURCES:
      raise DataError(f"Task {name!r} has no Hugging Face source; known: {', '.join(SOURCES)}. Custom tasks need "
                      "a local folder (--data-dir / MIGU_DATA_DIR).")
    source = SOURCES[ref.name]
    train = sample_per_class(_convert(ref.name, source, source.train_split), train_per_class, seed)
    test = sample_stratified(_convert(ref.name, source, source.test_split), max_test, seed)
    folder = out / ref.category / ref.folder
    folder.mkdir(parents=True, exist_ok=True)
    for file_name, data in (("train.json", [r._asdict() for r in train]), ("test.json", [r._asdict() for r in test]),
                            ("labels.json", list(source.labels))):
      # labels.json is written last: its presence marks a complete task.
      atomic.write_json(folder / file_name, data, ensure_ascii=False, default=None)
  return out

