"""Continual-learning benchmark data: naming, loading, validating and sampling tasks.

The benchmark is the CL_Benchmark of O-LoRA (Wang et al., 2023), reused by MIGU (Du et al., 2024). On disk
each task is a folder ``<data_dir>/<category>/<task>/`` holding

* ``train.json``: a JSON list of ``{"sentence": str, "label": str}`` objects,
* ``test.json`` (or ``dev.json``, identical in the original benchmark): the same, for evaluation,
* ``labels.json``: a JSON list of the label strings, in the order the prompt lists them.

A task without a test/dev file is evaluated on a seeded held-out part of its train file, disjoint from the
records it trains on; :attr:`Task.test_is_heldout` records that, so reports can say so. Records without a
gold label (MNLI's ``"-"``: 131 of its 7600 test records) are dropped and counted in :attr:`Task.skipped`.

Example:
  >>> import json, tempfile
  >>> from pathlib import Path
  >>> root = Path(tempfile.mkdtemp())
  >>> folder = root / "SC" / "toy"
  >>> folder.mkdir(parents=True)
  >>> recs = [{"sentence": f"s{i}", "label": "Good" if i % 2 else "Bad"} for i in range(20)]
  >>> _ = (folder / "train.json").write_text(json.dumps(recs))
  >>> _ = (folder / "labels.json").write_text(json.dumps(["Good", "Bad"]))
  >>> task = load_task(root, "SC/toy")
  >>> (task.name, task.category, task.labels, len(task.train), len(task.test), task.test_is_heldout)
  ('SC/toy', 'SC', ('Good', 'Bad'), 18, 2, True)
  >>> resolve_order("1")
  ('dbpedia', 'amazon', 'yahoo', 'agnews')
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import NamedTuple

DATA_DIR_ENV = "MIGU_DATA_DIR"


class DataError(ValueError):
  """A benchmark folder, file or record is missing or malformed; the message names it and the fix."""


class Record(NamedTuple):
  """One labelled example: the input text and its label string (one of the task's labels)."""

  sentence: str
  label: str


class TaskRef(NamedTuple):
  """Where a task lives: ``<data_dir>/<category>/<folder>``; ``name`` is how orders and results call it."""

  name: str
  category: str
  folder: str


@dataclasses.dataclass(frozen=True)
class HeldOutSplit:
  """How to carve a test set out of train.json for tasks that ship without test.json/dev.json.

  The held-out size is ``min(max_records, round(fraction * n_train))`` and at least 1; the records are
  drawn with ``random.Random(seed)`` and removed from the training records.
  """

  fraction: float = 0.1
  max_records: int = 1000
  seed: int = 0

  def __post_init__(self):
    if not 0.0 < self.fraction < 1.0:
      raise DataError(f"HeldOutSplit.fraction must be in (0, 1), got {self.fraction}.")
    if self.max_records < 1:
      raise DataError(f"HeldOutSplit.max_records must be >= 1, got {self.max_records}.")


@dataclasses.dataclass(frozen=True)
class Task:
  """One benchmark task, loaded and validated.

  Attributes:
    name: the name used in orders and results (``"dbpedia"``, or ``"Category/Task"`` for custom folders).
    category: the category folder (``"TC"``, ``"SC"``, ``"NLI"``, ...); it selects the prompt's instruction.
    folder: the task folder (``"dbpedia"``, ``"SST-2"``, ...); the prompt's ``Dataset:`` line.
    labels: the label strings from labels.json, in file order.
    train: training records.
    test: evaluation records (from test.json/dev.json, or held out of train.json).
    test_is_heldout: True when ``test`` was carved out of train.json because the task has no test file.
    skipped: records dropped from the files because they have no gold label (``skip_labels``, e.g. MNLI's "-").
    test_is_dev: True when ``test`` is a dev split carved out of the training records (for choosing
      hyperparameters without looking at the test set), not the task's test set.
  """

  name: str
  category: str
  folder: str
  labels: tuple[str, ...]
  train: tuple[Record, ...]
  test: tuple[Record, ...]
  test_is_heldout: bool
  skipped: int = 0
  test_is_dev: bool = False


# The benchmark's task names (lower case) -> (category folder, task folder).
TASKS: dict[str, tuple[str, str]] = {
    "dbpedia": ("TC", "dbpedia"),
    "amazon": ("SC", "amazon"),
    "yahoo": ("TC", "yahoo"),
    "agnews": ("TC", "agnews"),
    "yelp": ("SC", "yelp"),
    "imdb": ("SC", "IMDB"),
    "sst-2": ("SC", "SST-2"),
    "mnli": ("NLI", "MNLI"),
    "cb": ("NLI", "CB"),
    "rte": ("NLI", "RTE"),
    "qqp": ("QQP", "QQP"),
    "boolqa": ("BoolQA", "BoolQA"),
    "copa": ("COPA", "COPA"),
    "multirc": ("MultiRC", "MultiRC"),
    "wic": ("WiC", "WiC"),
}

# The task orders of O-LoRA / MIGU: 1-3 are the standard 4-task benchmark, 4-6 the 15-task long sequence.
ORDERS: dict[str, tuple[str, ...]] = {
    "1": ("dbpedia", "amazon", "yahoo", "agnews"),
    "2": ("dbpedia", "amazon", "agnews", "yahoo"),
    "3": ("yahoo", "amazon", "agnews", "dbpedia"),
    "4": ("mnli", "cb", "wic", "copa", "qqp", "boolqa", "rte", "imdb", "yelp", "amazon", "sst-2",
          "dbpedia", "agnews", "multirc", "yahoo"),
    "5": ("multirc", "boolqa", "wic", "mnli", "cb", "copa", "qqp", "rte", "imdb", "sst-2", "dbpedia",
          "agnews", "yelp", "amazon", "yahoo"),
    "6": ("yelp", "amazon", "mnli", "cb", "copa", "qqp", "rte", "imdb", "sst-2", "dbpedia", "agnews",
          "yahoo", "multirc", "boolqa", "wic"),
}


# --------------------------------------------------------------------------------------------------
# Naming tasks and orders
# --------------------------------------------------------------------------------------------------


def _known_names() -> str:
  return ", ".join(TASKS) + ' (or a "Category/Task" folder path)'


def resolve_task(name: str) -> TaskRef:
  """Look up a task by benchmark name or folder, case-insensitively.

  ``"SST-2"``, ``"sst-2"`` and ``"SC/SST-2"`` all give the registry task ``sst-2``. Any other
  ``"Category/Task"`` path names a custom folder with the same layout (checked when it is loaded).

  Raises:
    DataError: the name is neither a known task nor a ``Category/Task`` path; the message lists the known names.

  Example:
    >>> resolve_task("IMDB")
    TaskRef(name='imdb', category='SC', folder='IMDB')
    >>> resolve_task("Mine/reviews")
    TaskRef(name='Mine/reviews', category='Mine', folder='reviews')
  """
  if not isinstance(name, str) or not name.strip():
    raise DataError(f"Task name must be a non-empty string, got {name!r}. Known names: {_known_names()}.")
  key = name.strip().strip("/")
  lower = key.lower()
  if lower in TASKS:
    return TaskRef(lower, *TASKS[lower])
  for task_name, (category, folder) in TASKS.items():
    if lower in (folder.lower(), f"{category}/{folder}".lower()):
      return TaskRef(task_name, category, folder)
  parts = key.split("/")
  if len(parts) == 2 and all(p.strip() for p in parts):
    return TaskRef(key, parts[0], parts[1])
  raise DataError(f"Unknown task {name!r}. Known names: {_known_names()}.")


def resolve_order(order: str | Sequence[str]) -> tuple[str, ...]:
  """The task names of a built-in order (``"1"``..``"6"``) or of a list / comma-separated string of tasks.

  Raises:
    DataError: an unknown task (the message lists the known names), an empty order, or a task named twice.

  Example:
    >>> resolve_order("agnews, SST-2,NLI/MNLI")
    ('agnews', 'sst-2', 'mnli')
    >>> len(resolve_order(4))
    15
  """
  if isinstance(order, int) and not isinstance(order, bool):
    order = str(order)
  if isinstance(order, str):
    if order.strip() in ORDERS:
      return ORDERS[order.strip()]
    items = [s for s in order.split(",") if s.strip()]
  else:
    items = list(order)
  if not items:
    raise DataError(f"Empty task order {order!r}. Use one of the built-in orders {', '.join(ORDERS)} or a "
                    f"comma-separated list of tasks from: {_known_names()}.")
  names = tuple(resolve_task(item).name for item in items)
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    raise DataError(f"Task order {order!r} names {', '.join(repeated)} more than once; each task may appear once.")
  return names


# --------------------------------------------------------------------------------------------------
# Reading and validating files
# --------------------------------------------------------------------------------------------------


def _read_json(path: Path):
  if not path.is_file():
    raise DataError(f"Missing file {path}. Each task folder needs train.json and labels.json (and test.json or "
                    "dev.json); point --data-dir / MIGU_DATA_DIR at a complete copy of the benchmark.")
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise DataError(f"Malformed JSON in {path} at line {e.lineno}, column {e.colno}: {e.msg}. "
                    "Fix or re-download the file.") from e
  except UnicodeDecodeError as e:
    raise DataError(f"{path} is not UTF-8 text ({e}). Re-save it as UTF-8 JSON.") from e


def read_labels(path: str | os.PathLike) -> tuple[str, ...]:
  """Read and check a labels.json file: a non-empty JSON list of distinct strings.

  Example:
    >>> import json, tempfile
    >>> p = Path(tempfile.mkdtemp()) / "labels.json"
    >>> _ = p.write_text(json.dumps(["True", "False"]))
    >>> read_labels(p)
    ('True', 'False')
  """
  path = Path(path)
  labels = _read_json(path)
  if not isinstance(labels, list) or not labels:
    raise DataError(f"{path} must be a non-empty JSON list of label strings, got {type(labels).__name__} "
                    f"{str(labels)[:80]!r}.")
  for i, label in enumerate(labels):
    if not isinstance(label, str) or not label:
      raise DataError(f"{path}: entry {i} is {label!r}; every label must be a non-empty string.")
  if len(set(labels)) != len(labels):
    raise DataError(f"{path} lists a label more than once: {labels}. Keep each label once.")
  return tuple(labels)


NO_GOLD_LABEL = "-"  # MNLI's marker for examples whose annotators did not agree (131 of the 7600 in test.json).


def read_records(path: str | os.PathLike, labels: Sequence[str], *, skip_labels: Collection[str] = ()
                 ) -> tuple[Record, ...]:
  """Read and check a data file: a non-empty JSON list of ``{"sentence": str, "label": str}`` objects.

  Every label must be one of ``labels``, except that records labelled with one of ``skip_labels`` (and not in
  ``labels``) are dropped (:func:`load_task` counts them in :attr:`Task.skipped`). Extra keys are ignored.

  Raises:
    DataError: naming the file and the index of the first bad record.

  Example:
    >>> import json, tempfile
    >>> p = Path(tempfile.mkdtemp()) / "train.json"
    >>> _ = p.write_text(json.dumps([{"sentence": "fine", "label": "Good"}, {"sentence": "?", "label": "-"}]))
    >>> read_records(p, ["Good", "Bad"], skip_labels=["-"])
    (Record(sentence='fine', label='Good'),)
  """
  return _read_records(Path(path), labels, skip_labels)[0]


def _read_records(path: Path, labels: Sequence[str], skip_labels: Collection[str]
                  ) -> tuple[tuple[Record, ...], int]:
  data = _read_json(path)
  if not isinstance(data, list):
    raise DataError(f"{path} must be a JSON list of {{\"sentence\", \"label\"}} objects, got a "
                    f"{type(data).__name__}.")
  allowed = set(labels)
  skip = set(skip_labels) - allowed
  records = []
  for i, item in enumerate(data):
    if not isinstance(item, dict):
      raise DataError(f"{path}: record {i} is a {type(item).__name__}, not an object with \"sentence\" and "
                      "\"label\".")
    for key in ("sentence", "label"):
      if key not in item:
        raise DataError(f"{path}: record {i} has no \"{key}\" key (keys: {sorted(item)}). Every record needs "
                        "\"sentence\" and \"label\".")
      if not isinstance(item[key], str):
        raise DataError(f"{path}: record {i} has a non-string \"{key}\": {item[key]!r}.")
    if item["label"] in skip:
      continue
    if item["label"] not in allowed:
      raise DataError(f"{path}: record {i} has label {item['label']!r}, which is not in labels.json "
                      f"{list(labels)}. Fix the record or add the label to labels.json.")
    records.append(Record(item["sentence"], item["label"]))
  if not records:
    raise DataError(f"{path} holds no records{' with a gold label' if data else ' (an empty list)'}. A task needs "
                    "at least one training and one test record; remove the task from the order or fill the file.")
  return tuple(records), len(data) - len(records)


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------


def _by_label(records: Sequence[Record]) -> dict[str, list[int]]:
  groups: dict[str, list[int]] = {}
  for i, r in enumerate(records):
    groups.setdefault(r.label, []).append(i)
  return groups


def sample_per_class(records: Sequence[Record], n_per_class: int, seed: int = 0) -> tuple[Record, ...]:
  """Up to ``n_per_class`` records of each label, drawn with ``random.Random(seed)``, in file order.

  A label with fewer records keeps all of them. The paper trains on 1000 per class; 250 suits CPU runs.

  Example:
    >>> recs = [Record(str(i), "A" if i < 6 else "B") for i in range(8)]
    >>> [r.label for r in sample_per_class(recs, 3, seed=0)]
    ['A', 'A', 'A', 'B', 'B']
  """
  if n_per_class < 1:
    raise DataError(f"n_per_class must be >= 1, got {n_per_class}.")
  rng = random.Random(seed)
  groups = _by_label(records)
  keep: list[int] = []
  for label in sorted(groups):  # sorted: the draw does not depend on which label the file lists first
    idx = groups[label]
    keep.extend(idx if len(idx) <= n_per_class else rng.sample(idx, n_per_class))
  return tuple(records[i] for i in sorted(keep))


def sample_stratified(records: Sequence[Record], max_records: int, seed: int = 0) -> tuple[Record, ...]:
  """At most ``max_records`` records, keeping the label proportions (largest remainder), in file order.

  Used to subsample evaluation sets (``max_test``). Returns all records when there are no more than
  ``max_records``.

  Example:
    >>> recs = [Record(str(i), "A" if i < 75 else "B") for i in range(100)]
    >>> sub = sample_stratified(recs, 20, seed=1)
    >>> len(sub), sum(r.label == "A" for r in sub)
    (20, 15)
  """
  if max_records < 1:
    raise DataError(f"max_records must be >= 1, got {max_records}.")
  if len(records) <= max_records:
    return tuple(records)
  groups = _by_label(records)
  labels = sorted(groups)
  quotas = {l: max_records * len(groups[l]) / len(records) for l in labels}
  counts = {l: int(quotas[l]) for l in labels}
  by_remainder = sorted(labels, key=lambda l: (-(quotas[l] - counts[l]), l))
  for l in by_remainder[:max_records - sum(counts.values())]:
    counts[l] += 1
  rng = random.Random(seed)
  keep = [i for l in labels for i in rng.sample(groups[l], counts[l])]
  return tuple(records[i] for i in sorted(keep))


def split_heldout(records: Sequence[Record], split: HeldOutSplit = HeldOutSplit()
                  ) -> tuple[tuple[Record, ...], tuple[Record, ...]]:
  """Split records into ``(train, heldout)``, disjoint by position, seeded; both keep file order.

  Example:
    >>> recs = [Record(str(i), "A") for i in range(30)]
    >>> train, heldout = split_heldout(recs, HeldOutSplit(fraction=0.1, seed=0))
    >>> len(train), len(heldout), set(train).isdisjoint(heldout)
    (27, 3, True)
  """
  n = len(records)
  if n < 2:
    raise DataError(f"Cannot hold out a test set from {n} training record(s); the task needs at least 2, or "
                    "a test.json.")
  size = max(1, min(split.max_records, round(split.fraction * n), n - 1))
  heldout = set(random.Random(split.seed).sample(range(n), size))
  train = tuple(r for i, r in enumerate(records) if i not in heldout)
  test = tuple(r for i, r in enumerate(records) if i in heldout)
  return train, test


def split_dev(records: Sequence[Record], n_per_class: int, seed: int = 0
              ) -> tuple[tuple[Record, ...], tuple[Record, ...]]:
  """Split records into ``(train, dev)``: ``n_per_class`` records of each label go to ``dev``.

  The dev split is for choosing hyperparameters (the learning rate) without the test set; it is drawn
  with its own stream of ``seed`` and leaves at least one record of each label for training.

  Example:
    >>> recs = [Record(str(i), "A" if i < 6 else "B") for i in range(10)]
    >>> train, dev = split_dev(recs, 2, seed=0)
    >>> len(train), len(dev), set(train).isdisjoint(dev), sorted(r.label for r in dev)
    (6, 4, True, ['A', 'A', 'B', 'B'])
  """
  if n_per_class < 1:
    raise DataError(f"dev_per_class must be >= 1, got {n_per_class}.")
  rng = random.Random(f"dev-{seed}")
  dev: set[int] = set()
  for label, idx in sorted(_by_label(records).items()):
    dev.update(rng.sample(idx, min(n_per_class, len(idx) - 1)))
  return (tuple(r for i, r in enumerate(records) if i not in dev),
          tuple(r for i, r in enumerate(records) if i in dev))


# --------------------------------------------------------------------------------------------------
# Loading a task
# --------------------------------------------------------------------------------------------------


def load_task(data_dir: str | os.PathLike, name: str, *, split: HeldOutSplit = HeldOutSplit(),
              train_per_class: int | None = None, max_test: int | None = None, seed: int = 0,
              skip_labels: Collection[str] = (NO_GOLD_LABEL,), dev_per_class: int | None = None) -> Task:
  """Load, validate and (optionally) subsample one task.

  Reads ``<data_dir>/<category>/<task>/labels.json``, ``train.json`` and ``test.json`` (else ``dev.json``).
  Without either test file, ``split`` carves a held-out test set out of train.json first, so the training
  records never include it, and ``Task.test_is_heldout`` is True.

  Args:
    data_dir: the benchmark folder (see :func:`migu_jax.cl.locate.resolve_data_dir`).
    name: a task name or ``Category/Task`` folder (see :func:`resolve_task`).
    split: how to hold out a test set when there is no test file.
    train_per_class: if set, keep this many training records per label (:func:`sample_per_class`).
    max_test: if set, keep at most this many test records, stratified (:func:`sample_stratified`).
    seed: seed of the two samplings above.
    skip_labels: labels that mark a record without a gold label; such records (unless the label is in
      labels.json) are dropped and counted in ``Task.skipped``. O-LoRA keeps MNLI's 131 "-" test records,
      which no model can answer, so its MNLI accuracy is ours times 7469/7600 (up to 1.7 points lower).
    dev_per_class: if set, carve a dev split of this many records per label out of the training records
      (:func:`split_dev`, before ``train_per_class`` sampling) and evaluate on it instead of the test set
      (``Task.test_is_dev``): for choosing hyperparameters without the test set.

  Returns:
    The validated :class:`Task`.

  Raises:
    DataError: a missing folder or file, malformed JSON, a bad record, or an empty task.
  """
  ref = resolve_task(name)
  folder = Path(data_dir) / ref.category / ref.folder
  if not folder.is_dir():
    raise DataError(f"Task {ref.name!r}: no folder {folder}. Check --data-dir / MIGU_DATA_DIR; it should hold "
                    f"{ref.category}/{ref.folder}/{{train,test,labels}}.json.")
  labels = read_labels(folder / "labels.json")
  train, skipped = _read_records(folder / "train.json", labels, skip_labels)
  test_file = next((folder / f for f in ("test.json", "dev.json") if (folder / f).is_file()), None)
  if test_file is None:
    train, test = split_heldout(train, split)
  else:
    test, skipped_test = _read_records(test_file, labels, skip_labels)
    skipped += skipped_test
  if dev_per_class is not None:
    train, test = split_dev(train, dev_per_class, seed)
  if train_per_class is not None:
    train = sample_per_class(train, train_per_class, seed)
  if max_test is not None:
    test = sample_stratified(test, max_test, seed)
  return Task(name=ref.name, category=ref.category, folder=ref.folder, labels=labels, train=train, test=test,
              test_is_heldout=test_file is None, skipped=skipped, test_is_dev=dev_per_class is not None)
