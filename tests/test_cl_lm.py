"""Continual pre-training (objective "lm"): MLM corruption, the MLM head and causal-LM perplexity against
transformers, MIGU on the LM head, and the runner / CLI on two tiny text domains with exact resume."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from migu_jax.cl import objectives
from tiny_cl import once_per_run

WORDS = {"a": "cat dog bird fish horse mouse".split(), "b": "stock market price bank trade money".split()}


def _tokenizer(kind="bert"):
  from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "</s>"]
  tok.train_from_iterator(WORDS["a"] + WORDS["b"], trainers.WordPieceTrainer(vocab_size=60, special_tokens=specials))
  if kind == "bert":
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
  tok.decoder = decoders.WordPiece()
  return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="</s>")


def _docs(words, n, rng):
  return "".join(" ".join(rng.choice(words, 12)) + "\n" for _ in range(n))


@pytest.fixture(scope="session")
def text_data(tmp_path_factory):
  """Two domains of disjoint vocabularies (G/a, G/b), a general corpus, and a tiny random BERT folder."""
  return Path(once_per_run(tmp_path_factory, "test_cl_lm.text_data", _write_text_data))


def _write_text_data(root: Path) -> str:
  from migu_jax.models import bert, save_pretrained

  rng = np.random.default_rng(0)
  for name, words in WORDS.items():
    (root / "G" / name).mkdir(parents=True)
    (root / "G" / name / "train.txt").write_text(_docs(words, 32, rng))
    (root / "G" / name / "test.txt").write_text(_docs(words, 6, rng))
  (root / "E" / "a-end").mkdir(parents=True)  # a labeled end task for the DAS protocol
  for split, n in (("train", 16), ("test", 8)):
    records = [{"sentence": " ".join(rng.choice(WORDS[k], 6)), "label": {"a": "animal", "b": "money"}[k]}
               for _ in range(n) for k in ("a", "b")]
    (root / "E" / "a-end" / f"{split}.json").write_text(json.dumps(records))
  (root / "E" / "a-end" / "labels.json").write_text(json.dumps(["animal", "money"]))
  (root / "general").mkdir()
  (root / "general" / "test.txt").write_text(_docs(WORDS["a"] + WORDS["b"], 6, rng))
  tok = _tokenizer()
  cfg = bert.Config.of_size("tiny", vocab_size=len(tok), max_position_embeddings=32)
  save_pretrained(bert.BertModel(cfg), bert.params.init_params(cfg), root / "bert", tokenizer=tok)
  return str(root)


def test_mlm_corruption_is_80_10_10_and_split_invariant():
  corrupt = jax.jit(lambda ids, maskable, rows: objectives.mlm_corrupt(jax.random.key(1), ids, maskable, rows,
                                                                        mask_id=1, vocab_size=50))
  ids = jnp.full((64, 256), 7, jnp.int32)
  maskable = jnp.ones_like(ids, bool).at[:, :3].set(False)
  new, chosen = corrupt(ids, maskable, jnp.arange(64))
  frac = float(chosen.mean() / maskable.mean())
  assert 0.14 < frac < 0.16 and not bool(chosen[:, :3].any())
  to_mask = float(((new == 1) & chosen).sum() / chosen.sum())
  kept = float(((new == 7) & chosen).sum() / chosen.sum())  # 10% kept (+ random draws of 7: 1/50 of 10%)
  assert 0.77 < to_mask < 0.83 and 0.08 < kept < 0.13
  half, _ = corrupt(ids[32:], maskable[32:], jnp.arange(32, 64))
  assert bool((half == new[32:]).all())  # rows draw by their index: micro-batches and devices agree


def _hf_masked_lm(kind, tied=True):
  import torch
  from transformers import BertConfig, BertForMaskedLM, RobertaConfig, RobertaForMaskedLM

  torch.manual_seed(0)
  size = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
              tie_word_embeddings=tied)
  model = (BertForMaskedLM(BertConfig(max_position_embeddings=64, **size)) if kind == "bert" else
           RobertaForMaskedLM(RobertaConfig(max_position_embeddings=70, pad_token_id=1, **size)))
  with torch.no_grad():  # biases and LayerNorm away from their 0 / 1 initial values
    for name, p in model.named_parameters():
      if "bias" in name or "LayerNorm" in name or "layer_norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model.eval()


@pytest.mark.parametrize("kind, tied", [("bert", True), ("bert", False), ("roberta", True)])
def test_mlm_head_matches_transformers(tmp_path, kind, tied):
  import torch
  from migu_jax.models.bert import mlm

  hf = _hf_masked_lm(kind, tied)
  hf.save_pretrained(tmp_path)
  model, params, _, loaded = mlm.from_pretrained(str(tmp_path))
  assert loaded and ("decoder" in params["mlm_head"]) == (not tied)
  ids = np.random.default_rng(0).integers(3, 99, (2, 9))
  mask = np.ones((2, 9), np.int64)
  mask[1, 6:] = 0
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  out = np.asarray(model.apply({"params": params}, ids, mask))
  assert np.abs(out - ref)[mask == 1].max() < 1e-4


def test_encoder_without_mlm_head_gets_a_tied_fresh_one(text_data):
  from migu_jax.models.bert import mlm

  model, params, _, loaded = mlm.from_pretrained(str(text_data / "bert"))
  assert not loaded and model.tie_word_embeddings and sorted(params["mlm_head"]) == ["bias", "layer_norm", "transform"]
  assert float(jnp.abs(params["mlm_head"]["bias"]).max()) == 0.0


def test_causal_lm_perplexity_matches_transformers(tmp_path):
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM

  from migu_jax.models import from_pretrained

  tok = _tokenizer("lm")
  torch.manual_seed(0)
  hf = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    tie_word_embeddings=True)).eval()
  hf.save_pretrained(tmp_path)
  model, params, _ = from_pretrained(str(tmp_path))
  objective = objectives.CausalLMObjective(model, tok, objectives.ObjectiveConfig(max_length=16, eval_batch_size=4))
  docs = ["cat dog bird fish horse mouse cat", "stock market price", "bank trade money money bank"]
  blocks = objective.pack(objectives.text_lib.TextDomain("g/d", "g", "d", (), tuple(docs))).test
  assert len(blocks) >= 2 and len(blocks[-1]) < 16  # the short last block counts too
  ours = objective.perplexity({"model": params}, 0, blocks)
  nll, count = 0.0, 0
  with torch.no_grad():
    for b in blocks:
      loss = hf(input_ids=torch.tensor([b]), labels=torch.tensor([b])).loss
      nll, count = nll + float(loss) * (len(b) - 1), count + len(b) - 1
  assert abs(ours - np.exp(nll / count)) / ours < 1e-3


def test_migu_masks_the_tied_lm_head_and_the_transform(text_data):
  import migu_jax as migu
  from migu_jax.cl import methods, optimizers, runner

  cfg = runner.Config(model=str(text_data / "bert"), objective="lm", data_dir=str(text_data), order="G/a",
                      max_length=16, progress=False)
  domain = runner.load_tasks(cfg, 0)[0]
  head = runner._head(cfg, [domain])
  _, model_params, _ = runner.load_model(cfg.model, "lm")
  forward = methods.make_forward(methods.get_method("migu"), cfg, head.model)
  params = {"model": model_params, "head": {}}
  batch = head.train_batch([(0, b) for b in domain.train[:4]])
  loss, mags = jax.jit(lambda p: head.loss(forward, p, batch, rng=jax.random.key(0)))(params)
  assert np.isfinite(float(loss))
  assert mags["model"]["embeddings"]["word_embeddings"]["embedding"].shape == (len(_tokenizer()), 1)
  ones = jax.tree.map(jnp.ones_like, params)
  tx = migu.mask_by_magnitude(0.7, where=optimizers._where(methods.get_method("migu")))
  updates, _ = tx.update(ones, tx.init(params), params, magnitudes=mags)
  for path in (("mlm_head", "transform", "kernel"), ("embeddings", "word_embeddings", "embedding")):
    u = updates["model"]
    for k in path:
      u = u[k]
    kept = np.asarray(u).sum(axis=0 if path[-1] == "kernel" else 1) > 0
    assert 0 < kept.sum() < kept.size  # some output features (vocabulary rows) kept, the rest zeroed


def _cfg(data, out, **changes):
  """The settings of the CLI run below (so its compiled steps are reused), as a Config."""
  from migu_jax.cl import runner

  values = dict(model=str(data / "bert"), objective="lm", data_dir=str(data), order="G/a,G/b", methods=("seqft", "migu"),
                seeds=(0,), max_length=16, batch_size=8, learning_rate=3e-3, train_per_class=None, max_test=None,
                output_dir=str(out), progress=False, magnitude_batches=0, general=str(data / "general"))
  values.update(changes)
  return runner.Config(**values)


@pytest.fixture(scope="session")
def cli_run(text_data, tmp_path_factory):
  """The issue's command on two new text folders: ``(exit code, output folder, printed text)``."""
  code, out, printed = once_per_run(tmp_path_factory, "test_cl_lm.cli_run", lambda out: _run_cli(text_data, out))
  return code, Path(out), printed


def _run_cli(text_data, out):
  import contextlib
  import io

  from migu_jax import cli

  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    code = cli.main(["run", "--model", str(text_data / "bert"), "--objective", "lm", "--data-dir", str(text_data),
                     "--order", "G/a,G/b", "--methods", "seqft,migu", "--seeds", "0", "--max-length", "16",
                     "--batch-size", "8", "--lr", "3e-3", "--output", str(out), "--general", str(text_data / "general"),
                     "--no-progress", "--no-plots", "--set", "max_test=None", "--set", "train_per_class=None",
                     "--set", "magnitude_batches=0"])
  return code, str(out), printed.getvalue()


def test_cli_run_writes_perplexity_matrix_and_training_lowers_it(cli_run):
  code, out, printed = cli_run
  assert code == 0
  results = json.loads((out / "results.json").read_text())
  for run in results["runs"]:
    matrix, initial = np.array(run["matrix"]), np.array(run["initial"])
    assert run["metric"] == "perplexity" and matrix.shape == (2, 2) and initial.shape == (2,)
    assert np.isfinite(matrix).all() and np.isfinite(initial).all() and len(run["general"]) == 3
    assert matrix[0, 0] < initial[0] and matrix[1, 1] < matrix[0, 1]  # training on a domain lowers its perplexity
  seqft, migu = results["runs"]
  assert seqft["matrix"][0] == pytest.approx(migu["matrix"][0], rel=1e-4)  # MIGU's first domain is unmasked
  assert seqft["params_sha256"] != migu["params_sha256"]
  md = (out / "results.md").read_text()
  assert "lower is better" in md and "| migu |" in md and "General PPL" in md
  assert "BWT (PPL increase)" in printed


class Killed(Exception):
  pass


def test_killed_mid_domain_resumes_bit_identical(text_data, tmp_path, cli_run):
  from migu_jax.cl import runner

  reference = json.loads((cli_run[1] / "migu" / "seed_0" / "result.json").read_text())

  def kill(event, info):
    if event == "step" and (info["task"], info["step"]) == (1, 2):
      raise Killed

  cfg = _cfg(text_data, tmp_path, checkpoint_every=2)
  with pytest.raises(Killed):
    runner.run_sequence(cfg, "migu", 0, callbacks=[kill])
  resumed = runner.run_sequence(cfg, "migu", 0)
  assert resumed["steps"][1] > 2  # the kill was mid-domain
  assert resumed["params_sha256"] == reference["params_sha256"]
  assert resumed["matrix"] == reference["matrix"] and resumed["general"] == reference["general"]


def test_end_tasks_fine_tune_a_copy_and_report_accuracy_and_macro_f1(text_data):
  from migu_jax.cl import end_tasks, runner

  cfg = _cfg(text_data, text_data / "unused", end_tasks={"G/a": "E/a-end"}, end_task_train_per_class=8,
             end_task_max_test=8)
  _, model_params, _ = runner.load_model(cfg.model, "lm")
  scores = runner.run_end_tasks(cfg, model_params, 0, ["G/a", "G/b"])
  assert list(scores) == ["G/a"]
  r = scores["G/a"]
  assert (r["task"], r["train_examples"], r["test_examples"], r["steps"]) == ("E/a-end", 16, 8, 2)
  assert 0 <= r["accuracy"] <= 1 and 0 <= r["macro_f1"] <= 1
  assert end_tasks.macro_f1([1, 1], [1, 1], 2) == 0.5  # a label absent from both counts as 0, as sklearn's
  with pytest.raises(ValueError, match="keys among the domains"):
    _cfg(text_data, text_data / "unused", end_tasks={"G/c": "E/a-end"})


def _uncorrupt(inputs, targets, sentinels, eos_id):
  """The original tokens from T5's pair: each sentinel in ``inputs`` replaced by what follows it in ``targets``."""
  spans, current = {}, None
  for t in targets:
    if t in sentinels:
      current = t
      spans[current] = []
    elif t == eos_id:
      break
    else:
      spans[current].append(t)
  out = []
  for t in inputs:
    out.extend(spans[t] if t in sentinels else [t])
  return out


def test_span_corruption_round_trips_at_t5_rates():
  sentinels = list(range(999, 899, -1))
  rng = np.random.default_rng(0)
  lengths = rng.integers(20, 64, 16)
  ids = np.zeros((16, 64), np.int32)
  for b, n in enumerate(lengths):
    ids[b, :n] = rng.integers(2, 800, n)
    ids[b, n - 1] = 1  # a final </s> stays out of the noise
  x, xm, y, ym = map(np.asarray, objectives.span_corrupt(
      jax.random.key(0), jnp.asarray(ids), jnp.asarray(lengths - 1), jnp.arange(16), sentinels=jnp.asarray(sentinels),
      eos_id=1, pad_id=0))
  noise = spans = 0
  for b, n in enumerate(lengths):
    inputs, targets = x[b, :xm[b].sum()].tolist(), y[b, :ym[b].sum()].tolist()
    assert (x[b, xm[b].sum():] == 0).all() and (y[b, ym[b].sum():] == 0).all()  # padding after
    assert targets[-1] == 1 and inputs[-1] == 1  # the decoder ends with </s>; the input keeps its </s>
    assert _uncorrupt(inputs, targets, set(sentinels), eos_id=1) == ids[b, :n].tolist()
    used = [t for t in inputs if t in sentinels]
    assert used == sentinels[:len(used)]  # <extra_id_0>, <extra_id_1>, ... in order
    noise, spans = noise + n - len(inputs) + len(used), spans + len(used)
  assert 0.12 < noise / (lengths - 1).sum() < 0.18 and 2.0 < noise / spans < 4.5  # T5: 15%, mean span 3


def _t5_folder(root: Path) -> Path:
  from migu_jax.models import save_pretrained, t5

  tok = _tokenizer("lm")
  cfg = t5.Config.of_size("tiny", vocab_size=len(tok) + 8, num_layers=1, eos_token_id=tok.eos_token_id, pad_token_id=0)
  save_pretrained(t5.T5ForConditionalGeneration(cfg), t5.params.init_params(cfg), root / "t5", tokenizer=tok)
  return root / "t5"


def test_t5_span_corruption_loss_is_the_decoders_nll_of_the_spans(text_data, tmp_path):
  from migu_jax.cl import runner

  model, params, tok = runner.load_model(str(_t5_folder(tmp_path)), objective="lm")
  objective = objectives.make_objective(model, tok, objectives.ObjectiveConfig(max_length=16))
  assert objective.name == "span_corruption" and objective.sentinels[0] == model.config.vocab_size - 1
  blocks = [tuple(range(5, 5 + n)) for n in (16, 11)]
  batch = objective.train_batch([(0, b) for b in blocks])
  forward = lambda p, *args, rng=None: (model.apply({"params": p}, *args), {})
  loss, _ = objective.loss(forward, params, batch, rng=jax.random.key(3))
  # By hand: the same corruption, the decoder's inputs are the targets shifted right after the start token.
  key = jax.random.fold_in(jax.random.key(3), 0x4d4c4d)
  x, xm, y, ym = objectives.span_corrupt(key, batch["ids"], batch["mask"].sum(-1), batch["row"],
                                         sentinels=objective.sentinels, eos_id=objective.eos_id, pad_id=objective.pad_id)
  dec = np.concatenate([np.zeros((2, 1), np.int32), np.asarray(y)[:, :-1]], 1)
  logp = jax.nn.log_softmax(model.apply({"params": params}, x, xm, dec, ym), -1)
  picked = np.take_along_axis(np.asarray(logp), np.asarray(y)[..., None], -1)[..., 0]
  assert float(loss) == pytest.approx(-(picked * np.asarray(ym)).sum() / np.asarray(ym).sum(), rel=1e-5)


def test_t5_continual_pretraining_runs_and_lowers_perplexity(text_data, tmp_path):
  from migu_jax.cl import runner

  cfg = _cfg(text_data, tmp_path / "out", model=str(_t5_folder(tmp_path)), methods=("migu",), general=None)
  run = runner.run_experiment(cfg, plots=False)["runs"][0]
  matrix, initial = np.array(run["matrix"]), np.array(run["initial"])
  assert np.isfinite(matrix).all() and matrix[0, 0] < initial[0] and matrix[1, 1] < matrix[0, 1]


@pytest.mark.heavy
def test_continual_pretraining_with_scanned_layers_bfloat16_and_remat(text_data, tmp_path):
  """Llama's causal LM with its layers scanned trains like the unrolled run (MIGU masks per layer); bfloat16
  compute with remat (Llama and BERT's masked LM) keeps float32 parameters and learns."""
  from migu_jax.cl import runner
  from migu_jax.models import save_pretrained
  from migu_jax.models.llama import modeling as llama, params as llama_params

  tok = _tokenizer("lm")
  cfg = llama.Config.of_size("tiny", num_hidden_layers=2, vocab_size=len(tok), max_position_embeddings=32)
  save_pretrained(llama.LlamaForCausalLM(cfg), llama_params.init_params(cfg, seed=1), tmp_path / "llama", tokenizer=tok)
  runs = {"unrolled": ("llama", {}), "scanned": ("llama", dict(scan_layers=True)),
          "llama_bf16": ("llama", dict(dtype="bfloat16", remat=True)), "bert_bf16": ("bert", dict(dtype="bfloat16"))}
  results = {}
  for name, (model, changes) in runs.items():
    folder = tmp_path / model if model == "llama" else text_data / model
    c = _cfg(text_data, tmp_path / name, model=str(folder), methods=("migu",), general=None, **changes)
    results[name] = runner.run_sequence(c, "migu", 0)
  np.testing.assert_allclose(results["scanned"]["matrix"], results["unrolled"]["matrix"], rtol=1e-4)
  for name in ("llama_bf16", "bert_bf16"):
    matrix, initial = np.array(results[name]["matrix"]), np.array(results[name]["initial"])
    assert np.isfinite(matrix).all() and matrix[0, 0] < initial[0] and matrix[1, 1] < matrix[0, 1], name
  model, params, _ = runner.load_model(str(tmp_path / "llama"), "lm", "bfloat16", True, True)
  assert model.config.dtype == jnp.bfloat16 and model.config.scan_layers
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))


def test_end_tasks_again_on_a_finished_runs_checkpoint(text_data, tmp_path):
  # `migu-jax eval RUN --end-tasks`: the run's own settings give result.json's end tasks again (from the newest
  # checkpoint, without repeating the pre-training); other settings change only the end tasks.
  import contextlib
  import io

  from migu_jax import cli
  from migu_jax.cl import runner

  cfg = _cfg(text_data, tmp_path, methods=("migu",), end_tasks={"G/a": "E/a-end"}, end_task_train_per_class=8,
             end_task_max_test=8)
  result = runner.run_sequence(cfg, "migu", 0)
  run_dir = runner.run_folder(cfg, "migu", 0)
  ran = []  # the same command again finds the end tasks in the newest checkpoint and does not repeat them
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(runner, "run_end_tasks", lambda *args: ran.append(args))
    assert runner.run_sequence(cfg, "migu", 0)["end_tasks"] == result["end_tasks"] and not ran
  again = runner.end_tasks_checkpoint(run_dir, progress=False)
  assert again["end_tasks"] == result["end_tasks"] and again["checkpoint"]["task"] == 2  # after both domains
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    assert cli.main(["eval", str(run_dir), "--end-tasks", "--tasks", "G/a", "--end-task-epochs", "2",
                     "--no-progress"]) == 0
  longer = json.loads((run_dir / "end_tasks.json").read_text())
  assert longer["settings"]["end_task_epochs"] == 2 and longer["end_tasks"]["G/a"]["steps"] == 2 * again["end_tasks"]["G/a"]["steps"]
  assert "E/a-end (G/a)" in printed.getvalue()
  with pytest.raises(SystemExit, match="no end task for"):
    cli.main(["eval", str(run_dir), "--end-tasks", "--tasks", "G/b"])
  with pytest.raises(ValueError, match="not end-task settings"):
    runner.end_tasks_checkpoint(run_dir, learning_rate=1.0)


def test_learning_rates_chosen_on_dev_documents_by_perplexity(text_data, tmp_path):
  # tune_rates with objective="lm": dev documents carved out of each domain's training file (never its test
  # file, disjoint from what the run trains on), the rate with the lowest final average dev perplexity chosen.
  from migu_jax.cl import runner, text, tune

  dev = text.load_domain(text_data, "G/a", seed=0, dev_docs=5)
  full = text.load_domain(text_data, "G/a", seed=0)
  assert dev.test_is_dev and len(dev.test) == 5 and len(dev.train) == len(full.train) - 5
  assert set(dev.test) <= set(full.train) and not set(dev.test) & set(dev.train) and not set(dev.test) & set(full.test)
  with pytest.raises(text.DataError, match="dev_docs"):
    text.load_domain(text_data, "G/a", dev_docs=32)
  cfg = _cfg(text_data, tmp_path, methods=("seqft",), tune_rates=(3e-4, 3e-3), dev_per_class=5, general=None)
  results = runner.run_experiment(cfg, plots=False)
  tuning = json.loads((tmp_path / "tuning.json").read_text())
  dev_ppl = tuning["dev_average_perplexity"]["seqft"]
  assert tuning["chosen"]["seqft"] == tune.pick({float(r): p for r, p in dev_ppl.items()}, lower_is_better=True)
  assert dev_ppl["0.003"] != dev_ppl["0.0003"]
  assert [r["method"] for r in results["runs"]] == list(tune.tuned_methods(("seqft",), tuning["chosen"], 3e-3))
