"""Train steps with gradient accumulation: one device, ``jax.pmap``, or a mesh.

The data flows one way::

    batch -> loss_fn(params, micro_batch) -> (loss, magnitudes), grads
          -> summed over micro-batches (and averaged over replicas)
          -> tx.update(grads, opt_state, params, magnitudes=...) -> new params

Micro-batch gradients are averaged (the gradient of the mean loss over the
whole batch) and magnitudes are summed (the statistic of the whole batch), so
``k`` micro-batches of size ``b`` equal one batch of size ``k b``. Under
``pmap`` both are averaged across replicas (``lax.pmean``), so every replica
applies the same mask; on a mesh the step sees the global batch, and the sum is
global by construction.

On a mesh the state is replicated, or with ``state_specs`` (e.g.
:func:`migu_jax.sharding.specs_by_rules`: FSDP) sharded: parameters, gradients,
optimizer state and MIGU's statistics are each held to their specs inside the
step, so the layout stays the same from step to step (one compilation).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import jax_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from migu_jax import sharding

LossFn = Callable[[Any, Any], tuple[jax.Array, Any]]


@dataclasses.dataclass(frozen=True)
class TrainStep:
  """A compiled train step and the placement of its inputs.

  Call it as ``params, opt_state, loss = train_step(params, opt_state, batch)``
  with ``params``/``opt_state`` from :meth:`place_state` and ``batch`` a host
  batch whose leaves have the global batch as their leading axis.

  Attributes:
    compiled: the jitted (or pmapped) function ``(params, opt_state, batch)``.
    place_state: puts a pytree of parameters or optimizer state where the step
      expects it (replicated over devices under pmap or a mesh).
    place_batch: splits a host batch over the data-parallel devices.
    fetch: brings a placed pytree back to a single copy.
  """

  compiled: Callable
  place_state: Callable[[Any], Any]
  place_batch: Callable[[Any], Any]
  fetch: Callable[[Any], Any]

  def __call__(self, params, opt_state, batch):
    return self.compiled(params, opt_state, self.place_batch(batch))


def fetch_global(tree):
  """Host (numpy) values of a placed pytree, the same on every process: a leaf split over processes is
  gathered; typed PRNG keys stay keys (made from their gathered key data)."""
  from jax.experimental import multihost_utils

  def leaf(x):
    if not isinstance(x, jax.Array):
      return np.asarray(x)
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(leaf(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    if x.is_fully_addressable:
      return np.asarray(x)
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  return jax.tree.map(leaf, tree)


def accumulate_gradients(loss_fn: LossFn, params, batch, micro_batches: int):
  """``((loss, magnitudes), grads)`` of a batch, in ``micro_batches`` pieces.

  Micro-batch ``j`` holds rows ``j, j + k, j + 2k, ...`` of the batch, so each
  device's contiguous shard of a sharded batch splits locally.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if micro_batches == 1:
    return grad_fn(params, batch)

  def split(x):
    if x.shape[0] % micro_batches:
      raise ValueError(
          f"make_train_step: a batch of {x.shape[0]} rows does not split into"
          f" micro_batches={micro_batches}; use a batch size divisible by it."
      )
    x = x.reshape(x.shape[0] // micro_batches, micro_batches, *x.shape[1:])
    return jnp.swapaxes(x, 0, 1)

  micro = jax.tree.map(split, batch)
  first = jax.tree.map(lambda x: x[0], micro)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(grad_fn, params, first))

  def add_micro_batch(total, micro_batch):
    return jax.tree.map(jnp.add, total, grad_fn(params, micro_batch)), None

  ((loss, magnitudes), grads), _ = jax.lax.scan(add_micro_batch, zeros, micro)
  scale = 1.0 / micro_batches
  grads = jax.tree.map(lambda g: (g * scale).astype(g.dtype), grads)
  return (loss * scale, magnitudes), grads


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    micro_batches: int = 1,
    mode: str = "jit",
    mesh: Mesh | None = None,
    data_axis: str = "data",
    donate: bool = True,
    state_specs: Callable[[Any], Any] | None = None,
) -> TrainStep:
  """Builds a train step for ``loss_fn(params, batch) -> (loss, magnitudes)``.

  Args:
    loss_fn: the mean loss of a batch, with the magnitudes from
      :func:`migu_jax.apply_with_magnitudes` as aux output.
    tx: the optimizer, e.g. ``optax.chain(migu.mask_by_magnitude(0.7),
      optax.adamw(1e-4))``. It is called once per optimizer step as
      ``tx.update(grads, opt_state, params, magnitudes=...)``; a transformation
      without extra arguments is accepted too.
    micro_batches: gradient accumulation: the batch is processed in this many
      pieces, gradients averaged and magnitudes summed, then one update.
    mode: ``"jit"`` (one device), ``"pmap"`` (every local device, replicated
      parameters, ``lax.pmean`` over the axis named ``data_axis``) or
      ``"mesh"`` (``jax.jit`` over ``mesh``, the batch sharded on ``data_axis``).
    mesh: for ``mode="mesh"``; default: all devices on one ``data_axis``.
    data_axis: name of the data-parallel axis (pmap axis name or mesh axis).
    donate: donate the parameter and optimizer-state buffers to the step.
    state_specs: for ``mode="mesh"``: ``tree -> PartitionSpec per leaf`` for
      the parameters, gradients, optimizer state and magnitudes (statistics
      shaped like their kernels' trailing axes), e.g.
      ``migu.sharding.specs_by_rules(rules, mesh)``; ``place_state`` puts the
      state there. None: replicated on every device.

  Returns:
    A :class:`TrainStep`.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, optax
    >>> import migu_jax as migu
    >>> model = nn.Dense(4)
    >>> def loss_fn(params, batch):
    ...   y, mags = migu.apply_with_magnitudes(model, {"params": params}, batch["x"])
    ...   return jnp.mean((y - batch["y"]) ** 2), mags
    >>> batch = {"x": jnp.ones((8, 3)), "y": jnp.zeros((8, 4))}
    >>> params = model.init(jax.random.key(0), batch["x"])["params"]
    >>> tx = optax.chain(migu.mask_by_magnitude(0.5), optax.sgd(0.1))
    >>> step = migu.make_train_step(loss_fn, tx, micro_batches=2)
    >>> params, opt_state = step.place_state(params), step.place_state(tx.init(params))
    >>> params, opt_state, loss = step(params, opt_state, batch)
  """
  if micro_batches < 1:
    raise ValueError(f"make_train_step: micro_batches={micro_batches} must be >= 1.")
  tx = optax.with_extra_args_support(tx)
  donate_argnums = (0, 1) if donate else ()

  if state_specs is not None and mode != "mesh":
    raise ValueError(f"make_train_step: state_specs shard a mesh's state; use mode='mesh' (got {mode!r}).")

  def hold(tree):  # to the state's specs on the mesh (identity without state_specs)
    if state_specs is None:
      return tree
    return sharding.constrain(tree, mesh, state_specs(tree))

  def train_step(params, opt_state, batch, *, reduce_replicas=None):
    (loss, magnitudes), grads = accumulate_gradients(loss_fn, params, batch, micro_batches)
    if reduce_replicas is not None:
      loss, magnitudes, grads = reduce_replicas((loss, magnitudes, grads))
    grads, magnitudes = hold(grads), hold(magnitudes)
    updates, opt_state = tx.update(grads, opt_state, params, magnitudes=magnitudes)
    return hold(optax.apply_updates(params, updates)), hold(opt_state), loss

  def copy(tree):
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)

  if mode == "jit":
    return TrainStep(jax.jit(train_step, donate_argnums=donate_argnums), copy, lambda b: b, lambda t: t)

  if mode == "pmap":
    n = jax.local_device_count()
    # The sharding pmap gives its outputs: placing inputs the same way keeps the
    # second step from recompiling.
    stacked = NamedSharding(Mesh(np.array(jax.local_devices()), (data_axis,)), P(data_axis))

    def replicate(tree):
      return jax.tree.map(lambda x: jax.device_put(jnp.broadcast_to(x, (n, *jnp.shape(x))), stacked), tree)

    def pmean(tree):
      return jax.lax.pmean(tree, data_axis)

    def place_batch(batch):
      def split(x):
        x = np.asarray(x)
        if x.shape[0] % n:
          raise ValueError(
              f"make_train_step(mode='pmap'): a batch of {x.shape[0]} rows does not"
              f" split over {n} devices; use a batch size divisible by {n}."
          )
        return jax.device_put(x.reshape(n, x.shape[0] // n, *x.shape[1:]), stacked)

      return jax.tree.map(split, batch)

    compiled = jax.pmap(
        lambda p, s, b: train_step(p, s, b, reduce_replicas=pmean),
        axis_name=data_axis,
        donate_argnums=donate_argnums,
    )
    return TrainStep(compiled, replicate, place_batch, jax_utils.unreplicate)

  if mode == "mesh":
    if mesh is None:
      mesh = jax.make_mesh((jax.device_count(),), (data_axis,), axis_types=(AxisType.Auto,))
    replicated = NamedSharding(mesh, P())
    data_sharding = NamedSharding(mesh, P(data_axis))

    def place_leaf(x):
      if isinstance(x, jax.Array) and x.sharding == data_sharding:
        return x
      return jax.make_array_from_process_local_data(data_sharding, np.asarray(x))

    def place_batch(batch):
      return jax.tree.map(place_leaf, batch)

    def place_state(tree):
      if state_specs is None:
        return jax.device_put(copy(tree), replicated)
      return sharding.place(copy(tree), mesh, state_specs(tree))

    return TrainStep(jax.jit(train_step, donate_argnums=donate_argnums), place_state, place_batch, fetch_global)

  raise ValueError(f"make_train_step: mode={mode!r}; expected 'jit', 'pmap' or 'mesh'.")
