"""make_train_step: one device, pmap over 8 CPU devices and a mesh agree."""

import functools

import jax
import numpy as np
import optax
import pytest

import migu_jax as migu
import tiny

STEPS = 4
# Data-parallel and accumulated steps sum in another order (per device or
# micro-batch, then averaged): float32 rounding, about 1e-7 relative per step.
# After 4 steps the parameters agree within 1e-5 (absolute). SGD with momentum
# rather than Adam: Adam divides by sqrt(v), which blows the rounding noise of
# gradients that are zero in exact arithmetic (attention key biases) up to the
# size of a learning rate.
ATOL = 1e-5


def _tx():
  return optax.chain(
      migu.mask_by_magnitude(0.7), optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9)
  )


def _counting(loss_fn, counter):
  @functools.wraps(loss_fn)
  def traced(params, batch):
    counter.append(1)
    return loss_fn(params, batch)

  return traced


def _train(mode, micro_batches=1, batch_size=32, steps=STEPS):
  """Parameters and losses after ``steps`` steps, and the trace count after each step."""
  traces = []
  tx = _tx()
  step = migu.make_train_step(_counting(tiny.loss_fn, traces), tx, mode=mode, micro_batches=micro_batches)
  params = tiny.init_params()
  params, opt_state = step.place_state(params), step.place_state(tx.init(params))
  losses, trace_counts = [], []
  for i in range(steps):
    params, opt_state, loss = step(params, opt_state, tiny.make_batch(i, batch_size))
    losses.append(float(np.asarray(loss).reshape(-1)[0]))
    trace_counts.append(len(traces))
  return step.fetch(params), losses, trace_counts


@pytest.fixture(scope="module")
def single_device():
  return _train("jit")


def test_eight_virtual_devices():
  assert jax.device_count() == 8


@pytest.mark.parametrize("mode", ["pmap", "mesh"])
def test_data_parallel_steps_equal_the_single_device_step(single_device, mode):
  params, losses, _ = _train(mode)
  ref_params, ref_losses, _ = single_device
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=ATOL), params, ref_params)
  # the check can fail: the parameters did move
  moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), params, tiny.init_params())
  assert max(jax.tree.leaves(moved)) > 1e-3


@pytest.mark.parametrize("mode", ["jit", "pmap", "mesh"])
def test_four_micro_batches_equal_one_batch_four_times_the_size(single_device, mode):
  params, losses, _ = _train(mode, micro_batches=4)
  ref_params, ref_losses, _ = single_device
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=ATOL), params, ref_params)


def test_accumulated_magnitudes_are_the_sum_and_gradients_the_mean():
  params = tiny.init_params()
  batch = tiny.make_batch(7, 16)
  (loss, mags), grads = migu.accumulate_gradients(tiny.loss_fn, params, batch, 4)
  (loss1, mags1), grads1 = jax.value_and_grad(tiny.loss_fn, has_aux=True)(params, batch)
  np.testing.assert_allclose(loss, loss1, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), mags, mags1)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads, grads1)


@pytest.mark.parametrize("mode", ["jit", "pmap", "mesh"])
def test_no_recompilation_after_the_first_step(mode):
  _, _, trace_counts = _train(mode, micro_batches=2, steps=4)
  assert trace_counts[0] > 0
  assert trace_counts == [trace_counts[0]] * 4


def test_injected_hyperparameters_change_without_recompiling():
  traces = []
  tx = optax.chain(
      optax.inject_hyperparams(migu.mask_by_magnitude)(ratio=0.7, enabled=np.asarray(False)),
      optax.adamw(1e-2),
  )
  step = migu.make_train_step(_counting(tiny.loss_fn, traces), tx)
  params = tiny.init_params()
  opt_state = tx.init(params)
  params, opt_state, _ = step(params, opt_state, tiny.make_batch(0))
  n = len(traces)
  for ratio, enabled in [(0.5, True), (0.9, True), (0.7, False)]:
    opt_state[0].hyperparams["ratio"] = np.float32(ratio)
    opt_state[0].hyperparams["enabled"] = np.asarray(enabled)
    params, opt_state, _ = step(params, opt_state, tiny.make_batch(1))
  assert len(traces) == n


def test_batch_that_does_not_split_gets_a_clear_error():
  step = migu.make_train_step(tiny.loss_fn, _tx(), micro_batches=3)
  params = tiny.init_params()
  with pytest.raises(ValueError, match="micro_batches=3"):
    step(params, _tx().init(params), tiny.make_batch(0, 16))
  with pytest.raises(ValueError, match="mode='gpu'"):
    migu.make_train_step(tiny.loss_fn, _tx(), mode="gpu")
