"""Evaluation on the training mesh: the parameters stay where training placed them (FSDP: sharded, never
gathered to one device), each evaluation batch is padded to a multiple of the data axis and split over it,
and every evaluation mode gives the one-device numbers.

On 8 virtual CPU devices (tests/conftest.py) with the tiny random models (tests/tiny_cl.py), meshes (8,) and
(4, 2) (data x model), ``sharding="fsdp"``. ``eval_batch_size=6`` does not divide by the data axis, so every
batch carries filler rows. Tolerance: option scores and perplexities agree to 1e-5 relative (float32; the
partitioned program sums in another order); predictions, generated tokens and accuracies are equal.
"""

import jax
import numpy as np
import pytest

from tiny_cl import tiny_config

MESHES = [(8,), (4, 2)]


def _config(folder, out, mesh_shape=None, **overrides):
  values = dict(order="amazon,agnews", eval_batch_size=6, max_test=8, dropout=False, magnitude_batches=0)
  if mesh_shape:
    values.update(mode="mesh", mesh_shape=mesh_shape, sharding="fsdp")
  return tiny_config(folder, out, **{**values, **overrides})


def _evaluation(cfg, tasks=None):
  """``(head, plain parameters)`` of ``cfg``, the parameters placed as its train step places them."""
  from migu_jax.cl import methods, runner

  tasks = runner.load_tasks(cfg, 0) if tasks is None else tasks
  head = runner._head(cfg, tasks)
  method = methods.get_method("seqft")
  _, _, placed = runner._step_and_placement(cfg, method, 0, head)
  _, model_params, _ = runner.run_model(cfg)
  params = methods.init_params(method, cfg, model_params, head.init(jax.random.key(1)), None)
  return head, tasks, placed.place(params)


def _assert_sharded_as_trained(cfg, head, params):
  """No leaf on a single device: each on the whole mesh with the train step's spec, every kernel split."""
  from migu_jax.cl import runner

  mesh = runner.make_mesh(cfg)
  specs = jax.tree.leaves(runner._mesh_specs(cfg, head.model, mesh)(params),
                          is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  leaves = jax.tree.leaves(params)
  assert len(specs) == len(leaves)
  for leaf, spec in zip(leaves, specs):
    assert isinstance(leaf.sharding, jax.sharding.NamedSharding) and leaf.sharding.mesh == mesh
    assert leaf.sharding.spec == spec
  kernels = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0] if path[-1].key == "kernel"]
  assert kernels and all(not kernel.sharding.is_fully_replicated for kernel in kernels)


@pytest.mark.parametrize("mesh_shape", [(4, 2)])  # data x model; (8,) is checked by the encoder and perplexity tests
def test_language_model_modes_on_a_mesh_match_one_device(tiny_models, tmp_path, mesh_shape):
  # Tiny Llama: option scores from the prefix tree, greedy generation with the key/value cache.
  head, tasks, params = _evaluation(_config(tiny_models["llama"], tmp_path))
  cfg = _config(tiny_models["llama"], tmp_path, mesh_shape)
  sharded_head, _, sharded = _evaluation(cfg, tasks)
  _assert_sharded_as_trained(cfg, sharded_head, sharded)
  assert sharded_head.placement.rows == mesh_shape[0] and sharded_head.placement.padded(6) == 8
  batch = sharded_head.placement.put({"ids": np.zeros((8, 3), np.int32)})
  assert batch["ids"].sharding.spec == jax.sharding.PartitionSpec("data")
  for j, task in enumerate(tasks):
    records = task.test
    np.testing.assert_allclose(sharded_head._option_scores(sharded["model"], j, records),
                               head._option_scores(params["model"], j, records), rtol=1e-5, atol=1e-5)
    n_new = head._max_answer(j)
    np.testing.assert_array_equal(
        sharded_head.placement.get(sharded_head._generate(sharded["model"], j, records[:6], n_new)),
        np.asarray(head._generate(params["model"], j, records[:6], n_new)))
    for mode in ("options", "generate"):
      assert sharded_head.correct(sharded, j, records, mode=mode) == head.correct(params, j, records, mode=mode)


@pytest.mark.parametrize("mesh_shape", [(8,)])
def test_encoder_options_on_a_mesh_match_one_device(tiny_models, tmp_path, mesh_shape):
  head, tasks, params = _evaluation(_config(tiny_models["bert"], tmp_path))
  cfg = _config(tiny_models["bert"], tmp_path, mesh_shape)
  sharded_head, _, sharded = _evaluation(cfg, tasks)
  _assert_sharded_as_trained(cfg, sharded_head, sharded)
  for j, task in enumerate(tasks):
    np.testing.assert_array_equal(sharded_head.predict(sharded, j, task.test), head.predict(params, j, task.test))


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_perplexity_on_a_mesh_matches_one_device(tiny_models, tmp_path, family):
  # objective="lm": causal LM (Llama), masked LM with its fixed evaluation corruption (BERT).
  rng = np.random.default_rng(0)
  blocks = [tuple(int(i) for i in rng.integers(6, 200, n)) for n in (16, 9, 16, 12, 16, 5, 16)]
  values = []
  for mesh_shape in (None, *MESHES):
    cfg = _config(tiny_models[family], tmp_path, mesh_shape, objective="lm", max_length=16, max_test=None)
    head, _, params = _evaluation(cfg, ())
    values.append(head.perplexity(params, None, blocks))
  np.testing.assert_allclose(values[1:], values[0], rtol=1e-5)


def test_a_mesh_run_evaluates_sharded_and_matches_one_device(tiny_models, tmp_path):
  # The runner end to end: generate (the run's matrix) and options (also_eval), with the parameters the
  # evaluation receives checked at every stage (on the code before this, gathered to one device).
  from migu_jax.cl import runner

  seen = []

  def check(event, info):
    if event in ("initial", "trained"):
      _assert_sharded_as_trained(cfg, head, info["params"])
      seen.append(event)

  overrides = dict(eval_mode="generate", also_eval=("options",), max_test=6)
  one = runner.run_sequence(_config(tiny_models["llama"], tmp_path / "one", **overrides), "migu", 0)
  cfg = _config(tiny_models["llama"], tmp_path / "mesh", (4, 2), **overrides)
  head = runner._head(cfg, runner.load_tasks(cfg, 0))
  run = runner.run_sequence(cfg, "migu", 0, callbacks=[check])
  assert seen == ["initial", "trained", "trained"]
  assert run["initial"] == one["initial"] and run["matrix"] == one["matrix"]
  assert run["also"] == one["also"]
