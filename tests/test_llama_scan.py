"""The layer-scanned Llama (``Config.scan_layers``) computes what the unrolled one does, from the same weights.

Each test builds the unrolled tiny model, stacks its parameters (``params.stack_layers``) into the scanned one
and compares: logits, gradients, MIGU's per-layer masks, generation and option scoring, the Hugging Face
round trip, the sharding rules, and a runner run.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import migu_jax as migu
from migu_jax import sharding
from migu_jax.models import from_pretrained, save_pretrained
from migu_jax.models.generation import greedy_generate, option_log_likelihoods
from migu_jax.models.llama import PARAM_AXES, modeling, params as llama_params

TOL = 1e-5
IDS = np.random.default_rng(0).integers(1, 128, size=(2, 7)).astype(np.int32)
MASK = np.array([[0, 0, 1, 1, 1, 1, 1], [1] * 7], np.int32)  # left padding
POSITIONS = np.maximum(np.cumsum(MASK, 1) - 1, 0)


def _pair(tie=True, **overrides):
  """``(unrolled model, params, scanned model, stacked params)`` of a tiny 3-layer Llama."""
  cfg = modeling.Config.of_size("tiny", num_hidden_layers=3, tie_word_embeddings=tie, **overrides)
  params = llama_params.init_params(cfg)
  scanned = modeling.LlamaForCausalLM(dataclasses.replace(cfg, scan_layers=True))
  return modeling.LlamaForCausalLM(cfg), params, scanned, llama_params.stack_layers(params)


def _close(a, b, tol=TOL):
  """``a`` equals ``b`` within ``tol``, leaf by leaf (a leaf of ``a`` reshaped like ``b``'s: a layer's statistic
  cut from a stack keeps its size-1 axis)."""
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x).reshape(np.shape(y)), y, rtol=tol, atol=tol),
               a, b)


def _loss(model, stacked=False):
  def loss(params):
    logits, mags = migu.apply_with_magnitudes(model, {"params": params}, IDS, MASK, POSITIONS, stacked=stacked)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0]), mags
  return jax.jit(jax.value_and_grad(loss, has_aux=True))


@functools.lru_cache(maxsize=None)
def _computed(tie=True, remat=False):
  """``(unrolled, scanned)``, each ``(model, params, loss, magnitudes, grads)``, computed once per setting."""
  model, params, scanned, stacked = _pair(tie, remat=remat)
  (loss, mags), grads = _loss(model)(params)
  (scan_loss, scan_mags), scan_grads = _loss(scanned, stacked=True)(stacked)
  return (model, params, loss, mags, grads), (scanned, stacked, scan_loss, scan_mags, scan_grads)


@pytest.mark.parametrize("remat", [False, True], ids=["scan", "scan+remat"])
def test_scanned_logits_gradients_and_magnitudes_equal_unrolled(remat):
  (model, params, loss, mags, grads), (scanned, stacked, scan_loss, scan_mags, scan_grads) = _computed(remat=remat)
  assert stacked["layers"]["attention"]["q_proj"]["kernel"].shape == (3, 32, 32) and "layers_0" not in stacked
  _close(scanned.apply({"params": stacked}, IDS, MASK, POSITIONS), model.apply({"params": params}, IDS, MASK, POSITIONS))
  np.testing.assert_allclose(scan_loss, loss, rtol=TOL)
  _close(llama_params.unstack_layers(scan_grads), grads)
  assert scan_mags["layers"]["mlp"]["up_proj"]["kernel"].shape == (3, 1, 64)  # one statistic per layer
  _close(llama_params.unstack_layers(scan_mags), mags, tol=1e-4)
  with pytest.raises(ValueError, match="stacked=True"):  # unasked, stacked statistics are an error
    migu.apply_with_magnitudes(scanned, {"params": stacked}, IDS)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_migu_masks_are_per_layer_and_equal_the_unrolled_models(tie):
  (_, params, _, mags, grads), (_, stacked, _, scan_mags, scan_grads) = _computed(tie)
  tx = migu.mask_by_magnitude(0.7)
  want, _ = tx.update(grads, tx.init(params), params, magnitudes=mags)
  scan_tx = migu.mask_by_magnitude(0.7, stacked_axes={"layers": 1})
  got, _ = scan_tx.update(scan_grads, scan_tx.init(stacked), stacked, magnitudes=scan_mags)
  got = llama_params.unstack_layers(got)
  masked = lambda tree: jax.tree.map(lambda u: np.asarray(u) == 0, tree)
  assert jax.tree.all(jax.tree.map(np.array_equal, masked(got), masked(want)))
  _close(got, want)
  head = ("embed", "embedding") if tie else ("lm_head", "kernel")
  kept = np.asarray(got[head[0]][head[1]] != 0).any(axis=1 if tie else 0)
  assert 0 < kept.mean() < 0.5  # the head was masked as one layer, not row by row
  for i in range(3):  # every layer keeps the features over its own threshold
    kept = np.asarray(got[f"layers_{i}"]["mlp"]["up_proj"]["kernel"] != 0).any(0)
    np.testing.assert_array_equal(kept, migu.keep_mask(mags[f"layers_{i}"]["mlp"]["up_proj"]["kernel"], 0.7))


def test_generation_and_option_scoring_equal_unrolled():
  model, params, scanned, stacked = _pair(tie=False)
  cache = modeling.init_cache(scanned.config, 2, 9)
  assert cache[0].shape == (3, 2, 9, 2, 8)
  gen = lambda m, p: np.asarray(greedy_generate(m, p, IDS, MASK, max_new_tokens=5, eos_token_id=-1))
  np.testing.assert_array_equal(gen(scanned, stacked), gen(model, params))
  options, option_mask = np.array([[5, 6, 7], [5, 9, 0], [11, 0, 0]]), np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0]])
  score = lambda m, p: np.asarray(option_log_likelihoods(m, p, IDS, MASK, options, option_mask))
  np.testing.assert_allclose(score(scanned, stacked), score(model, params), rtol=TOL, atol=TOL)


def test_hugging_face_round_trip_stacks_and_unstacks_exactly(tmp_path):
  model, params, scanned, stacked = _pair(tie=False)
  state = llama_params.to_hf(stacked, scanned.config)
  want = llama_params.to_hf(params, model.config)
  assert sorted(state) == sorted(want) and all(np.array_equal(state[k], want[k]) for k in want)
  loaded = llama_params.from_hf(want, scanned.config)
  assert jax.tree.all(jax.tree.map(np.array_equal, loaded, jax.tree.map(np.asarray, stacked)))
  save_pretrained(scanned, stacked, str(tmp_path))
  again, again_params, _ = from_pretrained(str(tmp_path), scan_layers=True)
  assert again.config.scan_layers and "scan_layers" not in (tmp_path / "config.json").read_text()
  assert jax.tree.all(jax.tree.map(np.array_equal, again_params, jax.tree.map(np.asarray, stacked)))
  assert jax.tree.all(jax.tree.map(np.array_equal, llama_params.unstack_layers(again_params), params))


def test_sharding_never_splits_the_layer_axis():
  _, params, _, stacked = _pair()
  sizes, mapping = {"data": 4, "model": 2}, sharding.logical_to_mesh("fsdp")
  assert sharding.unmatched(stacked, PARAM_AXES) == []
  spec = lambda names, x: sharding.partition_spec(names, np.shape(x), PARAM_AXES, sizes, mapping)
  layer_1 = jax.tree_util.tree_flatten_with_path(params["layers_1"])[0]
  for (path, x), (_, y) in zip(jax.tree_util.tree_flatten_with_path(stacked["layers"])[0], layer_1):
    names = sharding.path_names(path)
    unrolled = tuple(spec(("layers_1", *names), y))
    assert tuple(spec(("layers", *names), x)) == ((None, *unrolled) if unrolled else ()), names
  assert tuple(spec(("layers", "mlp", "up_proj", "kernel"), stacked["layers"]["mlp"]["up_proj"]["kernel"])) == (
      None, "data", "model")


def test_per_leaf_stacked_axes_keep_the_old_int_error():
  grads = {"layers": {"kernel": jnp.ones((2, 4, 10))}, "head": {"kernel": jnp.ones((4, 10))}}
  mags = {"layers": {"kernel": jnp.ones((2, 1, 10))}, "head": {"kernel": jnp.ones((10,))}}
  tx = migu.mask_by_magnitude(0.7, stacked_axes=1)  # an int applies to every leaf: the head has no layer axis
  with pytest.raises(ValueError, match="head/kernel.*no output axis"):
    tx.update(grads, tx.init(grads), magnitudes=mags)
  tx = migu.mask_by_magnitude(0.7, stacked_axes={"head": 1})
  with pytest.raises(ValueError, match="head/kernel.*no output axis"):
    tx.update(grads, tx.init(grads), magnitudes=mags)
  for source in ("gradient", "weight", "fisher"):  # the importance sources take the same mapping
    imp = migu.importance.IMPORTANCES[source](stacked_axes={"layers": 1})
    scores, _ = imp.scores(grads, imp.init(grads), grads, None)
    assert scores["layers"]["kernel"].shape == (2, 1, 10) and scores["head"]["kernel"].shape == (10,)


def _two_layer_folder(tiny_models, root):
  """The tiny runner Llama (its tokenizer) with 2 layers, so the scan has layers to tell apart."""
  model, _, tokenizer = from_pretrained(tiny_models["llama"])
  cfg = dataclasses.replace(model.config, num_hidden_layers=2)
  save_pretrained(modeling.LlamaForCausalLM(cfg), llama_params.init_params(cfg, seed=3), str(root), tokenizer)
  return str(root)


def test_runner_with_scan_layers_trains_like_the_unrolled_run(tiny_models, tmp_path):
  from tiny_cl import tiny_config

  from migu_jax.cl import runner
  folder = _two_layer_folder(tiny_models, tmp_path / "llama2")
  results, trained = {}, {}
  for scan in (False, True):
    cfg = tiny_config(folder, tmp_path / f"scan_{scan}", order="amazon", first_task_unmasked=False,
                      scan_layers=scan)
    keep = lambda event, info, scan=scan: trained.__setitem__(scan, info["params"]) if event == "trained" else None
    results[scan] = runner.run_sequence(cfg, "migu", 0, callbacks=[keep])
  got, want = trained[True], trained[False]
  assert "layers" in got["model"] and "layers_1" in want["model"]
  _close({**got, "model": llama_params.unstack_layers(got["model"])}, want, tol=1e-5)
  assert results[True]["matrix"] == results[False]["matrix"]
  npz = lambda scan: np.load(tmp_path / f"scan_{scan}" / "migu" / "seed_0" / "magnitudes_task_0.npz")
  assert sorted(npz(True)) == sorted(npz(False))
  with pytest.raises(ValueError, match="Llama models only.*--scan-layers"):
    runner.run_model(tiny_config(tiny_models["bert"], tmp_path / "bert", scan_layers=True))


def test_cli_flag_and_resume_of_runs_from_before_the_setting(tmp_path):
  from migu_jax import cli
  from migu_jax.cl import runner
  args = ["run", "--output", str(tmp_path), "--model", "smollm2-135m"]
  assert cli.build_config(cli.parser().parse_args(args + ["--scan-layers"])).scan_layers is True
  assert cli.build_config(cli.parser().parse_args(args)).scan_layers is False
  current = runner._identity(runner.Config(), "migu", 0)
  older = {k: v for k, v in current.items() if k != "scan_layers"}  # a checkpoint from before the setting
  runner._check_identity(older, current, tmp_path)
  with pytest.raises(ValueError, match="scan_layers: False -> True"):  # the stacked layout is another tree
    runner._check_identity(older, runner._identity(runner.Config(scan_layers=True), "migu", 0), tmp_path)
