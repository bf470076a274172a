"""Tiny continual-learning set-up shared by the runner tests: the benchmark copy, tiny random models whose
tokenizers are trained on its sentences, and a runner config that trains in seconds.

The ``tiny_models`` fixture (tests/conftest.py) builds the models once per test run with
:func:`build_tiny_models`; tests that read the benchmark themselves mark it with :data:`needs_data`.
:func:`once_per_run` shares a costly fixture's result between pytest-xdist's workers.
"""

import json
import os
import shutil
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[2] / "shared/data/CL_Benchmark"
TASKS = "dbpedia,amazon,agnews"
NO_DATA = f"benchmark data not found at {DATA} (the repository's ../shared/data/CL_Benchmark)"

needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=NO_DATA)


def _tokenizer(texts, kind="bert"):
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "</s>"]
  tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=250, special_tokens=specials))
  if kind == "bert":
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
  # Language models: no special tokens around a text; </s> ends an answer.
  from tokenizers import decoders
  tok.decoder = decoders.WordPiece()
  return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="</s>")


def _texts():
  from migu_jax.cl import data
  from migu_jax.cl.prompts import INSTRUCTIONS

  texts = ["Task:TC Dataset:dbpedia amazon agnews Option: Answer:"] + list(INSTRUCTIONS.values())
  for name in TASKS.split(","):
    task = data.load_task(DATA, name, train_per_class=4, max_test=8)
    texts += [r.sentence for r in task.train + task.test] + list(task.labels)
  return texts


def build_tiny_models(root: Path) -> dict[str, str]:
  """Folders of tiny random models with tokenizers under ``root``: ``{"bert": ..., "llama": ..., "t5": ...}``."""
  import jax
  import jax.numpy as jnp

  from migu_jax.models import bert, llama, save_pretrained, t5

  def save(name, model, tokenizer, *inputs):  # one compiled init (op by op, it compiles every initializer)
    params = jax.jit(model.init)(jax.random.key(0), *inputs)["params"]
    save_pretrained(model, params, root / name, tokenizer=tokenizer)
    return str(root / name)

  texts = _texts()
  ids = jnp.ones((1, 2), jnp.int32)
  tok = _tokenizer(texts, "bert")
  cfg = bert.Config.of_size("tiny", vocab_size=len(tok), max_position_embeddings=32)
  out = {"bert": save("bert", bert.BertModel(cfg), tok, ids)}
  lm_tok = _tokenizer(texts, "lm")
  eos = lm_tok.eos_token_id
  lcfg = llama.Config.of_size("tiny", vocab_size=len(lm_tok), num_hidden_layers=1, eos_token_id=eos,
                              pad_token_id=0, bos_token_id=None)
  out["llama"] = save("llama", llama.LlamaForCausalLM(lcfg), lm_tok, ids)
  tcfg = t5.Config.of_size("tiny", vocab_size=len(lm_tok), num_layers=1, eos_token_id=eos, pad_token_id=0)
  out["t5"] = save("t5", t5.T5ForConditionalGeneration(tcfg), lm_tok, ids, None, ids)
  return out


def tiny_config(model_folder, output_dir, **overrides):
  """A runner Config on the tiny model ``model_folder``: 3 tasks, 2 records per label, 8 test records."""
  from migu_jax.cl import runner

  values = dict(model=model_folder, data_dir=str(DATA), order=TASKS, train_per_class=2, max_test=8,
                methods=("migu",), seeds=(0,), max_length=32, length_buckets=(32,), batch_size=8,
                eval_batch_size=16, learning_rate=3e-3, output_dir=str(output_dir), progress=False,
                checkpoint_every=2, magnitude_batches=1)
  values.update(overrides)
  return runner.Config(**values)


def resumable_config(models, output_dir, **overrides):
  """The resume tests' config on the tiny BERT: dbpedia's 56 records are 7 steps per epoch x 2 epochs, amazon
  and agnews 2 x 2 steps; a checkpoint every 3 steps."""
  values = dict(train_per_class=4, epochs=2, checkpoint_every=3, magnitude_batches=0)
  return tiny_config(models["bert"], output_dir, **{**values, **overrides})


def once_per_run(tmp_path_factory, name: str, compute):
  """``compute(folder)``'s result (JSON data), computed once per test run in a new ``folder``.

  Under pytest-xdist the first worker to ask computes it in the workers' common temporary folder and the others
  read it from there (waiting meanwhile), so a costly session fixture runs once, not once per worker.
  """
  if "PYTEST_XDIST_WORKER" not in os.environ:
    return json.loads(json.dumps(compute(tmp_path_factory.mktemp(name))))  # the same values either way
  from filelock import FileLock

  shared = tmp_path_factory.getbasetemp().parent  # one per run, shared by its workers
  result = shared / f"{name}.json"
  with FileLock(f"{result}.lock"):
    if not result.exists():
      folder = shared / name
      shutil.rmtree(folder, ignore_errors=True)  # what a worker that failed here left
      folder.mkdir()
      result.write_text(json.dumps(compute(folder)))
  return json.loads(result.read_text())
