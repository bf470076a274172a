"""The reference's semantics (issue 9): tied LM heads, padding, exact match, COPA, epochs, dev split, tuning."""

import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import migu_jax as migu
from migu_jax.cl import data as data_lib
from migu_jax.cl import heads as heads_lib
from migu_jax.cl import methods as methods_lib
from migu_jax.cl import optimizers as optimizers_lib
from migu_jax.cl import tune as tune_lib
from migu_jax.cl.data import Record
from migu_jax.cl.prompts import build_prompt
from migu_jax.models import llama, t5
from tiny_cl import tiny_config


def _lm_loss(model, params, ids, **kw):
  logits, mags = migu.apply_with_magnitudes(model, {"params": params}, ids, **kw)
  return jax.nn.log_softmax(logits).mean(), (mags, logits)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_tied_head_statistic_is_sum_abs_logits_per_vocabulary_entry(family):
  ids = jnp.asarray(np.random.default_rng(0).integers(3, 100, (2, 5)), jnp.int32)
  if family == "llama":
    cfg = llama.Config.of_size("tiny")
    model = llama.LlamaForCausalLM(cfg)
    params = llama.params.init_params(cfg)
    args = (ids,)
    embed = "embed"
  else:
    cfg = t5.Config.of_size("tiny", tie_word_embeddings=True, scale_decoder_outputs=True)
    model = t5.T5ForConditionalGeneration(cfg)
    params = t5.params.init_params(cfg)
    args = (ids, jnp.ones_like(ids), ids, jnp.ones_like(ids))
    embed = "shared"
  logits, mags = migu.apply_with_magnitudes(model, {"params": params}, *args)
  stat = mags[embed]["embedding"]
  assert stat.shape == (cfg.vocab_size, 1)
  np.testing.assert_allclose(stat[:, 0], np.abs(np.asarray(logits, np.float32)).sum((0, 1)), rtol=1e-5)
  _, untied = migu.apply_with_magnitudes(model, {"params": params}, *args, tied_heads=False)
  assert embed not in untied


def test_tied_embedding_rows_masked_by_default_and_left_out_on_request(tmp_path):
  from migu_jax.models import from_pretrained, save_pretrained

  cfg = llama.Config.of_size("tiny", vocab_size=100)
  save_pretrained(llama.LlamaForCausalLM(cfg), llama.params.init_params(cfg), tmp_path / "tied")
  model, params, _ = from_pretrained(str(tmp_path / "tied"))
  assert model.config.tie_word_embeddings
  ids = jnp.asarray(np.random.default_rng(1).integers(0, 100, (4, 7)), jnp.int32)

  def loss_fn(p):
    logits, mags = migu.apply_with_magnitudes(model, {"params": p}, ids)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean(), mags

  (_, mags), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  assert np.all(np.abs(np.asarray(grads["embed"]["embedding"])).sum(1) > 0)
  tx = migu.mask_by_magnitude(0.7)
  masked, _ = jax.jit(lambda g, m: tx.update(g, tx.init(params), params, magnitudes=m))(grads, mags)
  rows = np.abs(np.asarray(masked["embed"]["embedding"])).sum(1) > 0
  assert rows.mean() == pytest.approx(0.3, abs=0.02)
  # The kept rows are those whose logits are largest in sum |y| (hand computation).
  n = np.asarray(mags["embed"]["embedding"])[:, 0]
  np.testing.assert_array_equal(rows, n >= np.quantile(n, 0.7))
  kept, _ = migu.mask_by_magnitude(0.7, where=migu.is_kernel).update(grads, tx.init(params), params,
                                                                     magnitudes=mags)
  np.testing.assert_array_equal(kept["embed"]["embedding"], grads["embed"]["embedding"])


def test_runner_where_includes_tied_embedding_unless_disabled():
  cfg = SimpleNamespace(mask_targets=(), mask_tied_embedding=True)
  migu_method = methods_lib.get_method("migu")
  where = optimizers_lib._where(migu_method, optimizers_lib.mask_patterns(cfg), True)
  assert where(("model", "embed", "embedding"), None)
  assert not optimizers_lib._where(migu_method, (), False)(("model", "embed", "embedding"), None)
  assert not optimizers_lib._where(methods_lib.get_method("grad_mask"), (), True)(("model", "embed", "embedding"), None)
  head_only = optimizers_lib._where(migu_method, optimizers_lib.mask_patterns(SimpleNamespace(mask_targets=("head",))))
  assert head_only(("model", "embed", "embedding"), None)
  assert not head_only(("model", "layers_0", "mlp", "up_proj", "kernel"), None)


def test_train_batches_padded_to_longest_row_rounded_up():
  cfg = heads_lib.HeadConfig(max_length=128, pad_multiple=8)
  assert [heads_lib._train_length(n, cfg) for n in (5, 8, 9, 127, 128)] == [8, 8, 16, 128, 128]
  buckets = heads_lib.HeadConfig(max_length=128, padding="buckets", length_buckets=(32, 64))
  assert heads_lib._train_length(9, buckets) == 32


def test_exact_match_normalisation_as_the_reference():
  assert heads_lib.normalize_answer(" Science or Technology. ") == "science or technology"
  assert heads_lib.normalize_answer("very  negative!") == heads_lib.normalize_answer("Very negative")
  assert heads_lib.normalize_answer("the Film") != heads_lib.normalize_answer("Film")  # articles kept


def test_copa_prompt_reference_and_instruction():
  copa = SimpleNamespace(category="COPA", folder="COPA", labels=("A", "B"))
  ref = build_prompt(copa, "It rained. Choose one between A and B.")
  assert ref == "Task:COPA\nDataset:COPA\nIt rained. Choose one between A and B.\nAnswer:"
  assert "Option: A, B" in build_prompt(copa, "x", copa="instruction")
  with pytest.raises(ValueError, match="copa"):
    build_prompt(copa, "x", copa="none")


def test_reference_epochs_per_task():
  cfg = SimpleNamespace(order="5", epochs=1, task_epochs=None)
  assert methods_lib.task_epochs(cfg, "wic") == 2 and methods_lib.task_epochs(cfg, "mnli") == 1
  assert methods_lib.task_epochs(SimpleNamespace(order="6", epochs=1, task_epochs=None), "mnli") == 2
  assert methods_lib.task_epochs(SimpleNamespace(order="5", epochs=1, task_epochs={}), "wic") == 1
  assert methods_lib.task_epochs(SimpleNamespace(order="1", epochs=3, task_epochs={"yahoo": 2}), "yahoo") == 2


def test_dev_split_is_carved_from_training_records_only(tmp_path):
  folder = tmp_path / "SC" / "toy"
  folder.mkdir(parents=True)
  train = [{"sentence": f"train {i}", "label": "Good" if i % 2 else "Bad"} for i in range(40)]
  test = [{"sentence": f"test {i}", "label": "Good" if i % 2 else "Bad"} for i in range(10)]
  (folder / "train.json").write_text(json.dumps(train))
  (folder / "test.json").write_text(json.dumps(test))
  (folder / "labels.json").write_text(json.dumps(["Good", "Bad"]))
  task = data_lib.load_task(tmp_path, "SC/toy", dev_per_class=5, train_per_class=8)
  assert task.test_is_dev and len(task.test) == 10 and len(task.train) == 16
  assert all(r.sentence.startswith("train") for r in task.test)
  assert set(task.train).isdisjoint(task.test)


def test_method_rate_specs_and_choice():
  assert methods_lib.split_spec("migu@1e-4") == ("migu", 1e-4)
  with pytest.raises(ValueError, match="positive learning rate"):
    methods_lib.split_spec("migu@fast")
  cfg = SimpleNamespace(replace=lambda **kw: kw)
  assert methods_lib.method_config(cfg, "seqft@3e-5") == {"learning_rate": 3e-5}
  assert tune_lib.pick({1e-4: 0.5, 3e-4: 0.6}) == 3e-4
  assert tune_lib.tuned_methods(("seqft",), {"seqft": 1e-4}, 1e-4) == ("seqft@0.0001",)


@pytest.mark.heavy
def test_tuned_experiment_runs_methods_at_dev_chosen_and_fixed_rates(tiny_models, tmp_path):
  from migu_jax.cl import runner

  # The sizes of test_cl_runner.py's language-model runs (the same programs compile once).
  cfg = tiny_config(tiny_models["llama"], tmp_path, methods=("seqft", "migu"), tune_rates=(1e-3, 3e-3),
                    order="amazon,agnews", max_test=4, max_length=64, length_buckets=(64,),
                    learning_rate=1e-4, dev_per_class=1, eval_mode="generate", also_eval=("options",),
                    magnitude_batches=0)
  results = runner.run_experiment(cfg, plots=False)
  chosen = results["tuning"]["chosen"]
  assert set(chosen) == {"seqft", "migu"} and set(chosen.values()) <= {1e-3, 3e-3}
  dev = json.loads((tmp_path / "tune" / "results.json").read_text())
  assert all(r["eval_mode"] == "generate" and not r["also"] for r in dev["runs"])
  assert set(results["comparison"]) == {f"{m}@{chosen[m]:g}" for m in chosen} | {"seqft@0.0001", "migu@0.0001"}
  for run in results["runs"]:
    also = run["also"]["options"]
    assert len(also["matrix"]) == 2 and len(also["initial"]) == 2
    assert json.loads((tmp_path / run["method"] / "seed_0" / "config.json").read_text())["learning_rate"] == \
        methods_lib.split_spec(run["method"])[1]
  assert set(results["comparison_also"]["options"]) == set(results["comparison"])
  assert "Learning rates chosen on a dev split" in (tmp_path / "results.md").read_text()
