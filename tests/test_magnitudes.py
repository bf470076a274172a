"""apply_with_magnitudes: one exact statistic per linear-layer kernel."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import migu_jax as migu
import tiny

X = jax.random.normal(jax.random.key(1), (2, 5, 4))


class Linears(nn.Module):
  """Each captured layer type, one layer called twice, and a bfloat16 layer."""

  @nn.compact
  def __call__(self, x):
    shared = nn.Dense(6, name="shared")
    return {
        "shared": (shared(x), shared(2 * x)),
        "general": nn.DenseGeneral((2, 3), name="general")(x),
        "general_in": nn.DenseGeneral(3, axis=(-2, -1), name="general_in")(x),
        "einsum": nn.Einsum((2, 4, 3), "btd,hdk->bthk", name="einsum")(x),
        "bf16": nn.Dense(6, dtype=jnp.bfloat16, name="bf16")(x),
    }


def _sum_abs(y, axes):
  return np.abs(np.asarray(y, np.float64)).sum(axes)


def test_statistics_equal_sum_of_abs_outputs_per_output_feature():
  model = Linears()
  variables = model.init(jax.random.key(0), X)
  out, mags = migu.apply_with_magnitudes(model, variables, X)
  assert migu.magnitude_paths(mags) == [
      (name, "kernel") for name in sorted(["shared", "general", "general_in", "einsum", "bf16"])
  ]
  a, b = out["shared"]
  np.testing.assert_allclose(mags["shared"]["kernel"], _sum_abs(a, (0, 1)) + _sum_abs(b, (0, 1)), rtol=1e-5)
  np.testing.assert_allclose(mags["general"]["kernel"], _sum_abs(out["general"], (0, 1)), rtol=1e-5)
  np.testing.assert_allclose(mags["general_in"]["kernel"], _sum_abs(out["general_in"], (0,)), rtol=1e-5)
  assert mags["einsum"]["kernel"].shape == (2, 1, 3)  # kernel (h, d, k): d is contracted
  np.testing.assert_allclose(mags["einsum"]["kernel"][:, 0], _sum_abs(out["einsum"], (0, 1)), rtol=1e-5)
  assert mags["bf16"]["kernel"].dtype == jnp.float32
  # the module is unchanged: same outputs as a plain apply
  jax.tree.map(np.testing.assert_array_equal, out, model.apply(variables, X))


def test_every_kernel_of_a_transformer_has_a_statistic_that_broadcasts():
  params = tiny.init_params()
  _, mags = tiny.loss_fn(params, tiny.make_batch(0))
  assert migu.magnitude_paths(mags) == tiny.kernel_paths(params)
  for path in tiny.kernel_paths(params):
    kernel, m = params, mags
    for key in path:
      kernel, m = kernel[key], m[key]
    np.broadcast_shapes(m.shape, kernel.shape)  # raises if they do not broadcast


def test_same_statistics_under_jit_and_remat():
  model = Linears()
  variables = model.init(jax.random.key(0), X)
  _, eager = migu.apply_with_magnitudes(model, variables, X)
  _, jitted = jax.jit(lambda v, x: migu.apply_with_magnitudes(model, v, x))(variables, X)
  remat_model = nn.remat(Linears)()
  _, remat = jax.jit(lambda v, x: migu.apply_with_magnitudes(remat_model, v, x))(variables, X)
  for other in (jitted, remat):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), eager, other)


def test_gradients_flow_through_the_captured_model():
  params = tiny.init_params()
  (loss, _), grads = jax.value_and_grad(tiny.loss_fn, has_aux=True)(params, tiny.make_batch(0))
  plain = lambda p, b: tiny.loss_fn(p, b)[0]
  jax.tree.map(np.testing.assert_array_equal, grads, jax.grad(plain)(params, tiny.make_batch(0)))


class Step(nn.Module):
  @nn.compact
  def __call__(self, carry, _):
    return nn.Dense(4)(carry), None


@pytest.mark.parametrize(
    "variable_axes, message",
    [({"params": 0}, "was dropped"), ({"params": 0, migu.COLLECTION: 0}, "stacked")],
)
def test_scan_fails_loudly_instead_of_dropping_statistics(variable_axes, message):
  scanned = nn.scan(Step, variable_axes=variable_axes, split_rngs={"params": True}, length=3)

  class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
      return scanned()(x, None)[0]

  model = Stack()
  variables = model.init(jax.random.key(0), X)
  with pytest.raises(ValueError, match=f"ScanStep_0/Dense_0.*{message}.*[Uu]nroll"):
    migu.apply_with_magnitudes(model, variables, X)


def test_scan_with_stacked_true_gives_one_statistic_per_layer():
  scanned = nn.scan(Step, variable_axes={"params": 0, migu.COLLECTION: 0}, split_rngs={"params": True}, length=3)

  class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
      return scanned()(x, None)[0]

  model = Stack()
  params = model.init(jax.random.key(0), X)["params"]
  _, mags = migu.apply_with_magnitudes(model, {"params": params}, X, stacked=True)
  stat, kernel = mags["ScanStep_0"]["Dense_0"]["kernel"], params["ScanStep_0"]["Dense_0"]["kernel"]
  assert stat.shape == (3, 1, 4) and kernel.shape == (3, 4, 4)
  h = X
  for i in range(3):  # the layers one by one
    y = h @ kernel[i] + params["ScanStep_0"]["Dense_0"]["bias"][i]
    np.testing.assert_allclose(stat[i, 0], np.abs(y).sum((0, 1)), rtol=1e-5)
    h = y
  tx = migu.mask_by_magnitude(0.5, stacked_axes=1)
  grads = {"k": {"kernel": jnp.ones((3, 4, 4))}}
  updates, _ = tx.update(grads, tx.init(grads), magnitudes={"k": {"kernel": stat}})
  for i in range(3):
    np.testing.assert_array_equal(updates["k"]["kernel"][i, 0] != 0, migu.keep_mask(stat[i, 0], 0.5))


def test_other_mutable_collections_pass_through():
  class WithStats(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.BatchNorm(use_running_average=False)(nn.Dense(3)(x))

  model = WithStats()
  variables = model.init(jax.random.key(0), X)
  (y, state), mags = migu.apply_with_magnitudes(model, variables, X, mutable=["batch_stats"])
  assert "batch_stats" in state and migu.COLLECTION not in state
  assert mags["Dense_0"]["kernel"].shape == (3,)


def test_padding_aware_statistics_equal_those_of_the_unpadded_batch():
  from migu_jax.models import bert

  config = bert.Config.of_size("tiny")
  model = bert.BertModel(config)
  lengths = [3, 7, 5]
  rng = np.random.default_rng(0)
  ids = rng.integers(1, config.vocab_size, (3, 7)).astype(np.int32)
  mask = (np.arange(7)[None] < np.array(lengths)[:, None]).astype(np.int32)
  params = model.init(jax.random.key(0), ids, mask)["params"]
  _, padded = migu.apply_with_magnitudes(model, {"params": params}, ids, mask, token_mask=mask)
  _, counted = migu.apply_with_magnitudes(model, {"params": params}, ids, mask)
  separate = [
      migu.apply_with_magnitudes(model, {"params": params}, ids[i : i + 1, :n], mask[i : i + 1, :n])[1]
      for i, n in enumerate(lengths)
  ]
  unpadded = jax.tree.map(lambda *m: sum(m), *separate)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), padded, unpadded)
  # the reference counts padding: different statistics, so the check can fail
  assert not np.allclose(counted["layers_0"]["intermediate"]["kernel"], unpadded["layers_0"]["intermediate"]["kernel"], rtol=1e-3)


def test_token_mask_for_another_sequence_length_names_the_layer():
  model = nn.Dense(3)
  variables = model.init(jax.random.key(0), X)
  with pytest.raises(ValueError, match="token_mask of shape \\(2, 4\\).*encoder_mask"):
    migu.apply_with_magnitudes(model, variables, X, token_mask=np.ones((2, 4)))


@pytest.mark.parametrize("keep", [(2,), (0, 2), (1,), ()])
def test_the_statistic_is_the_sum_of_abs_over_the_other_axes(keep):
  from migu_jax.magnitudes import sum_abs

  y = jax.random.normal(jax.random.key(0), (3, 13, 7)).astype(jnp.bfloat16)
  axes = tuple(a for a in range(3) if a not in keep)
  expected = jnp.sum(jnp.abs(y.astype(jnp.float32)), axis=axes)
  got = sum_abs(y, keep)
  assert got.dtype == jnp.float32 and got.shape == expected.shape
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  assert jax.grad(lambda y: sum_abs(y, keep).sum())(y.astype(jnp.float32)).sum() == 0  # not differentiated
