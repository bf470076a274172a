"""Text domains: reading txt / jsonl, held-out test split, clear errors, packing into blocks."""

import json

import pytest

from migu_jax.cl import text
from migu_jax.cl.data import DataError


def _domain(root, name, **files):
  folder = root / name
  folder.mkdir(parents=True)
  for filename, content in files.items():
    (folder / filename.replace("_", ".")).write_text(content)
  return folder


def test_txt_and_jsonl_domains_load(tmp_path):
  _domain(tmp_path, "news/wire", train_txt="a b\n\n  c d \n", test_txt="e\n")
  _domain(tmp_path, "web/pages", train_jsonl='{"text": "x y"}\n\n{"text": "z", "id": 3}\n',
          test_jsonl=json.dumps({"text": "w"}) + "\n")
  wire, pages = text.load_domain(tmp_path, "news/wire"), text.load_domain(tmp_path, "web/pages")
  assert (wire.name, wire.train, wire.test, wire.test_is_heldout) == ("news/wire", ("a b", "c d"), ("e",), False)
  assert (pages.train, pages.test) == (("x y", "z"), ("w",))
  assert text.is_text_domain(tmp_path, "news/wire") and not text.is_text_domain(tmp_path, "news/none")


def test_missing_test_file_holds_out_a_disjoint_tenth(tmp_path):
  _domain(tmp_path, "g/d", train_txt="".join(f"doc {i}\n" for i in range(40)))
  d = text.load_domain(tmp_path, "g/d", seed=3)
  assert d.test_is_heldout and len(d.test) == 4 and len(d.train) == 36 and not set(d.test) & set(d.train)
  assert text.load_domain(tmp_path, "g/d", seed=3) == d
  small = text.load_domain(tmp_path, "g/d", max_train=5, max_test=2, seed=3)
  assert len(small.train) == 5 and len(small.test) == 2 and set(small.train) <= set(d.train)


@pytest.mark.parametrize("files, match", [
    ({"train_jsonl": '{"text": "ok"}\n{"text": 3}\n'}, r"train.jsonl, line 2: expected an object with a string"),
    ({"train_jsonl": '{"text": "ok"}\nnot json\n'}, r"train.jsonl, line 2: not valid JSON"),
    ({"train_txt": "\n  \n"}, r"train.txt holds no documents"),
    ({"test_txt": "only a test\n"}, r"no train.txt or train.jsonl"),
])
def test_bad_files_name_the_file_and_line(tmp_path, files, match):
  _domain(tmp_path, "g/d", **files)
  with pytest.raises(DataError, match=match):
    text.load_domain(tmp_path, "g/d")


def test_bad_names_and_folders(tmp_path):
  with pytest.raises(DataError, match="not a 'group/domain' folder path"):
    text.load_domain(tmp_path, "lonely")
  with pytest.raises(DataError, match="is not a folder.*build_text_domains"):
    text.load_domain(tmp_path, "g/missing")
  with pytest.raises(DataError, match="General corpus"):
    text.load_corpus(tmp_path / "nowhere")
  from migu_jax.cl import runner
  with pytest.raises(ValueError, match="needs objective='lm'"):
    runner.Config(general=str(tmp_path))
  with pytest.raises(ValueError, match="objective='lm' is evaluated by perplexity"):
    runner.Config(objective="lm", also_eval=("options",))


def test_pack_keeps_every_token_in_order():
  docs = [[10, 11, 12, 13, 14], [20], [30, 31]]
  blocks = text.pack(docs, 5, prefix=[1], suffix=[2], separator=[3])
  assert all(len(b) <= 5 and b[0] == 1 and b[-1] == 2 for b in blocks)
  assert [t for b in blocks for t in b[1:-1]] == [10, 11, 12, 13, 14, 3, 20, 3, 30, 31, 3]
  assert text.pack(docs, 4, separator=[0])[0] == (10, 11, 12, 13)
  with pytest.raises(ValueError, match="no room"):
    text.pack(docs, 2, prefix=[1], suffix=[2])


def test_general_corpus_prefers_the_test_file(tmp_path):
  folder = _domain(tmp_path, "general/wiki", train_txt="t\n", test_txt="u\nv\n")
  corpus = text.load_corpus(folder)
  assert corpus.name == "general" and corpus.test == ("u", "v") and corpus.train == ()
