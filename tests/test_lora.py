"""LoRA and MIGU+LoRA through method interception (migu_jax.lora).

Compiles are what cost time on 2 cores: the tiny model is initialised once and
every test reuses the same few jitted functions.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

import migu_jax as migu
from migu_jax import lora
import tiny

ALPHA, RANK, RATIO = 16.0, 4, 0.7
IDS = jnp.asarray(tiny.make_batch(0, 4)["ids"])
TX = optax.chain(migu.mask_by_magnitude(RATIO, where=lora.is_lora), optax.sgd(0.5))


@functools.cache
def _tiny_params():
  return jax.jit(tiny.MODEL.init)(jax.random.key(0), IDS)["params"]


def _tiny_lora(rank=RANK, targets=None, seed=1):
  return lora.init_lora(jax.random.key(seed), _tiny_params(), rank=rank, targets=targets,
                        module=tiny.MODEL, inputs=(IDS,))


def _randomize_b(lp, seed=7):
  """Non-zero B, so that the adapters change the outputs."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(lp)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      0.3 * jax.random.normal(k, x.shape) if path[-1].key == "lora_b" else x
      for k, (path, x) in zip(keys, leaves)])


@jax.jit
def _base_apply(params, ids):
  return tiny.MODEL.apply({"params": params}, ids)


@jax.jit
def _lora_apply(params, lp, ids):
  return lora.apply_with_lora(tiny.MODEL, {"params": params}, lp, ids, alpha=ALPHA, rank=RANK)


def _loss(lp, params, batch):
  logits, mags = lora.apply_with_lora(tiny.MODEL, {"params": params}, lp, batch["ids"],
                                      alpha=ALPHA, rank=RANK)
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean(), mags


@jax.jit
def _migu_step(params, lp, batch):
  """One MIGU+LoRA SGD step over the LoRA tree; the base params are only read."""
  (_, mags), grads = jax.value_and_grad(_loss, has_aux=True)(lp, params, batch)
  updates, _ = TX.update(grads, TX.init(lp), lp, magnitudes=mags)
  return optax.apply_updates(lp, updates), grads, mags


def _flat(tree):
  return traverse_util.flatten_dict(tree)


def test_shapes_follow_dense_general_axes():
  lp = _tiny_lora()
  flat = _flat(lp)
  # query: DenseGeneral(features=(2, 8)) on [..., 16]; out: axis=(-2, -1) -> 16.
  assert flat[("block_0", "query", "lora_a")].shape == (16, RANK)
  assert flat[("block_0", "query", "lora_b")].shape == (RANK, 2, 8)
  assert flat[("block_0", "out", "lora_a")].shape == (2, 8, RANK)
  assert flat[("block_0", "out", "lora_b")].shape == (RANK, 16)
  assert flat[("head", "lora_a")].shape == (16, RANK)
  # every kernel but the embedding's is adapted; B starts at zero, A does not.
  kernels = {p[:-1] for p in _flat(_tiny_params()) if p[-1] == "kernel"}
  assert {p[:-1] for p in flat} == kernels
  for path, x in flat.items():
    assert x.dtype == jnp.float32
    assert bool((x == 0).all()) == (path[-1] == "lora_b"), path
  a = np.asarray(flat[("block_0", "out", "lora_a")])
  assert np.abs(a).max() <= 1 / np.sqrt(16)  # PEFT's bound, fan_in = 2 * 8


def test_zero_b_gives_the_base_outputs():
  params = _tiny_params()
  out, _ = _lora_apply(params, _tiny_lora(), IDS)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(_base_apply(params, IDS)))


def test_training_moves_only_lora_and_merge_equals_apply():
  params = _tiny_params()
  before = jax.tree.map(np.array, params)
  lp = _tiny_lora()
  for i in range(3):
    lp, grads, _ = _migu_step(params, lp, tiny.make_batch(i, 8))
  # a gradient reached every adapter (A through B once B moved), none changed the base.
  assert all(bool((g != 0).any()) for g in jax.tree.leaves(grads))
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, params))
  out, _ = _lora_apply(params, lp, IDS)
  assert not np.allclose(np.asarray(out), np.asarray(_base_apply(params, IDS)))
  merged = lora.merge_lora(params, lp, alpha=ALPHA, rank=RANK)
  np.testing.assert_allclose(np.asarray(_base_apply(merged, IDS)), np.asarray(out), atol=1e-5)


def test_magnitudes_by_hand_on_a_dense():
  model = nn.Dense(6)
  x = jax.random.normal(jax.random.key(0), (3, 5, 4))
  params = model.init(jax.random.key(1), x)["params"]
  lp = _randomize_b(lora.init_lora(jax.random.key(2), params, rank=3))
  out, mags = lora.apply_with_lora(model, {"params": params}, lp, x, alpha=6.0, rank=3)
  xa = np.asarray(x) @ np.asarray(lp["lora_a"])
  full = (np.asarray(x) @ np.asarray(params["kernel"]) + np.asarray(params["bias"])
          + xa @ np.asarray(lp["lora_b"]) * (6.0 / 3))
  np.testing.assert_allclose(np.asarray(out), full, rtol=1e-5, atol=1e-5)
  assert set(mags) == {"lora_a", "lora_b"}
  np.testing.assert_allclose(np.asarray(mags["lora_a"]), np.abs(xa).sum((0, 1)), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(mags["lora_b"]), np.abs(full).sum((0, 1)), rtol=1e-5)


def test_magnitudes_of_a_layer_called_twice_add_up():
  class Twice(nn.Module):
    @nn.compact
    def __call__(self, x):
      d = nn.Dense(4, name="d")
      return d(x) + d(2 * x)

  x = jax.random.normal(jax.random.key(0), (2, 4))
  params = Twice().init(jax.random.key(1), x)["params"]
  lp = lora.init_lora(jax.random.key(2), params, rank=2)
  _, mags = lora.apply_with_lora(Twice(), {"params": params}, lp, x, alpha=2.0, rank=2)
  np.testing.assert_allclose(np.asarray(mags["d"]["lora_a"]),
                             3 * np.abs(np.asarray(x @ lp["d"]["lora_a"])).sum(0), rtol=1e-5)


def test_migu_mask_freezes_low_magnitude_rank_components_and_features():
  params, lp = _tiny_params(), _randomize_b(_tiny_lora())
  new, _, mags = _migu_step(params, lp, tiny.make_batch(2, 8))
  flat_old, flat_new, flat_mags = _flat(lp), _flat(new), _flat(mags)
  assert set(flat_mags) == set(flat_old)
  for path, old in flat_old.items():
    m = np.asarray(flat_mags[path])
    keep = m >= np.quantile(m, RATIO)
    changed = np.asarray(flat_new[path] != old)
    if path[-1] == "lora_a":  # rank components: the columns of A's last axis
      assert m.shape == (RANK,)
      moved = changed.reshape(-1, RANK).any(0)
    else:  # output features: B's trailing axes
      assert m.shape == old.shape[1:]
      moved = changed.any(0)
    np.testing.assert_array_equal(moved, keep, err_msg="/".join(path))
    assert 0 < keep.sum() < keep.size


def test_targets_by_name_and_callable():
  params = _tiny_params()
  lp = _tiny_lora(targets=("query", "value"))
  assert {p[:-1] for p in _flat(lp)} == {
      (f"block_{i}", n) for i in (0, 1) for n in ("query", "value")}
  # mags come back keyed like the LoRA tree (shapes only: no compile).
  _, mags = jax.eval_shape(_lora_apply, params, lp, IDS)
  assert jax.tree.structure(mags) == jax.tree.structure(lp)
  # 2-D kernels are split by shape, without a trace.
  lp2 = lora.init_lora(jax.random.key(0), params, rank=2, targets=lambda p: p[-2] in ("up", "down"))
  assert {p[:-1] for p in _flat(lp2)} == {
      (f"block_{i}", n) for i in (0, 1) for n in ("up", "down")}


def test_dropout_needs_a_key_and_is_deterministic_with_one():
  model = nn.Dense(8)
  x = jax.random.normal(jax.random.key(0), (4, 16))
  params = model.init(jax.random.key(1), x)["params"]
  lp = _randomize_b(lora.init_lora(jax.random.key(2), params, rank=4))
  run = jax.jit(lambda key: lora.apply_with_lora(model, {"params": params}, lp, x, alpha=8.0,
                                                 rank=4, dropout=0.5, dropout_rng=key)[0])
  out0, out0_again, out1 = run(jax.random.key(0)), run(jax.random.key(0)), run(jax.random.key(1))
  np.testing.assert_array_equal(np.asarray(out0), np.asarray(out0_again))
  assert not np.allclose(np.asarray(out0), np.asarray(out1))
  with pytest.raises(ValueError, match="dropout_rng"):
    lora.apply_with_lora(model, {"params": params}, lp, x, alpha=8.0, rank=4, dropout=0.5)


def test_bert_under_jit_and_remat():
  from migu_jax.models import bert

  cfg = bert.Config.of_size("tiny", remat=True, num_hidden_layers=1)
  model = bert.BertModel(cfg)
  ids = jnp.array([[3, 4, 5, 6, 0], [7, 8, 9, 0, 0]], jnp.int32)
  mask = (ids != 0).astype(jnp.int32)
  params = jax.jit(model.init)(jax.random.key(0), ids)["params"]
  lp = _randomize_b(lora.init_lora(jax.random.key(0), params, rank=2, targets=("query", "value")))
  assert {p[:-1] for p in _flat(lp)} == {
      ("layers_0", "attention", "query"), ("layers_0", "attention", "value")}

  def loss_fn(lp):
    h, mags = lora.apply_with_lora(model, {"params": params}, lp, ids, mask, alpha=4.0, rank=2)
    return jnp.mean(h ** 2), (h, mags)

  (_, (h, mags)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(lp)
  merged = lora.merge_lora(params, lp, alpha=4.0, rank=2)
  np.testing.assert_allclose(np.asarray(jax.jit(model.apply)({"params": merged}, ids, mask)),
                             np.asarray(h), atol=1e-5)
  assert jax.tree.structure(mags) == jax.tree.structure(lp) == jax.tree.structure(grads)
  assert all(bool((g != 0).any()) for g in jax.tree.leaves(grads))


def test_errors():
  params = _tiny_params()
  with pytest.raises(ValueError, match="selects no kernel"):
    lora.init_lora(jax.random.key(0), params, rank=2, targets=("nothing_named_so",))
  for rank in (0, -1, 2.0):
    with pytest.raises(ValueError, match="rank"):
      lora.init_lora(jax.random.key(0), params, rank=rank, targets=("up",))
  with pytest.raises(ValueError, match="block_0/key .*module=model"):  # 3-D kernel, no trace
    lora.init_lora(jax.random.key(0), params, rank=2)
  with pytest.raises(ValueError, match=r"variables\['params'\]"):
    lora.init_lora(jax.random.key(0), {"params": params}, rank=2, targets=("up",))

  # A LoRA tree of another model: the error names the path.
  other_params = nn.Dense(5).init(jax.random.key(0), jnp.ones((1, 16)))["params"]
  other_lora = lora.init_lora(jax.random.key(0), other_params, rank=2)
  with pytest.raises(ValueError, match="block_0/mlp.*another model"):
    lora.apply_with_lora(tiny.MODEL, {"params": params}, {"block_0": {"mlp": other_lora}}, IDS,
                         alpha=1.0, rank=2)
  with pytest.raises(ValueError, match="block_0/up.*another model"):
    lora.merge_lora(params, {"block_0": {"up": other_lora}}, alpha=1.0, rank=2)
  with pytest.raises(ValueError, match="rank=3"):
    lora.apply_with_lora(tiny.MODEL, {"params": params}, _tiny_lora(rank=2, targets=("up",)), IDS,
                         alpha=1.0, rank=3)
  with pytest.raises(ValueError, match="rank=0"):
    lora.apply_with_lora(tiny.MODEL, {"params": params}, other_lora, IDS, alpha=1.0, rank=0)


def test_einsum_is_not_adapted():
  class WithEinsum(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Einsum((4, 3), "bi,io->bo", name="mix")(x)
      return nn.Dense(2, name="head")(x)

  model, x = WithEinsum(), jnp.ones((2, 4))
  params = model.init(jax.random.key(0), x)["params"]
  lp = lora.init_lora(jax.random.key(1), params, rank=2, module=model, inputs=(x,))
  assert set(lp) == {"head"}  # the default targets skip the Einsum
  with pytest.raises(ValueError, match="mix.*Einsum"):
    lora.init_lora(jax.random.key(1), params, rank=2, targets=("mix",), module=model, inputs=(x,))
  by_shape = lora.init_lora(jax.random.key(1), params, rank=2)  # no module: cannot tell
  with pytest.raises(ValueError, match="mix.*Einsum"):
    lora.apply_with_lora(model, {"params": params}, by_shape, x, alpha=1.0, rank=2)
