"""The continual-learning runner on a tiny random BERT (and Llama, T5) and a few records per task of the shared
benchmark (the models and the config: tests/tiny_cl.py, the ``tiny_models`` fixture: tests/conftest.py)."""

import json

import numpy as np
import pytest

from tiny_cl import DATA, tiny_config


def test_three_tasks_give_full_matrix_and_metrics(tiny_models, tmp_path):
  from migu_jax.cl import runner

  cfg = tiny_config(tiny_models["bert"], tmp_path, methods=("seqft", "migu"))
  results = runner.run_experiment(cfg)
  assert [r["method"] for r in results["runs"]] == ["seqft", "migu"]
  for run in results["runs"]:
    assert run["tasks"] == ["dbpedia", "amazon", "agnews"]
    assert np.array(run["matrix"]).shape == (3, 3) and len(run["initial"]) == 3
    assert all(0.0 <= a <= 1.0 for row in run["matrix"] for a in row)
    assert set(run["metrics"]) >= {"average_accuracy", "backward_transfer", "forward_transfer",
                                   "average_forgetting"}
    assert run["metrics"]["average_accuracy"] == pytest.approx(np.mean(run["matrix"][-1]))
    assert run["test_examples"] == [8, 8, 8] and run["heldout_tasks"] == []
    assert run["eval_mode"] == "options" and len(run["params_sha256"]) == 64
  # MIGU trains the first task unmasked: it matches SeqFT after task 1, then departs from it.
  seqft, migu = results["runs"]
  assert seqft["initial"] == migu["initial"]
  assert seqft["final_loss"][0] == pytest.approx(migu["final_loss"][0], rel=1e-5)
  assert seqft["params_sha256"] != migu["params_sha256"]
  saved = json.loads((tmp_path / "results.json").read_text())
  assert set(saved["comparison"]) == {"seqft", "migu"} and "versions" in saved
  assert "| migu |" in (tmp_path / "results.md").read_text()
  assert (tmp_path / "plots" / "matrix_migu_seed0.png").stat().st_size > 0
  assert (tmp_path / "plots" / "overlap.png").exists() and (tmp_path / "plots" / "magnitudes_initial.png").exists()


@pytest.mark.parametrize("method", ["replay", "migu_replay", "lora", "migu_lora", "random", "migu_strict"])
def test_method_variants_run(tiny_models, tmp_path, method):
  from migu_jax.cl import runner

  cfg = tiny_config(tiny_models["bert"], tmp_path, methods=(method,), magnitude_batches=0, replay_fraction=0.25)
  run = runner.run_sequence(cfg, method, 0)
  assert np.array(run["matrix"]).shape == (3, 3)
  assert all(np.isfinite(loss) for loss in run["final_loss"])
  if method == "replay":  # a quarter of each earlier task's 28 / 10 training records mixed in
    assert run["steps"] == [3, 2, 2]


def test_lora_trains_only_the_adapters(tiny_models, tmp_path):
  import jax
  from migu_jax.cl import checkpoint, methods, optimizers, runner

  cfg = tiny_config(tiny_models["bert"], tmp_path, order="dbpedia", methods=("migu_lora",), magnitude_batches=0)
  runner.run_sequence(cfg, "migu_lora", 0)
  _, base, _ = runner.load_model(cfg.model)
  saved = checkpoint.RunCheckpoints(runner.run_folder(cfg, "migu_lora", 0) / "checkpoints")
  meta = saved.read_meta()
  assert meta["task"] == 1
  method = methods.get_method("migu_lora")
  like = methods.init_params(method, cfg, base, {"log_scale": np.float32(0)}, jax.random.key(0))
  tx = optimizers.make_optimizer(method, cfg)
  state, _ = saved.restore({"params": like, "opt_state": tx.init(like), "key": jax.random.key(0)})
  same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), state["params"]["model"], base)
  assert all(jax.tree.leaves(same)), "the frozen model moved"
  assert any(np.abs(np.asarray(b)).sum() > 0 for b in jax.tree.leaves(state["params"]["lora"]))


def test_migu_mask_switch_is_injected_not_recompiled(tmp_path):
  import jax

  from migu_jax.cl import methods, optimizers

  cfg = tiny_config("unused-model", tmp_path)
  method = methods.get_method("migu")
  tx = optimizers.make_optimizer(method, cfg)
  params = {"model": {"Dense_0": {"kernel": np.ones((2, 3), np.float32)}}, "head": {}}
  first = optimizers.start_task(method, cfg, tx, params, 0)
  later = optimizers.start_task(method, cfg, tx, params, 1)
  flags = [s.hyperparams["enabled"] for s in (first[0], later[0])]
  assert [bool(f) for f in flags] == [False, True] and flags[0].shape == ()

  def signature(state):  # what a jitted step's cache is keyed on: the tree and each leaf's shape and dtype
    return jax.tree.structure(state), [(np.shape(x), np.result_type(x)) for x in jax.tree.leaves(state)]

  assert signature(first) == signature(later)  # the switch is a value: the masked tasks reuse the program


def test_one_compilation_serves_every_task(tiny_models, tmp_path):
  from migu_jax.cl import methods, runner

  cfg = tiny_config(tiny_models["bert"], tmp_path, magnitude_batches=0)  # one length bucket
  runner.run_sequence(cfg, "migu", 0)
  head = runner._head(cfg, runner.load_tasks(cfg, 0))
  _, step, _ = runner._step_and_placement(cfg, methods.get_method("migu"), 0, head)
  assert step.compiled._cache_size() == 1  # unmasked first task, masked later ones, replayed rows: one program


def test_data_order_is_a_pure_function_of_seed_task_epoch():
  from migu_jax.cl import batching

  steps = [batching.batch_indices(20, 8, 0, 1, k) for k in range(4)]  # 2 steps per epoch
  assert np.array_equal(steps[0], batching.batch_indices(20, 8, 0, 1, 0))
  assert len(set(np.concatenate(steps[:2]).tolist())) == 16  # no repeats within an epoch
  assert not np.array_equal(steps[0], batching.batch_indices(20, 8, 1, 1, 0))
  assert not np.array_equal(steps[0], batching.batch_indices(20, 8, 0, 2, 0))
  assert batching.batch_indices(3, 8, 0, 0, 0).shape == (8,)  # fewer records than a batch: cycled


def test_unknown_method_task_and_config_key_are_clear_errors(tiny_models, tmp_path):
  from migu_jax.cl import runner
  from migu_jax.cl.data import DataError

  with pytest.raises(ValueError, match="Unknown method 'ewc'.*seqft, migu"):
    tiny_config(tiny_models["bert"], tmp_path, methods=("ewc",))
  with pytest.raises(DataError, match="Unknown task 'nosuchtask'"):
    runner.run_sequence(tiny_config(tiny_models["bert"], tmp_path, order="dbpedia,nosuchtask"), "migu", 0)
  with pytest.raises(ValueError, match=r"Unknown config key\(s\) \['learning_rat'\]"):
    runner.Config.from_dict({"learning_rat": 1e-3})
  with pytest.raises(ValueError, match="micro_batches"):
    tiny_config(tiny_models["bert"], tmp_path, micro_batches=3)


def test_micro_batches_accepted(tiny_models, tmp_path):
  from migu_jax.cl import runner

  cfg = tiny_config(tiny_models["bert"], tmp_path, order="amazon", micro_batches=2, magnitude_batches=0)
  assert np.array(runner.run_sequence(cfg, "migu", 0)["matrix"]).shape == (1, 1)


@pytest.mark.parametrize("family,eval_mode", [("llama", "options"), ("llama", "generate"),
                                              ("t5", "options"), ("t5", "generate")])
def test_language_model_heads(tiny_models, tmp_path, family, eval_mode):
  from migu_jax.cl import runner

  cfg = tiny_config(tiny_models[family], tmp_path, order="amazon,agnews", eval_mode=eval_mode, max_test=4,
                    magnitude_batches=0, max_length=64, length_buckets=(64,))
  run = runner.run_sequence(cfg, "migu", 0)
  assert run["eval_mode"] == eval_mode
  assert np.array(run["matrix"]).shape == (2, 2)
  assert all(np.isfinite(loss) for loss in run["final_loss"])
  speed = run["speed"]  # the runner's own speed: compiling steps counted apart from the timed ones
  assert speed["compile_s"] > 0 and speed["train_tokens_per_s"] > 0 and speed["eval_tokens_per_s"] > 0
  assert speed["train_tokens"] > 0 and speed["eval_tokens"] == 2 * sum(  # every test set, after each task
      runner.example_tokens(runner._head(cfg, runner.load_tasks(cfg, 0)), [(j, r) for r in task.test])
      for j, task in enumerate(runner.load_tasks(cfg, 0)))


def test_causal_lm_loss_covers_answer_tokens_only(tiny_models):
  from migu_jax.cl import heads, runner
  from migu_jax.cl.data import load_task

  model, _, tok = runner.load_model(tiny_models["llama"])
  task = load_task(DATA, "agnews", train_per_class=1)
  head = heads.make_head(None, model, tok, [task], heads.HeadConfig(max_length=64, length_buckets=(64,)))
  record = task.train[0]
  batch = head.train_batch([(0, record)])
  answer = [int(i) for i, m in zip(batch["ids"][0], batch["loss_mask"][0]) if m]
  assert answer == head.answer(record.label) and answer[-1] == tok.eos_token_id
  assert tok.decode(answer[:-1]).strip() == record.label.lower()  # the tiny tokenizer lower-cases


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_option_scores_are_answer_log_likelihoods(tiny_models, family):
  import jax

  from migu_jax.cl import heads, runner
  from migu_jax.cl.data import load_task

  model, params, tok = runner.load_model(tiny_models[family])
  task = load_task(DATA, "agnews", train_per_class=1, max_test=2)
  head = heads.make_head(None, model, tok, [task], heads.HeadConfig(max_length=64, length_buckets=(64,)))
  record, label = task.test[0], task.labels[1]
  batch = head._scoring_batch(0, [(record, label)])
  score = float(head._score(params, batch)[0])
  # By hand: the model's log-probabilities of the option's tokens (no end-of-sequence), summed.
  option = head._label_tokens(label)
  if family == "llama":
    n = int(batch["mask"][0].sum())
    logp = jax.nn.log_softmax(model.apply({"params": params}, batch["ids"][:1, :n]), -1)[0]
    expected = sum(float(logp[n - len(option) - 1 + i, t]) for i, t in enumerate(option))
  else:
    dec = np.array([[head.start_id] + option[:-1]])
    logp = jax.nn.log_softmax(model.apply({"params": params}, batch["ids"][:1], batch["mask"][:1], dec), -1)[0]
    expected = sum(float(logp[i, t]) for i, t in enumerate(option))
  assert score == pytest.approx(expected, rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_options_scored_from_one_prompt_pass_equal_the_pairwise_scores(tiny_models, family):
  from migu_jax.cl import heads, runner
  from migu_jax.cl.data import load_task

  model, params, tok = runner.load_model(tiny_models[family])
  task = load_task(DATA, "agnews", train_per_class=1, max_test=3)
  cfg = heads.HeadConfig(max_length=512, length_buckets=(512,), eval_batch_size=4)
  head = heads.make_head(None, model, tok, [task], cfg)
  records = task.test[:3]
  longest = max(len(head._label_tokens(label)) for label in task.labels)
  assert len(task.labels) >= 4 and all(  # no prompt is truncated, so both paths see the same prompt
      len(head.prompts.prompt(0, r.sentence, 10**6)) + head.n_special + longest < cfg.max_length for r in records)
  cached = np.asarray(head._option_scores(params, 0, records))
  pairwise = head._pairwise_option_scores(params, 0, records)
  assert cached.shape == (3, len(task.labels))
  np.testing.assert_allclose(cached, pairwise, rtol=1e-4, atol=1e-4)
  assert head.correct({"model": params}, 0, records) == int(sum(
      task.labels[k] == r.label for k, r in zip(pairwise.argmax(1), records)))


def test_a_max_length_beyond_the_position_table_is_an_error(tiny_models, tmp_path):
  from migu_jax.cl import runner

  cfg = tiny_config(tiny_models["bert"], tmp_path, max_length=64, length_buckets=(64,))  # the tiny BERT has 32
  with pytest.raises(ValueError, match=r"max_length=64 is longer than the 32 positions .*--max-length 32"):
    runner.run_sequence(cfg, "migu", 0)
