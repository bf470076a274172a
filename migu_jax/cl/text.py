"""Unlabeled text domains for continual pre-training: locating, reading, validating and packing.

A domain is a folder ``<data_dir>/<group>/<domain>/`` holding

* ``train.txt`` and ``test.txt``: one document per line (blank lines are skipped), or
* ``train.jsonl`` and ``test.jsonl``: one JSON object per line with a ``"text"`` string.

A domain without a test file is evaluated on a seeded held-out tenth of its training documents (at most
1000), disjoint from the ones it trains on (:attr:`TextDomain.test_is_heldout`). A run names domains as
``group/domain`` (``--order news/agnews,reviews/yelp``).

Documents are tokenized and packed (:func:`pack`): the token stream of the documents, each followed by a
separator (BERT's ``[SEP]``, a causal LM's end-of-sequence), is cut into blocks of ``block_size`` tokens
with the model's special tokens around each block (BERT: ``[CLS] ... [SEP]``). The last, shorter block is
kept, so every held-out token is evaluated.

With a network, :func:`domain_from_hub` writes a domain folder from a Hugging Face dataset's text column.

Example:
  >>> import tempfile
  >>> from pathlib import Path
  >>> root = Path(tempfile.mkdtemp())
  >>> (root / "news" / "wire").mkdir(parents=True)
  >>> _ = (root / "news" / "wire" / "train.txt").write_text("one doc\\n\\nanother doc\\n")
  >>> _ = (root / "news" / "wire" / "test.txt").write_text("held out\\n")
  >>> d = load_domain(root, "news/wire")
  >>> d.name, d.train, d.test, d.test_is_heldout
  ('news/wire', ('one doc', 'another doc'), ('held out',), False)
  >>> pack([[5, 6, 7], [8]], 4, prefix=[1], suffix=[2], separator=[3])
  [(1, 5, 6, 2), (1, 7, 3, 2), (1, 8, 3, 2)]
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path

from migu_jax.cl.data import DataError

SPLIT_FILES = {"train": ("train.txt", "train.jsonl"), "test": ("test.txt", "test.jsonl")}
"""The files a domain's split may come in, in order of preference."""


@dataclasses.dataclass(frozen=True)
class TextDomain:
  """One text domain: its documents, or (after :func:`pack_domain`) its token blocks.

  The fields the runner reads are those of :class:`migu_jax.cl.data.Task` (``name``, ``train``, ``test``,
  ``test_is_heldout``), so a domain goes where a task goes.

  Attributes:
    name: ``"group/domain"``.
    group, folder: the two folders.
    train, test: documents (str), or token blocks (tuples of ids) once packed.
    test_is_heldout: the test documents were held out of the training file (no test file).
    documents: how many documents each split had before packing (train, test).
  """

  name: str
  group: str
  folder: str
  train: tuple
  test: tuple
  test_is_heldout: bool = False
  documents: tuple[int, int] = (0, 0)
  labels: tuple[str, ...] = ()
  skipped: int = 0
  test_is_dev: bool = False


def split_name(name: str) -> tuple[str, str]:
  """``"group/domain"`` -> ``("group", "domain")``; anything else is a DataError naming the form."""
  parts = str(name).strip().strip("/").split("/")
  if len(parts) != 2 or not all(p.strip() for p in parts):
    raise DataError(f"Text domain {name!r} is not a 'group/domain' folder path; name domains as in "
                    "--order news/agnews,reviews/yelp (folders <data_dir>/<group>/<domain>/train.txt).")
  return parts[0], parts[1]


def split_file(folder: Path, split: str) -> Path | None:
  """The file of ``split`` ("train" or "test") in a domain folder, or None."""
  for name in SPLIT_FILES[split]:
    if (folder / name).is_file():
      return folder / name
  return None


def is_text_domain(root: str | Path, name: str) -> bool:
  """Whether ``<root>/<name>`` is a text domain folder (it has train.txt or train.jsonl)."""
  try:
    group, domain = split_name(name)
  except DataError:
    return False
  return split_file(Path(root) / group / domain, "train") is not None


def read_documents(path: str | Path) -> list[str]:
  """The documents of a ``.txt`` (one per line) or ``.jsonl`` (``{"text": ...}`` per line) file.

  Raises:
    DataError: an unreadable file, a line that is not a JSON object with a string ``"text"``, or no
      documents at all; the message names the file and line.
  """
  path = Path(path)
  try:
    lines = path.read_text(encoding="utf-8").splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(f"{path}: cannot be read as UTF-8 text ({e}). Write one document per line in UTF-8.") from None
  docs = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    if path.suffix == ".jsonl":
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path}, line {number}: not valid JSON ({e.msg}). Each line must be one object such as "
                        '{"text": "..."}.') from None
      if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        raise DataError(f"{path}, line {number}: expected an object with a string \"text\" field, got "
                        f"{str(obj)[:80]!r}.")
      text = obj["text"]
    else:
      text = line
    if text.strip():
      docs.append(text.strip())
  if not docs:
    raise DataError(f"{path} holds no documents. Put one document per line (train.txt) or one "
                    '{"text": ...} object per line (train.jsonl).')
  return docs


def _sample(docs: Sequence[str], limit: int | None, seed: int) -> list[str]:
  if limit is None or len(docs) <= limit:
    return list(docs)
  picks = sorted(random.Random(seed).sample(range(len(docs)), limit))
  return [docs[i] for i in picks]


def load_domain(root: str | Path, name: str, *, max_train: int | None = None, max_test: int | None = None,
                seed: int = 0, dev_docs: int | None = None) -> TextDomain:
  """A domain's documents: at most ``max_train`` training and ``max_test`` test documents (seeded sample).

  ``dev_docs``: evaluate on that many documents carved out of the *training* file instead of the test
  documents (``test_is_dev``; for choosing a learning rate), trained on by no run of the same seed.

  Raises:
    DataError: no such folder, no train file, or a bad file (see :func:`read_documents`).
  """
  group, folder_name = split_name(name)
  folder = Path(root) / group / folder_name
  if not folder.is_dir():
    raise DataError(f"Text domain {name!r}: {folder} is not a folder. Create it with train.txt and test.txt (one "
                    "document per line), or build domains with experiments/build_text_domains.py.")
  train_file = split_file(folder, "train")
  if train_file is None:
    raise DataError(f"Text domain {name!r}: {folder} has no train.txt or train.jsonl (files there: "
                    f"{sorted(p.name for p in folder.iterdir())}).")
  train = read_documents(train_file)
  test_file = split_file(folder, "test")
  heldout = test_file is None
  if heldout:
    if len(train) < 2:
      raise DataError(f"{train_file}: one document and no test file; add test.txt or more documents.")
    n = min(1000, max(1, round(0.1 * len(train))))
    held = set(random.Random(seed).sample(range(len(train)), n))
    test = [d for i, d in enumerate(train) if i in held]
    train = [d for i, d in enumerate(train) if i not in held]
  else:
    test = read_documents(test_file)
  if dev_docs:
    if len(train) <= dev_docs:
      raise DataError(f"{train_file}: {len(train)} documents, not enough to hold out dev_docs={dev_docs} for "
                      "tuning; lower Config.dev_per_class.")
    held = set(random.Random(f"dev/{seed}").sample(range(len(train)), dev_docs))
    test = [d for i, d in enumerate(train) if i in held]
    train = [d for i, d in enumerate(train) if i not in held]
  train, test = _sample(train, max_train, seed), _sample(test, max_test, seed)
  return TextDomain(f"{group}/{folder_name}", group, folder_name, tuple(train), tuple(test), heldout,
                    (len(train), len(test)), test_is_dev=bool(dev_docs))


def load_corpus(folder: str | Path, *, max_docs: int | None = None, seed: int = 0) -> TextDomain:
  """A general held-out corpus (``--general``): the documents of a folder's test file (or, without one, its
  train file), at most ``max_docs`` (seeded sample), as the ``test`` split of a domain named ``"general"``.

  Raises:
    DataError: not a folder, or no test/train file in it.
  """
  folder = Path(folder)
  if not folder.is_dir():
    raise DataError(f"General corpus {str(folder)!r} is not a folder (--general / config.general); give a folder "
                    "holding test.txt or test.jsonl (one document per line).")
  path = split_file(folder, "test") or split_file(folder, "train")
  if path is None:
    raise DataError(f"General corpus {folder} has no test.txt, test.jsonl, train.txt or train.jsonl.")
  docs = _sample(read_documents(path), max_docs, seed)
  return TextDomain("general", folder.parent.name, folder.name, (), tuple(docs), False, (0, len(docs)))


def pack(token_docs: Sequence[Sequence[int]], block_size: int, *, prefix: Sequence[int] = (),
         suffix: Sequence[int] = (), separator: Sequence[int] = ()) -> list[tuple[int, ...]]:
  """Token blocks of at most ``block_size``: ``prefix + stream[i:i + n] + suffix``, the stream being every
  document followed by ``separator``; the last block may be shorter.

  Raises:
    ValueError: the special tokens leave no room for text in a block.
  """
  room = block_size - len(prefix) - len(suffix)
  if room < 1:
    raise ValueError(f"pack: block_size={block_size} leaves no room for text beside {len(prefix) + len(suffix)} "
                     "special tokens; raise max_length.")
  stream = [t for doc in token_docs for t in (*doc, *separator)]
  return [tuple(prefix) + tuple(stream[i:i + room]) + tuple(suffix) for i in range(0, len(stream), room)]


def pack_domain(domain: TextDomain, encode: Callable[[list[str]], list[list[int]]], block_size: int,
                **special) -> TextDomain:
  """``domain`` with its documents tokenized by ``encode`` and packed into blocks (see :func:`pack`)."""
  blocks = {s: tuple(pack(encode(list(getattr(domain, s))), block_size, **special)) for s in ("train", "test")}
  return dataclasses.replace(domain, **blocks)


def domain_from_hub(out: str | Path, name: str, dataset: str, *, text_column: str = "text", config: str | None = None,
                    train_split: str = "train", test_split: str = "test", max_train: int | None = 10000,
                    max_test: int | None = 1000) -> Path:
  """Writes ``<out>/<group>/<domain>/{train,test}.jsonl`` from a Hugging Face dataset's ``text_column``.

  Needs a network and the ``datasets`` package; offline, it fails with a DataError that says so.

  Returns:
    The domain folder.
  """
  from migu_jax.cl import hub
  group, domain = split_name(name)
  if not hub.hub_reachable():
    raise DataError(f"domain_from_hub({dataset!r}): the Hugging Face hub is not reachable. Without a network, "
                    f"write {Path(out) / group / domain}/train.txt and test.txt yourself (one document per line).")
  import datasets
  folder = Path(out) / group / domain
  folder.mkdir(parents=True, exist_ok=True)
  for split, limit in ((train_split, max_train), (test_split, max_test)):
    rows = datasets.load_dataset(dataset, config, split=split)
    if text_column not in rows.column_names:
      raise DataError(f"{dataset} ({split}) has no column {text_column!r}; its columns: {rows.column_names}.")
    texts = [t for t in rows[text_column][:limit] if isinstance(t, str) and t.strip()]
    target = folder / ("train.jsonl" if split == train_split else "test.jsonl")
    target.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
  return folder


__all__ = ["SPLIT_FILES", "TextDomain", "domain_from_hub", "is_text_domain", "load_corpus", "load_domain", "pack",
           "pack_domain", "read_documents", "split_file", "split_name"]
