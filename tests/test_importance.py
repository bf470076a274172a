"""Importance sources and threshold rules on hand-computed examples."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import migu_jax as migu
from migu_jax import importance

G = {"dense": {"kernel": jnp.array([[1.0, -2.0, 0.0], [3.0, 2.0, -0.5]]), "bias": jnp.array([1.0, 0.0, -1.0])}}
W = {"dense": {"kernel": jnp.array([[0.5, -1.0, 4.0], [0.5, 0.0, -1.0]]), "bias": jnp.zeros(3)}}


def _scores(imp, updates=G, params=W, magnitudes=None, state=None):
  state = imp.init(params) if state is None else state
  return imp.scores(updates, state, params, magnitudes)


def test_gradient_magnitude_sums_abs_gradient_over_inputs():
  scores, _ = _scores(importance.gradient_magnitude())
  np.testing.assert_allclose(scores["dense"]["kernel"], [4.0, 4.0, 0.5])


def test_weight_magnitude_sums_abs_weight_over_inputs():
  scores, _ = _scores(importance.weight_magnitude())
  np.testing.assert_allclose(scores["dense"]["kernel"], [1.0, 1.0, 5.0])
  with pytest.raises(TypeError, match="needs params"):
    importance.weight_magnitude().scores(G, None, None, None)


def test_fisher_is_a_moving_average_of_squared_gradients():
  imp = importance.fisher(decay=0.5)
  scores, state = _scores(imp)
  np.testing.assert_allclose(scores["dense"]["kernel"], [0.5 * 10, 0.5 * 8, 0.5 * 0.25])
  doubled = jax.tree.map(lambda g: 2 * g, G)
  scores, state2 = _scores(imp, updates=doubled, state=state)
  # 0.5 * previous + 0.5 * (4 * sum g^2)
  np.testing.assert_allclose(scores["dense"]["kernel"], [0.25 * 10 + 2 * 10, 0.25 * 8 + 2 * 8, 0.25 * 0.25 + 2 * 0.25])
  assert jax.tree.map(jnp.shape, state) == jax.tree.map(jnp.shape, state2)


def test_output_magnitude_passes_the_magnitudes_through():
  mags = {"dense": {"kernel": jnp.array([3.0, 1.0, 2.0])}}
  scores, _ = _scores(importance.output_magnitude(), magnitudes=mags)
  assert scores is mags
  with pytest.raises(TypeError, match="magnitudes="):
    _scores(importance.output_magnitude())


def test_random_scores_change_each_step_and_follow_magnitude_shapes():
  imp = importance.random_scores(seed=1)
  s1, state = _scores(imp)
  s2, _ = _scores(imp, state=state)
  assert s1["dense"]["kernel"].shape == (3,)
  assert not np.allclose(s1["dense"]["kernel"], s2["dense"]["kernel"])
  s3, _ = _scores(imp, magnitudes={"dense": {"kernel": jnp.ones((2, 1, 3))}})
  assert s3["dense"]["kernel"].shape == (2, 1, 3)


@pytest.mark.parametrize(
    "scores, ratio, rule, expected",
    [
        ([4.0, 1.0, 3.0, 2.0], 0.5, "quantile", [1, 0, 1, 0]),
        ([2.0, 2.0, 2.0, 1.0], 0.5, "quantile", [1, 1, 1, 0]),  # ties at the threshold all kept
        ([2.0, 2.0, 2.0, 1.0], 0.5, "top_k", [1, 1, 0, 0]),  # exactly 2, ties by position
        ([7.0, 1.0, 1.0, 1.0], 0.5, "l1_mass", [1, 0, 0, 0]),  # 7 of 10 covers half the mass
        ([1.0, 1.0, 1.0, 1.0], 0.5, "l1_mass", [1, 1, 0, 0]),  # flat: keeps 1 - T
        ([1.0, 3.0, 2.0, 4.0], 0.4, "l1_mass", [0, 1, 0, 1]),  # 4 < 6 of 10; 4 + 3 covers it
        ([5.0, 0.0, 0.0, 0.0], 0.0, "l1_mass", [1, 0, 0, 0]),  # zero-mass features never needed
    ],
)
def test_threshold_rules(scores, ratio, rule, expected):
  keep = migu.keep_mask(jnp.array(scores), ratio, threshold=rule)
  assert keep.astype(int).tolist() == expected


def test_mask_by_importance_with_a_custom_source_and_rule():
  # a user's importance: the gradient's L2 norm per output feature
  l2 = importance.Importance(
      init=lambda params: optax.EmptyState(),
      scores=lambda u, s, p, m: (jax.tree.map(lambda g: jnp.sqrt((g**2).sum(0)) if g.ndim > 1 else g, u), s),
  )
  keep_largest = lambda scores, ratio: scores == scores.max()
  tx = migu.mask_by_importance(0.5, l2, threshold=keep_largest)
  updates, _ = jax.jit(tx.update)(G, tx.init(W), W)
  np.testing.assert_array_equal(updates["dense"]["kernel"], jnp.array([[1.0, 0, 0], [3.0, 0, 0]]))
  np.testing.assert_array_equal(updates["dense"]["bias"], G["dense"]["bias"])


@pytest.mark.parametrize("name", sorted(importance.IMPORTANCES))
def test_every_builtin_source_masks_a_train_step_without_recompiling(name):
  import tiny

  params = tiny.init_params()
  tx = optax.chain(migu.mask_by_importance(0.7, importance.IMPORTANCES[name]()), optax.sgd(0.1))
  traces = []

  @jax.jit
  def step(params, state, batch):
    traces.append(1)
    (_, mags), grads = jax.value_and_grad(tiny.loss_fn, has_aux=True)(params, batch)
    updates, state = tx.update(grads, state, params, magnitudes=mags)
    return optax.apply_updates(params, updates), state, updates

  state = tx.init(params)
  for i in range(2):
    params, state, updates = step(params, state, tiny.make_batch(i))
  kept = np.asarray(updates["block_0"]["up"]["kernel"] != 0).any(0)
  assert len(traces) == 1
  assert 0.2 < kept.mean() < 0.45, kept.mean()


@pytest.mark.parametrize("source", ["gradient", "weight", "fisher"])
def test_stacked_kernels_get_one_threshold_per_layer(source):
  # A [layers=3, in=4, out=10] stack (nn.scan): each layer keeps its own top 30%, 3 of 10 features.
  stack = {"layers": {"kernel": jax.random.normal(jax.random.key(0), (3, 4, 10))}}
  grads = jax.tree.map(lambda w: w * jnp.arange(1.0, 11.0), stack)
  tx = migu.mask_by_importance(0.7, importance.IMPORTANCES[source](stacked_axes=1), stacked_axes=1)
  updates, _ = tx.update(grads, tx.init(stack), stack)
  kept = np.asarray(jnp.any(updates["layers"]["kernel"] != 0, axis=1))  # [layers, out]
  np.testing.assert_array_equal(kept.sum(axis=1), [3, 3, 3])
  # Scores without the layer axis would share one threshold across layers: an error, not a silent no-op.
  flat = migu.mask_by_importance(0.7, importance.IMPORTANCES[source](), stacked_axes=1)
  with pytest.raises(ValueError, match="layers/kernel.*stacked_axes=1"):
    flat.update(grads, flat.init(stack), stack)
