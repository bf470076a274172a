"""mask_by_magnitude, strict_mask_by_magnitude and random_mask."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
import torch

import migu_jax as migu
import tiny

RATIOS = [0.0, 0.3, 0.7, 0.95, 0.99]


def _vectors():
  rng = np.random.default_rng(0)
  for n in (1, 7, 64, 384, 1000):
    yield rng.random(n, dtype=np.float32) * 10
    yield rng.integers(0, 4, n).astype(np.float32)  # many ties
  yield np.zeros(50, np.float32)  # all tied


@pytest.mark.parametrize("ratio", RATIOS)
def test_threshold_and_kept_set_equal_torch_quantile(ratio):
  for v in _vectors():
    threshold = torch.quantile(torch.from_numpy(v), ratio)
    expected = (torch.from_numpy(v) >= threshold).numpy()
    np.testing.assert_allclose(np.asarray(jnp.quantile(jnp.asarray(v), ratio)), threshold.numpy(), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(migu.keep_mask(jnp.asarray(v), ratio)), expected)


@pytest.mark.parametrize("ratio", RATIOS)
def test_exact_count_keeps_the_papers_count(ratio):
  for v in _vectors():
    keep = np.asarray(migu.keep_mask(jnp.asarray(v), ratio, threshold="top_k"))
    n_keep = len(v) - math.floor(ratio * len(v))
    assert keep.sum() == n_keep
    # the kept features are the largest ones
    if 0 < n_keep < len(v):
      assert v[keep].min() >= v[~keep].max()


def test_exact_count_with_an_injected_ratio_matches_python_floor():
  for n in (10, 100, 384, 3072):
    for ratio in (0.3, 0.7, 0.95):
      keep = jax.jit(lambda r: migu.keep_mask(jnp.arange(n, dtype=jnp.float32), r, threshold="top_k"))(
          jnp.float32(ratio)
      )
      assert int(keep.sum()) == n - math.floor(ratio * n), (n, ratio)


def _update(tx, grads, mags):
  return tx.update(grads, tx.init(grads), magnitudes=mags)


def _grads_and_mags(seed=1):
  params = tiny.init_params()
  (_, mags), grads = jax.value_and_grad(tiny.loss_fn, has_aux=True)(params, tiny.make_batch(seed))
  return params, grads, mags


def _flat(tree):
  return {"/".join(p): np.asarray(x) for p, x in traverse_util.flatten_dict(tree).items()}


def test_one_sgd_step_freezes_exactly_the_masked_output_features():
  params, grads, mags = _grads_and_mags()
  tx = optax.chain(migu.mask_by_magnitude(0.7), optax.sgd(0.5))
  updates, _ = tx.update(grads, tx.init(params), params, magnitudes=mags)
  new = optax.apply_updates(params, updates)
  before, after, flat_mags = _flat(params), _flat(new), _flat(mags)
  flat_grads, flat_updates = _flat(grads), _flat(updates)
  for name, old in before.items():
    changed = after[name] != old
    if name.endswith("kernel"):
      m = flat_mags[name]
      keep = m >= np.quantile(m, 0.7)  # numpy's default is linear too
      keep = np.broadcast_to(keep, old.shape)
      assert not changed[~keep].any(), f"masked features of {name} moved"
      assert changed[keep].mean() > 0.95, f"kept features of {name} did not move"
      assert 0.2 < keep.mean() < 0.45
    else:  # biases, LayerNorm scales and offsets, the embedding: full gradient
      np.testing.assert_array_equal(flat_updates[name], -0.5 * flat_grads[name], err_msg=name)
      assert changed.any(), name


def test_disabled_mask_passes_gradients_unchanged():
  params, grads, mags = _grads_and_mags()
  tx = migu.mask_by_magnitude(0.7, enabled=False)
  updates, _ = tx.update(grads, tx.init(params), params, magnitudes=mags)
  jax.tree.map(np.testing.assert_array_equal, updates, grads)


def _moved_masked_rows(tx, steps=4):
  """How many masked entries moved, over several steps of adamw."""
  params = tiny.init_params()
  state = tx.init(params)
  moved = 0
  for step in range(steps):
    batch = tiny.make_batch(step)
    (_, mags), grads = jax.value_and_grad(tiny.loss_fn, has_aux=True)(params, batch)
    updates, state = tx.update(grads, state, params, magnitudes=mags)
    new = optax.apply_updates(params, updates)
    masks = migu.layer_masks(grads, mags, 0.7)
    for path, keep in masks.items():
      old_k, new_k = _get(params, path), _get(new, path)
      keep = np.broadcast_to(np.asarray(keep), old_k.shape)
      moved += int((np.asarray(new_k) != np.asarray(old_k))[~keep].sum())
    params = new
  return moved


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def test_strict_mode_freezes_masked_rows_despite_momentum_and_weight_decay():
  adamw = optax.adamw(1e-2, weight_decay=0.1)
  assert _moved_masked_rows(migu.strict_mask_by_magnitude(0.7, adamw)) == 0
  # the reference (non-strict) chain lets masked rows drift: the check can fail
  assert _moved_masked_rows(optax.chain(migu.mask_by_magnitude(0.7), adamw)) > 0


def test_inject_hyperparams_changes_ratio_and_switch_without_recompiling():
  params, grads, mags = _grads_and_mags()
  # a Python bool would be static for inject_hyperparams: pass an array
  tx = optax.inject_hyperparams(migu.mask_by_magnitude)(ratio=0.7, enabled=jnp.asarray(False))
  traces = []

  @jax.jit
  def update(grads, state, mags):
    traces.append(1)
    return tx.update(grads, state, params, magnitudes=mags)

  state = tx.init(params)
  kept = []
  for ratio, enabled in [(0.7, False), (0.7, True), (0.5, True), (0.9, True)]:
    state.hyperparams["ratio"] = jnp.asarray(ratio, jnp.float32)
    state.hyperparams["enabled"] = jnp.asarray(enabled)
    updates, state = update(grads, state, mags)
    kept.append(float((updates["block_0"]["up"]["kernel"] != 0).any(0).mean()))
  assert len(traces) == 1
  assert kept[0] == 1.0 and kept[1] < 1.0 and kept[2] > kept[1] > kept[3]


def test_composes_in_chain_with_unknown_extra_args_and_keeps_dtype():
  params, grads, mags = _grads_and_mags()
  grads = jax.tree.map(lambda g: g.astype(jnp.bfloat16), grads)
  tx = optax.chain(migu.mask_by_magnitude(0.7), optax.scale(-1.0))
  updates, state = tx.update(grads, tx.init(params), params, magnitudes=mags, unrelated=3)
  assert jax.tree.map(lambda u: u.dtype, updates) == jax.tree.map(lambda g: g.dtype, grads)
  _, state2 = tx.update(grads, state, params, magnitudes=mags)
  assert jax.tree.map(jnp.shape, state) == jax.tree.map(jnp.shape, state2)


def test_axis_name_averages_magnitudes_so_replicas_agree():
  params, grads, mags = _grads_and_mags()
  n = 8
  # different magnitudes per replica; the mask must follow their mean
  rng = np.random.default_rng(0)
  noisy = jax.tree.map(lambda m: jnp.asarray(m * rng.random((n, *m.shape), dtype=np.float32)), mags)
  tx = migu.mask_by_magnitude(0.7, axis_name="i")
  rep = lambda t: jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), t)
  updates, _ = jax.pmap(lambda g, m: tx.update(g, tx.init(g), magnitudes=m), axis_name="i")(
      rep(grads), noisy
  )
  expected, _ = _update(migu.mask_by_magnitude(0.7), grads, jax.tree.map(lambda m: m.mean(0), noisy))
  for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
    for replica in range(n):
      np.testing.assert_array_equal(np.asarray(a[replica]) != 0, np.asarray(b) != 0)


def test_random_mask_keeps_the_same_count_and_changes_every_step():
  params, grads, mags = _grads_and_mags()
  tx = migu.random_mask(0.7, seed=3)
  state = tx.init(params)
  u1, state = tx.update(grads, state, params, magnitudes=mags)
  u2, state = tx.update(grads, state, params, magnitudes=mags)
  k1 = np.asarray(u1["block_0"]["up"]["kernel"] != 0).any(0)
  k2 = np.asarray(u2["block_0"]["up"]["kernel"] != 0).any(0)
  assert k1.sum() == k2.sum() == 32 - math.floor(0.7 * 32)
  assert (k1 != k2).any()
  np.testing.assert_array_equal(np.asarray(u1["head"]["bias"]), np.asarray(grads["head"]["bias"]))
  # without magnitudes: the kernel's last axis
  u3, _ = tx.update(grads, state, params)
  assert np.asarray(u3["head"]["kernel"] != 0).any(0).sum() == 3 - math.floor(0.7 * 3)


def test_einsum_masks_broadcast_over_contracted_kernel_axes():
  kernel_grad = jnp.ones((2, 4, 3))  # 'hdk': h and k are outputs, d is contracted
  mags = {"kernel": jnp.arange(6, dtype=jnp.float32).reshape(2, 1, 3)}
  updates, _ = _update(migu.mask_by_magnitude(0.5), {"kernel": kernel_grad}, mags)
  kept = np.asarray(updates["kernel"] != 0)
  assert (kept == kept[:, :1, :]).all()  # same over the contracted axis
  np.testing.assert_array_equal(kept[:, 0, :], np.asarray(mags["kernel"][:, 0, :] >= 2.5))


# Bad input: a clear error naming the parameter, never silence.


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_ratio_outside_unit_interval(ratio):
  for factory in (migu.mask_by_magnitude, migu.random_mask):
    with pytest.raises(ValueError, match=r"outside \[0, 1\)"):
      factory(ratio)
  with pytest.raises(ValueError, match=r"outside \[0, 1\)"):
    migu.strict_mask_by_magnitude(ratio, optax.sgd(1.0))


def test_missing_magnitudes_argument():
  params, grads, _ = _grads_and_mags()
  tx = optax.chain(migu.mask_by_magnitude(0.7), optax.sgd(1.0))
  with pytest.raises(TypeError, match="magnitudes="):
    tx.update(grads, tx.init(params), params)


def test_magnitudes_missing_for_a_kernel_names_it():
  params, grads, mags = _grads_and_mags()
  del mags["block_1"]["up"]
  with pytest.raises(KeyError, match="block_1/up/kernel"):
    _update(migu.mask_by_magnitude(0.7), grads, mags)
  # leaving it out of the mask with where= is the documented fix
  where = lambda path, leaf: migu.is_kernel(path, leaf) and path[:2] != ("block_1", "up")
  _update(migu.mask_by_magnitude(0.7, where=where), grads, mags)


def test_magnitudes_of_the_wrong_length_name_the_kernel():
  params, grads, mags = _grads_and_mags()
  mags["block_0"]["down"]["kernel"] = jnp.ones(17)
  with pytest.raises(ValueError, match=r"block_0/down/kernel have shape \(17,\)"):
    _update(migu.mask_by_magnitude(0.7), grads, mags)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_magnitudes_name_the_kernel(bad):
  params, grads, mags = _grads_and_mags()
  mags["head"]["kernel"] = mags["head"]["kernel"].at[1].set(bad)
  tx = migu.mask_by_magnitude(0.7)
  with pytest.raises(ValueError, match="head/kernel contain NaN or Inf"):
    _update(tx, grads, mags)

  # Under jit no host callback runs: that layer's update becomes NaN (never a silently zeroed gradient),
  # every other layer's is the one a finite run gives.
  jitted, _ = jax.jit(lambda g, m: _update(tx, g, m))(grads, mags)
  _, _, clean = _grads_and_mags()
  expected, _ = _update(tx, grads, clean)
  assert np.isnan(np.asarray(jitted["head"]["kernel"])).all()
  np.testing.assert_array_equal(jitted["block_0"]["down"]["kernel"], expected["block_0"]["down"]["kernel"])
  strict = migu.strict_mask_by_magnitude(0.7, optax.sgd(1.0))
  poisoned, _ = jax.jit(lambda g, m: _update(strict, g, m))(grads, mags)
  assert np.isnan(np.asarray(poisoned["head"]["kernel"])).all()


def test_nothing_selected_is_an_error_not_a_silent_no_op():
  grads = {"dense": {"w": jnp.ones((3, 4))}}
  with pytest.raises(ValueError, match="nothing would be masked"):
    _update(migu.mask_by_magnitude(0.7), grads, {"dense": {"w": jnp.ones(4)}})


def test_transformation_can_be_built_inside_jit():
  params, grads, mags = _grads_and_mags()

  @jax.jit
  def update(grads, mags):
    tx = migu.mask_by_magnitude(0.7)
    return _update(tx, grads, mags)[0]

  inside, outside = _flat(update(grads, mags)), _flat(_update(migu.mask_by_magnitude(0.7), grads, mags)[0])
  assert inside.keys() == outside.keys()
  for name, masked in inside.items():
    np.testing.assert_allclose(masked, outside[name], err_msg=name)
  assert (inside["head/kernel"] == 0).all(axis=0).any()  # some output features masked


@pytest.mark.parametrize("shape", [(), (1,)])
def test_a_single_magnitude_for_a_layer_is_an_error_not_a_no_op(shape):
  params, grads, mags = _grads_and_mags()
  mags["block_0"]["down"]["kernel"] = jnp.ones(shape)
  with pytest.raises(ValueError, match=r"block_0/down/kernel have shape"):
    _update(migu.mask_by_magnitude(0.7), grads, mags)


@pytest.mark.parametrize("threshold", ["quantile", "top_k", "l1_mass"])
def test_layers_of_one_width_share_one_sort_and_get_their_own_masks(threshold):
  rng = np.random.default_rng(0)
  widths = [8, 8, 8, 5, 5, 3]
  scores = {f"l{i}": {"kernel": jnp.asarray(rng.integers(0, 4, n), jnp.float32)} for i, n in enumerate(widths)}
  grads = {name: {"kernel": jnp.ones((2, len(s["kernel"])))} for name, s in scores.items()}
  masks = migu.masking.layer_masks(grads, scores, 0.7, threshold=threshold)
  for name, s in scores.items():  # ties included: each layer as if thresholded alone
    np.testing.assert_array_equal(masks[(name, "kernel")], migu.keep_mask(s["kernel"], 0.7, threshold=threshold))
  jaxpr = str(jax.make_jaxpr(lambda s: migu.masking.layer_masks(grads, s, 0.7, threshold=threshold))(scores))
  sorts_per_call = {"quantile": 1, "top_k": 1, "l1_mass": 2}[threshold]
  assert jaxpr.count(" sort[") == sorts_per_call * len(set(widths))  # per width, not per layer
