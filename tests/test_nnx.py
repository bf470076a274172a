"""migu_jax.nnx: MIGU's magnitudes from Flax NNX modules, checked against the linen path."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax import traverse_util

import migu_jax as migu
from migu_jax import nnx as migu_nnx

VOCAB, SEQ, WIDTH, HEADS, CLASSES, LAYERS = 32, 6, 16, 2, 3, 2
RATIO = 0.7


# --- A tiny NNX transformer and its linen twin (same names, same maths) -------


def _attention(q, k, v):
  split = lambda t: t.reshape(t.shape[:-1] + (HEADS, WIDTH // HEADS))
  q, k, v = split(q), split(k), split(v)
  w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(WIDTH // HEADS))
  return jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(q.shape[:-2] + (WIDTH,))


class Attention(nnx.Module):
  def __init__(self, rngs):
    self.q = nnx.Linear(WIDTH, WIDTH, rngs=rngs)
    self.k = nnx.Linear(WIDTH, WIDTH, rngs=rngs)
    self.v = nnx.Linear(WIDTH, WIDTH, rngs=rngs)
    self.o = nnx.Linear(WIDTH, WIDTH, rngs=rngs)

  def __call__(self, x):
    return self.o(_attention(self.q(x), self.k(x), self.v(x)))


class Block(nnx.Module):
  def __init__(self, rngs):
    self.ln1 = nnx.LayerNorm(WIDTH, rngs=rngs)
    self.attn = Attention(rngs)
    self.ln2 = nnx.LayerNorm(WIDTH, rngs=rngs)
    self.up = nnx.Linear(WIDTH, 2 * WIDTH, rngs=rngs)
    self.down = nnx.Linear(2 * WIDTH, WIDTH, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.ln1(x))
    return x + self.down(nnx.gelu(self.up(self.ln2(x))))


class Tiny(nnx.Module):
  def __init__(self, rngs, remat=False):
    self.embed = nnx.Embed(VOCAB, WIDTH, rngs=rngs)
    self.layers = nnx.List([Block(rngs) for _ in range(LAYERS)])
    self.norm = nnx.LayerNorm(WIDTH, rngs=rngs)
    self.head = nnx.Linear(WIDTH, CLASSES, rngs=rngs)
    self.remat = remat

  def __call__(self, ids):
    x = self.embed(ids)
    for layer in self.layers:
      x = nnx.remat(Block.__call__)(layer, x) if self.remat else layer(x)
    return self.head(self.norm(x).mean(axis=1))


class LinenAttention(nn.Module):
  @nn.compact
  def __call__(self, x):
    q, k, v = (nn.Dense(WIDTH, name=n)(x) for n in "qkv")
    return nn.Dense(WIDTH, name="o")(_attention(q, k, v))


class LinenBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = x + LinenAttention(name="attn")(nn.LayerNorm(name="ln1")(x))
    h = nn.LayerNorm(name="ln2")(x)
    return x + nn.Dense(WIDTH, name="down")(nn.gelu(nn.Dense(2 * WIDTH, name="up")(h)))


class LinenTiny(nn.Module):
  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(VOCAB, WIDTH, name="embed")(ids)
    for i in range(LAYERS):
      x = LinenBlock(name=f"layers_{i}")(x)
    return nn.Dense(CLASSES, name="head")(nn.LayerNorm(name="norm")(x).mean(axis=1))


def _batch(seed=0, size=8):
  rng = np.random.default_rng(seed)
  return {
      "ids": jnp.asarray(rng.integers(0, VOCAB, (size, SEQ)), jnp.int32),
      "label": jnp.asarray(rng.integers(0, CLASSES, (size,)), jnp.int32),
  }


def _to_linen(tree) -> dict:
  """An nnx State (params or magnitudes) as the linen tree: layers/0 -> layers_0."""
  flat = traverse_util.flatten_dict(tree.to_pure_dict())
  renamed = {}
  for path, leaf in flat.items():
    if path[0] == "layers":
      path = (f"layers_{path[1]}",) + path[2:]
    renamed[path] = jnp.asarray(leaf)
  return traverse_util.unflatten_dict(renamed)


def _flat(tree) -> dict:
  return traverse_util.flatten_dict(_to_linen(tree))


def _ce(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _nnx_loss(model, batch, **kwargs):
  logits, mags = migu_nnx.apply_with_magnitudes(model, batch["ids"], **kwargs)
  return _ce(logits, batch["label"]), mags


def _nnx_step(model, optimizer, batch):
  (loss, mags), grads = nnx.value_and_grad(_nnx_loss, has_aux=True)(model, batch)
  optimizer.update(model, grads, magnitudes=mags)
  return loss, mags


def _tx():
  return optax.chain(migu.mask_by_magnitude(RATIO), optax.sgd(0.5))


def _kernel_paths(model):
  return sorted(p for p in _flat(nnx.state(model, nnx.Param)) if p[-1] == "kernel")


# --- Statistics -----------------------------------------------------------------


def test_statistics_equal_hand_computed_sum_abs_at_the_param_paths():
  model = Tiny(nnx.Rngs(0))
  ids = _batch()["ids"]
  logits, mags = nnx.jit(migu_nnx.apply_with_magnitudes)(model, ids)

  # One statistic per kernel, at the kernel's Param path, shaped [d_out].
  params = nnx.state(model, nnx.Param)
  assert sorted(_flat(mags)) == _kernel_paths(model)
  assert mags["layers"][0]["attn"]["q"]["kernel"].shape == params["layers"][0]["attn"]["q"]["kernel"].shape[-1:]
  assert all(m.dtype == jnp.float32 for m in jax.tree.leaves(mags))

  x = model.embed(ids)
  block = model.layers[0]
  h = block.ln1(x)
  sum_abs = lambda y: np.abs(np.asarray(y, np.float64)).sum(axis=tuple(range(y.ndim - 1)))
  for name in "qkv":
    np.testing.assert_allclose(mags["layers"][0]["attn"][name]["kernel"], sum_abs(getattr(block.attn, name)(h)), rtol=1e-5)
  x1 = x + block.attn(h)
  np.testing.assert_allclose(mags["layers"][0]["up"]["kernel"], sum_abs(block.up(block.ln2(x1))), rtol=1e-5)
  x2 = model.layers[1](block(x))
  np.testing.assert_allclose(mags["head"]["kernel"], sum_abs(logits), rtol=1e-5)
  np.testing.assert_allclose(logits, model.head(model.norm(x2).mean(axis=1)), rtol=1e-5)


def test_a_layer_called_twice_adds_up_and_general_layers_have_linen_shapes():
  class Layers(nnx.Module):
    def __init__(self, rngs):
      self.shared = nnx.Linear(4, 6, rngs=rngs)
      self.general = nnx.LinearGeneral(4, (2, 3), rngs=rngs)
      self.general_in = nnx.LinearGeneral((5, 4), 3, axis=(-2, -1), rngs=rngs)
      self.batched = nnx.LinearGeneral(4, 3, batch_axis={0: 2}, rngs=rngs)
      self.einsum = nnx.Einsum("btd,hdk->bthk", (2, 4, 3), rngs=rngs)

    def __call__(self, x):
      outs = self.shared(x), self.shared(2 * x), self.general(x)
      return outs + (self.general_in(x), self.batched(x), self.einsum(x))

  x = jax.random.normal(jax.random.key(1), (2, 5, 4))
  (a, b, g, gi, gb, e), mags = migu_nnx.apply_with_magnitudes(Layers(nnx.Rngs(0)), x)
  np.testing.assert_allclose(mags["shared"]["kernel"], jnp.abs(a).sum((0, 1)) + jnp.abs(b).sum((0, 1)), rtol=1e-5)
  np.testing.assert_allclose(mags["general"]["kernel"], jnp.abs(g).sum((0, 1)), rtol=1e-5)
  np.testing.assert_allclose(mags["general_in"]["kernel"], jnp.abs(gi).sum(0), rtol=1e-5)
  # batch_axis: kernel [2, 4, 3] -> statistic [2, 1, 3], one per batch slice.
  np.testing.assert_allclose(mags["batched"]["kernel"], jnp.abs(gb).sum(1)[:, None, :], rtol=1e-5)
  # Einsum: kernel [h, d, k] -> statistic [h, 1, k] (d is contracted).
  np.testing.assert_allclose(mags["einsum"]["kernel"], jnp.abs(e).sum((0, 1))[:, None, :], rtol=1e-5)


def test_the_model_is_left_unchanged_also_when_the_forward_pass_fails():
  model = Tiny(nnx.Rngs(0))
  graphdef = nnx.graphdef(model)
  migu_nnx.apply_with_magnitudes(model, _batch()["ids"])
  with pytest.raises(ValueError, match="token_mask of shape .* layers/0/attn/q"):
    migu_nnx.apply_with_magnitudes(model, _batch()["ids"], token_mask=np.ones((2, 4)))
  assert nnx.graphdef(model) == graphdef
  assert type(model.head) is nnx.Linear
  assert not jax.tree.leaves(nnx.state(model, nnx.Intermediate))


def test_padded_positions_do_not_count_as_in_the_linen_path():
  model = Tiny(nnx.Rngs(0))
  ids = _batch()["ids"]
  mask = jnp.asarray(np.arange(SEQ)[None, :] < np.array([[SEQ], [3]] * 4), jnp.int32)
  _, padded = migu_nnx.apply_with_magnitudes(model, ids, token_mask=mask)
  _, full = migu_nnx.apply_with_magnitudes(model, ids)
  linen_params = _to_linen(nnx.state(model, nnx.Param))
  _, linen = migu.apply_with_magnitudes(LinenTiny(), {"params": linen_params}, ids, token_mask=mask)
  for path, m in _flat(padded).items():
    np.testing.assert_allclose(m, traverse_util.flatten_dict(linen)[path], rtol=1e-5, atol=1e-5)
  assert not np.allclose(padded["layers"][0]["attn"]["q"]["kernel"], full["layers"][0]["attn"]["q"]["kernel"])
  # The head sees the pooled [batch, d] output: nothing to mask there.
  np.testing.assert_allclose(padded["head"]["kernel"], full["head"]["kernel"], rtol=1e-6)


# --- Against the linen path, and through nnx.Optimizer --------------------------


def test_nnx_and_linen_agree_on_magnitudes_and_on_one_masked_sgd_step():
  model = Tiny(nnx.Rngs(0))
  batch = _batch()
  linen_params = _to_linen(nnx.state(model, nnx.Param))

  def linen_loss(params):
    logits, mags = migu.apply_with_magnitudes(LinenTiny(), {"params": params}, batch["ids"])
    return _ce(logits, batch["label"]), mags

  tx = _tx()

  @jax.jit
  def linen_step(params):
    (value, mags), grads = jax.value_and_grad(linen_loss, has_aux=True)(params)
    updates, _ = tx.update(grads, tx.init(params), params, magnitudes=mags)
    return value, mags, optax.apply_updates(params, updates)

  linen_value, linen_mags, linen_after = linen_step(linen_params)
  linen_after = traverse_util.flatten_dict(linen_after)

  optimizer = nnx.Optimizer(model, _tx(), wrt=nnx.Param)
  value, mags = nnx.jit(_nnx_step)(model, optimizer, batch)

  np.testing.assert_allclose(value, linen_value, rtol=1e-5)
  linen_flat = traverse_util.flatten_dict(linen_mags)
  assert sorted(_flat(mags)) == sorted(linen_flat)
  for path, m in _flat(mags).items():
    np.testing.assert_allclose(m, linen_flat[path], rtol=1e-5, atol=1e-5, err_msg=str(path))
    # The same features kept: the masks agree.
    np.testing.assert_array_equal(migu.keep_mask(m, RATIO), migu.keep_mask(linen_flat[path], RATIO))
  after = _flat(nnx.state(model, nnx.Param))
  assert sorted(after) == sorted(linen_after)
  for path, p in after.items():
    np.testing.assert_allclose(p, linen_after[path], rtol=1e-5, atol=1e-6, err_msg=str(path))


def test_optimizer_freezes_masked_output_features_under_nnx_jit_and_remat():
  model = Tiny(nnx.Rngs(0), remat=True)
  optimizer = nnx.Optimizer(model, _tx(), wrt=nnx.Param)
  before = jax.tree.map(np.array, _flat(nnx.state(model, nnx.Param)))
  traces = []

  @nnx.jit
  def step(model, optimizer, batch):
    traces.append(None)
    return _nnx_step(model, optimizer, batch)

  _, mags = step(model, optimizer, _batch(0))
  after = _flat(nnx.state(model, nnx.Param))
  for path, m in _flat(mags).items():
    keep = np.asarray(migu.keep_mask(m, RATIO))
    assert keep.sum() == migu.kept_count(m.size, RATIO), path
    moved = np.any(after[path] != before[path], axis=0)
    np.testing.assert_array_equal(moved, keep, err_msg=str(path))
  for path in after:
    if path[-1] != "kernel":  # biases, norms and the embedding keep their whole gradient
      assert np.any(after[path] != before[path]), path
  step(model, optimizer, _batch(1))
  assert len(traces) == 1  # the capture does not make nnx.jit retrace


def test_nnx_remat_gives_the_same_magnitudes_and_gradients():
  batch = _batch()
  results = []
  for model in (Tiny(nnx.Rngs(0)), Tiny(nnx.Rngs(0), remat=True)):
    (_, mags), grads = nnx.jit(nnx.value_and_grad(_nnx_loss, has_aux=True))(model, batch)
    results.append((_flat(mags), _flat(grads)))
  (mags, grads), (remat_mags, remat_grads) = results
  assert sorted(remat_mags) == sorted(mags) == _kernel_paths(Tiny(nnx.Rngs(0)))
  for path in mags:
    np.testing.assert_allclose(remat_mags[path], mags[path], rtol=1e-5)
  for path in grads:
    np.testing.assert_allclose(remat_grads[path], grads[path], rtol=1e-5, atol=1e-7)


def test_a_layer_that_did_not_run_has_no_statistic_and_the_mask_says_so():
  class Unused(nnx.Module):
    def __init__(self, rngs):
      self.used = nnx.Linear(4, 6, rngs=rngs)
      self.unused = nnx.Linear(4, 6, rngs=rngs)

    def __call__(self, x):
      return self.used(x)

  model = Unused(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, _tx(), wrt=nnx.Param)

  def loss_fn(model):
    y, mags = migu_nnx.apply_with_magnitudes(model, jnp.ones((2, 4)))
    return jnp.sum(y**2), mags

  (_, mags), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  assert list(_flat(mags)) == [("used", "kernel")]
  with pytest.raises(KeyError, match="unused/kernel"):
    optimizer.update(model, grads, magnitudes=mags)


def test_tx_update_called_directly_masks_pure_gradients():
  model = nnx.Linear(4, 10, rngs=nnx.Rngs(0))

  def loss_fn(model):
    y, mags = migu_nnx.apply_with_magnitudes(model, jax.random.normal(jax.random.key(2), (3, 4)))
    return jnp.sum(y**2), mags

  (_, mags), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  tx = migu.mask_by_magnitude(RATIO)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  updates, _ = tx.update(nnx.as_pure(grads), tx.init(params), params, magnitudes=mags)
  assert int((updates["kernel"] != 0).any(axis=0).sum()) == 3
  # the raw gradient State (Variables, paths ending in .value) masks the same
  raw, _ = tx.update(grads, tx.init(params), params, magnitudes=mags)
  np.testing.assert_array_equal(np.asarray(nnx.as_pure(raw)["kernel"]), np.asarray(updates["kernel"]))


# --- nnx.scan over stacked layers -----------------------------------------------


class ScanBlock(nnx.Module):
  def __init__(self, rngs):
    self.ln = nnx.LayerNorm(WIDTH, rngs=rngs)
    self.mlp = nnx.Linear(WIDTH, WIDTH, rngs=rngs)

  def __call__(self, x):
    return x + self.mlp(self.ln(x))


class Scanned(nnx.Module):
  """Layers stacked by nnx.vmap and run by nnx.scan (each one twice)."""

  def __init__(self, rngs, state_axes=0):
    self.blocks = nnx.vmap(lambda r: ScanBlock(nnx.Rngs(r)))(jax.random.split(rngs.params(), 3))
    self.state_axes = state_axes

  def __call__(self, x):
    def body(x, block):
      return block(block(x))

    return nnx.scan(body, in_axes=(nnx.Carry, self.state_axes), out_axes=nnx.Carry)(x, self.blocks)


def test_scan_over_stacked_layers_is_refused_by_default_and_stacked_on_request():
  model = Scanned(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 5, WIDTH))
  with pytest.raises(ValueError, match="blocks/mlp/kernel is stacked.*one threshold"):
    migu_nnx.apply_with_magnitudes(model, x)

  _, mags = nnx.jit(lambda m, x: migu_nnx.apply_with_magnitudes(m, x, stacked=True))(model, x)
  stacked = mags["blocks"]["mlp"]["kernel"]
  assert stacked.shape == (3, 1, WIDTH)  # broadcasts against the [3, d_in, d_out] kernel

  # One statistic per layer: the same as running the layers one by one.
  graphdef, state = nnx.split(model.blocks)
  for i in range(3):
    block = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))
    h = block(x)
    expected = jnp.abs(block.mlp(block.ln(x))).sum((0, 1)) + jnp.abs(block.mlp(block.ln(h))).sum((0, 1))
    np.testing.assert_allclose(stacked[i, 0], expected, rtol=1e-5)
    x = block(h)

  # stacked_axes=1: one threshold per layer, as if each layer were masked alone
  grads = {"kernel": jnp.ones((3, WIDTH, WIDTH))}
  tx = migu.mask_by_magnitude(RATIO, stacked_axes=1)
  updates, _ = tx.update(grads, tx.init(grads), magnitudes={"kernel": stacked})
  for i in range(3):
    alone = migu.keep_mask(stacked[i, 0], RATIO)
    np.testing.assert_array_equal(np.asarray(updates["kernel"][i] != 0), np.broadcast_to(alone, (WIDTH, WIDTH)))


def test_scan_that_broadcasts_the_capture_state_fails_clearly():
  model = Scanned(nnx.Rngs(0), state_axes=nnx.StateAxes({nnx.Param: 0, ...: None}))
  with pytest.raises(ValueError, match="blocks/mlp is stacked.*nnx.StateAxes"):
    migu_nnx.apply_with_magnitudes(model, jnp.ones((2, 5, WIDTH)), stacked=True)
  assert type(model.blocks.mlp) is nnx.Linear
