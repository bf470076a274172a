"""Benchmark data: task names and orders, loading the local CL_Benchmark copy, sampling, prompts, bad data."""
import collections
import json
from pathlib import Path

import pytest

from migu_jax.cl import data, hub, locate, prompts
from migu_jax.cl.data import DataError, HeldOutSplit, Record
from tiny_cl import DATA as BENCH  # the repository's ../shared/data (a partial copy of O-LoRA's CL_Benchmark)
from tiny_cl import needs_data as needs_bench

NO_TEST_FILE = {"yelp", "imdb", "multirc"}  # absent from the local copy: evaluated on a held-out split


def write_task(root: Path, train, *, test=None, labels=("A", "B"), category="Cat", folder="toy") -> Path:
  """Write a task folder; each argument is a JSON-able value, or a str written as-is, or None to omit."""
  d = root / category / folder
  d.mkdir(parents=True, exist_ok=True)
  for name, value in (("train.json", train), ("test.json", test), ("labels.json", labels)):
    if value is not None:
      (d / name).write_text(value if isinstance(value, str) else json.dumps(list(value)), encoding="utf-8")
  return d


def recs(*pairs):
  return [{"sentence": s, "label": l} for s, l in pairs]


GOOD = recs(("one", "A"), ("two", "B"), ("three", "A"), ("four", "B"))

# ------------------------------------------------------------------------------------------ names, orders


def test_registry_lookup_is_case_insensitive_and_accepts_folders():
  assert data.resolve_task("SST-2") == ("sst-2", "SC", "SST-2")
  assert data.resolve_task("sc/sst-2") == ("sst-2", "SC", "SST-2")
  assert data.resolve_task("DBpedia") == ("dbpedia", "TC", "dbpedia")
  assert data.resolve_task("BoolQA") == ("boolqa", "BoolQA", "BoolQA")
  assert data.resolve_task("Mine/reviews") == ("Mine/reviews", "Mine", "reviews")  # custom folder


def test_builtin_orders():
  assert data.resolve_order("1") == ("dbpedia", "amazon", "yahoo", "agnews")
  assert data.resolve_order("2") == ("dbpedia", "amazon", "agnews", "yahoo")
  assert data.resolve_order("3") == ("yahoo", "amazon", "agnews", "dbpedia")
  assert data.resolve_order(4)[:4] == ("mnli", "cb", "wic", "copa")
  for k in ("4", "5", "6"):  # the long sequences: each of the 15 tasks once
    assert sorted(data.resolve_order(k)) == sorted(data.TASKS)


def test_custom_orders():
  assert data.resolve_order("agnews, SST-2,NLI/MNLI") == ("agnews", "sst-2", "mnli")
  assert data.resolve_order(["Yelp", "Mine/reviews"]) == ("yelp", "Mine/reviews")


def test_unknown_task_in_order_lists_known_names():
  with pytest.raises(DataError, match="Unknown task 'agnws'") as e:
    data.resolve_order("dbpedia,agnws")
  assert all(name in str(e.value) for name in data.TASKS)


@pytest.mark.parametrize("order, match", [("", "Empty task order"), ([], "Empty task order"),
                                          ("agnews,AGNEWS", "more than once")])
def test_bad_orders(order, match):
  with pytest.raises(DataError, match=match):
    data.resolve_order(order)

# ------------------------------------------------------------------------------------------ locating data


def test_resolve_data_dir_flag_then_env(tmp_path, monkeypatch):
  flag, env = tmp_path / "flag", tmp_path / "env"
  flag.mkdir()
  env.mkdir()
  monkeypatch.setenv(data.DATA_DIR_ENV, str(env))
  assert locate.resolve_data_dir(str(flag)) == flag
  assert locate.resolve_data_dir(None) == env
  with pytest.raises(DataError, match="--data-dir points at .*not a folder"):
    locate.resolve_data_dir(str(tmp_path / "missing"))


def test_resolve_data_dir_offline_says_how_to_point_at_data(tmp_path, monkeypatch):
  monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # hub_reachable() answers False without touching the network
  with pytest.raises(DataError) as e:
    locate.resolve_data_dir(None, cache_dir=tmp_path / "cache")
  msg = str(e.value)
  assert "--data-dir" in msg and data.DATA_DIR_ENV in msg and "shared/data/CL_Benchmark" in msg


def test_resolve_data_dir_reuses_a_built_cache(tmp_path, monkeypatch):
  monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  write_task(tmp_path / "cache", GOOD)
  assert locate.resolve_data_dir(None, tasks=["Cat/toy"], cache_dir=tmp_path / "cache") == tmp_path / "cache"

# ------------------------------------------------------------------------------------------ real tasks


@needs_bench
@pytest.mark.parametrize("name", sorted(data.TASKS))
def test_every_local_task_loads(name):
  task = data.load_task(BENCH, name)
  category, folder = data.TASKS[name]
  assert (task.name, task.category, task.folder) == (name, category, folder)
  assert task.labels == tuple(json.loads((BENCH / category / folder / "labels.json").read_text()))
  assert task.train and task.test
  assert task.test_is_heldout == (name in NO_TEST_FILE)
  assert {r.label for r in task.train + task.test} <= set(task.labels)


@needs_bench
def test_agnews_complete():
  task = data.load_task(BENCH, "agnews")
  assert task.labels == ("World", "Sports", "Business", "Science or Technology")
  assert (len(task.train), len(task.test), task.test_is_heldout) == (4000, 7600, False)
  assert collections.Counter(r.label for r in task.train) == {
      "World": 968, "Sports": 1040, "Business": 1000, "Science or Technology": 992}


@needs_bench
def test_mnli_records_without_gold_label_are_skipped_and_counted():
  task = data.load_task(BENCH, "mnli")  # test.json: 131 of 7600 records are labelled "-" (no gold label)
  assert (len(task.train), len(task.test), task.skipped) == (3000, 7469, 131)
  with pytest.raises(DataError, match=r"MNLI[/\\]test\.json: record 76 has label '-'"):
    data.load_task(BENCH, "mnli", skip_labels=())


def test_skip_labels_on_synthetic_task(tmp_path):
  write_task(tmp_path, GOOD + recs(("?", "-")), test=recs(("x", "A"), ("y", "-"), ("z", "-")))
  task = data.load_task(tmp_path, "Cat/toy")
  assert (len(task.train), len(task.test), task.skipped) == (4, 1, 3)
  write_task(tmp_path, GOOD, test=recs(("y", "-")))
  with pytest.raises(DataError, match="holds no records with a gold label"):
    data.load_task(tmp_path, "Cat/toy")
  write_task(tmp_path, GOOD + recs(("?", "-")), labels=("A", "B", "-"))  # "-" listed: a real label, kept
  assert data.load_task(tmp_path, "Cat/toy").skipped == 0


@needs_bench
def test_yelp_heldout_split_is_disjoint_and_seeded():
  full = data.read_records(BENCH / "SC/yelp/train.json", data.read_labels(BENCH / "SC/yelp/labels.json"))
  assert len(full) == 5000
  task = data.load_task(BENCH, "yelp")  # default: 10% capped at 1000 -> 500 held out
  assert task.test_is_heldout
  assert (len(task.train), len(task.test)) == (4500, 500)
  assert set(task.train).isdisjoint(task.test)  # the 5000 yelp sentences are all distinct
  assert collections.Counter(task.train + task.test) == collections.Counter(full)
  assert data.load_task(BENCH, "yelp").test == task.test  # same seed, same split
  other = data.load_task(BENCH, "yelp", split=HeldOutSplit(seed=1))
  assert other.test != task.test and set(other.train).isdisjoint(other.test)
  capped = data.load_task(BENCH, "yelp", split=HeldOutSplit(fraction=0.5, max_records=300))
  assert (len(capped.train), len(capped.test)) == (4700, 300)


@needs_bench
def test_per_class_sampling_counts_and_reproducibility():
  task = data.load_task(BENCH, "agnews", train_per_class=250, seed=3)
  assert collections.Counter(r.label for r in task.train) == {label: 250 for label in task.labels}
  assert data.load_task(BENCH, "agnews", train_per_class=250, seed=3).train == task.train
  assert data.load_task(BENCH, "agnews", train_per_class=250, seed=4).train != task.train
  full = data.load_task(BENCH, "agnews")
  assert set(task.train) <= set(full.train)
  assert task.test == full.test  # the test set is untouched without max_test


@needs_bench
def test_per_class_sampling_keeps_all_of_a_small_class():
  cb = data.load_task(BENCH, "cb")  # train: entailment 115, contradiction 119, neutral 16
  sampled = data.sample_per_class(cb.train, 50, seed=0)
  assert collections.Counter(r.label for r in sampled) == {"entailment": 50, "contradiction": 50, "neutral": 16}


@needs_bench
def test_max_test_is_stratified_and_seeded():
  task = data.load_task(BENCH, "agnews", max_test=400, seed=0)  # the test file has 1900 per label
  assert collections.Counter(r.label for r in task.test) == {label: 100 for label in task.labels}
  assert data.load_task(BENCH, "agnews", max_test=400, seed=0).test == task.test
  assert len(task.train) == 4000


def test_sampling_on_synthetic_records():
  records = [Record(f"s{i}", "A" if i % 4 else "B") for i in range(40)]  # 30 A, 10 B
  sampled = data.sample_per_class(records, 12, seed=0)
  assert collections.Counter(r.label for r in sampled) == {"A": 12, "B": 10}
  assert list(sampled) == [r for r in records if r in sampled]  # file order kept
  sub = data.sample_stratified(records, 8, seed=0)
  assert collections.Counter(r.label for r in sub) == {"A": 6, "B": 2}
  assert data.sample_stratified(records, 100) == tuple(records)

# ------------------------------------------------------------------------------------------ prompts


def test_prompt_format_exact():
  task = data.Task(name="sst-2", category="SC", folder="SST-2", labels=("Good", "Bad"), train=(), test=(),
                   test_is_heldout=False)
  expected = ("Task:SC\n"
              "Dataset:SST-2\n"
              "What is the sentiment of the following paragraph? Choose one from the option.\n"
              "Option: Good, Bad \n"
              "Text: a gorgeous film . \n"
              "Answer:")
  assert prompts.build_prompt(task, "Text: a gorgeous film . ") == expected


@needs_bench
def test_prompt_for_a_real_nli_record():
  task = data.load_task(BENCH, "mnli")
  expected = ("Task:NLI\n"
              "Dataset:MNLI\n"
              'What is the logical relationship between the "sentence 1" and the "sentence 2"? '
              "Choose one from the option.\n"
              "Option: neutral, entailment, contradiction \n"
              "sentence 1: You are not being rude.\nsentence 2: You think before you speak.\n"
              "Answer:")
  assert prompts.build_prompt(task, task.train[0].sentence) == expected


def test_instructions():
  assert prompts.instruction_for("COPA") == ("Which choice best explains or follows from the premise? "
                                             "Choose one from the option.\n")
  assert prompts.instruction_for("wic") == prompts.INSTRUCTIONS["WiC"]
  assert prompts.instruction_for("Mine") == "Choose one from the option.\n"
  categories = {category for category, _ in data.TASKS.values()}
  assert categories == set(prompts.INSTRUCTIONS)
  assert all(text.endswith("Choose one from the option.\n") for text in prompts.INSTRUCTIONS.values())

# ------------------------------------------------------------------------------------------ custom / bad data


def test_custom_folder_with_test_file(tmp_path):
  write_task(tmp_path, GOOD, test=recs(("five", "B")), category="Mine", folder="reviews")
  task = data.load_task(tmp_path, "Mine/reviews")
  assert (task.name, task.category, task.folder, task.labels) == ("Mine/reviews", "Mine", "reviews", ("A", "B"))
  assert task.train == tuple(Record(r["sentence"], r["label"]) for r in GOOD)
  assert task.test == (Record("five", "B"),) and not task.test_is_heldout


def test_dev_json_is_used_when_test_json_is_absent(tmp_path):
  d = write_task(tmp_path, GOOD)
  (d / "dev.json").write_text(json.dumps(recs(("dev", "A"))))
  task = data.load_task(tmp_path, "Cat/toy")
  assert task.test == (Record("dev", "A"),) and not task.test_is_heldout


def test_missing_task_folder(tmp_path):
  with pytest.raises(DataError, match=r"no folder .*Cat[/\\]absent"):
    data.load_task(tmp_path, "Cat/absent")


@pytest.mark.parametrize("missing", ["train.json", "labels.json"])
def test_missing_file(tmp_path, missing):
  d = write_task(tmp_path, GOOD, test=GOOD)
  (d / missing).unlink()
  with pytest.raises(DataError, match=f"Missing file .*{missing}"):
    data.load_task(tmp_path, "Cat/toy")


def test_malformed_json_names_line_and_column(tmp_path):
  write_task(tmp_path, '[{"sentence": "a", "label": "A"},\n {"sentence": "b" "label": "A"}]')
  with pytest.raises(DataError, match=r"Malformed JSON in .*train\.json at line 2, column 19"):
    data.load_task(tmp_path, "Cat/toy")


@pytest.mark.parametrize("bad_record, match", [
    ({"label": "A"}, r'record 1 has no "sentence"'),
    ({"sentence": "x"}, r'record 1 has no "label"'),
    ({"sentence": "x", "label": "C"}, r"record 1 has label 'C', which is not in labels.json \['A', 'B'\]"),
    ("just text", r"record 1 is a str, not an object"),
    ({"sentence": 3, "label": "A"}, r'record 1 has a non-string "sentence"'),
])
def test_bad_record_names_file_and_index(tmp_path, bad_record, match):
  write_task(tmp_path, GOOD[:1] + [bad_record] + GOOD[1:])
  with pytest.raises(DataError, match=r"train\.json: " + match):
    data.load_task(tmp_path, "Cat/toy")


def test_bad_record_in_test_file(tmp_path):
  write_task(tmp_path, GOOD, test=recs(("x", "A"), ("y", "Z")))
  with pytest.raises(DataError, match=r"test\.json: record 1 has label 'Z'"):
    data.load_task(tmp_path, "Cat/toy")


@pytest.mark.parametrize("train, test", [([], None), ([], GOOD), (GOOD, [])])
def test_empty_task(tmp_path, train, test):
  write_task(tmp_path, train, test=test)
  with pytest.raises(DataError, match="holds no records"):
    data.load_task(tmp_path, "Cat/toy")


def test_single_record_cannot_be_split(tmp_path):
  write_task(tmp_path, GOOD[:1])
  with pytest.raises(DataError, match="at least 2"):
    data.load_task(tmp_path, "Cat/toy")


@pytest.mark.parametrize("labels, match", [([], "non-empty JSON list"), (["A", "A"], "more than once"),
                                           (["A", 1], "entry 1")])
def test_bad_labels_file(tmp_path, labels, match):
  write_task(tmp_path, GOOD, labels=labels)
  with pytest.raises(DataError, match=match):
    data.load_task(tmp_path, "Cat/toy")


def test_data_error_is_a_value_error():
  assert issubclass(DataError, ValueError)

# ------------------------------------------------------------------------------------------ hub table (offline)


class _AnyRow(dict):
  def __missing__(self, key):
    return "x"


def test_hub_sources_cover_every_task_with_consistent_labels():
  assert set(hub.SOURCES) == set(data.TASKS)
  for name, source in hub.SOURCES.items():
    assert sorted(source.label_of) == sorted(source.labels), name
    if BENCH.is_dir():
      category, folder = data.TASKS[name]
      assert source.labels == data.read_labels(BENCH / category / folder / "labels.json"), name


@needs_bench
@pytest.mark.parametrize("name, prefix", [
    ("dbpedia", "Title: x\nText: x\n"), ("yelp", "Text: "), ("sst-2", "Text: "),
    ("mnli", "sentence 1: x\nsentence 2: x"), ("cb", "sentence 1: x\nsentence 2: x"),
    ("rte", "sentence 1: x\nsentence 2: x"), ("qqp", "first sentence: x\nsecond sentence: x"),
    ("boolqa", "question: x\npassage: x"), ("multirc", "paragraph: x\nquestion: x\ncandidate answer: x"),
    ("wic", "word: x\nx\nx"), ("copa", 'Which sentence is the x of "x"? Choose one between A and B.\nA: x\nB: x'),
])
def test_hub_sentence_formats_follow_the_local_files(name, prefix):
  converted = hub.SOURCES[name].sentence(_AnyRow())
  assert converted == prefix or (converted.startswith(prefix) and name in ("yelp", "sst-2"))
  category, folder = data.TASKS[name]
  local = json.loads((BENCH / category / folder / "train.json").read_text())[0]["sentence"]
  head = prefix.split("x")[0]
  assert local.startswith(head), (name, local[:60])


def test_build_from_hub_converts_and_writes_a_loadable_task(tmp_path, monkeypatch):
  datasets = pytest.importorskip("datasets")
  rows = {"train": {"sentence": ["a fine film . ", "dull . ", "great . "], "label": [1, 0, 1], "idx": [0, 1, 2]},
          "validation": {"sentence": ["meh . ", "hidden . "], "label": [0, -1], "idx": [0, 1]}}
  calls = []

  def fake_load_dataset(path, config, split):
    calls.append((path, config, split))
    return datasets.Dataset.from_dict(rows[split])

  monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
  hub.build_from_hub(tmp_path, ["SST-2"])
  assert calls == [("nyu-mll/glue", "sst2", "train"), ("nyu-mll/glue", "sst2", "validation")]
  task = data.load_task(tmp_path, "sst-2")
  assert task.labels == ("Good", "Bad")
  assert task.train == (Record("Text: a fine film . ", "Good"), Record("Text: dull . ", "Bad"),
                        Record("Text: great . ", "Good"))
  assert task.test == (Record("Text: meh . ", "Bad"),)  # the hidden (-1) label is dropped


def test_build_from_hub_download_failure_is_a_data_error(tmp_path, monkeypatch):
  datasets = pytest.importorskip("datasets")

  def offline(*args, **kwargs):
    raise ConnectionError("no route to host")

  monkeypatch.setattr(datasets, "load_dataset", offline)
  with pytest.raises(DataError, match=r"Could not download nyu-mll/glue/rte \(train\) for task 'rte'.*--data-dir"):
    hub.build_from_hub(tmp_path, ["rte"])
  with pytest.raises(DataError, match="no Hugging Face source"):
    hub.build_from_hub(tmp_path, ["Mine/reviews"])


def test_hub_yahoo_format_matches_the_benchmark():
  row = {"question_title": "Why?", "question_content": "Really, why?", "best_answer": "Because."}
  assert hub.SOURCES["yahoo"].sentence(row) == "Title: Why?\nQuestion: Really, why?\nAnswer: Because.\n"
  row["question_content"] = ""  # the benchmark then shows the title as the question
  assert hub.SOURCES["yahoo"].sentence(row) == "Question: Why?\nAnswer: Because.\n"
