"""MIGU's gradient mask as optax transformations.

After backprop, each linear layer keeps the gradient of the output features
whose magnitude ``n_i`` (see ``migu_jax.magnitudes``) reaches the layer's
``T``-quantile, and zeroes the rest:

    keep_i = n_i >= quantile(n, T)          (linear interpolation, as torch.quantile)

``T`` (``ratio``) is the fraction frozen: ``T=0.7`` keeps about 30% of the
output features of every layer. A Flax kernel is ``[in, out]``: an output
feature is a slice of the kernel's output axes, so the mask broadcasts over the
input axes. Only kernels are masked; biases, norms and embeddings keep their
whole gradient.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

Where = Callable[[tuple[str, ...], jax.Array], bool]


def is_kernel(path: tuple[str, ...], leaf: Any) -> bool:
  """Default ``where``: every parameter named ``kernel`` (the linear layers)."""
  del leaf
  return bool(path) and path[-1] == "kernel"


def _is_traced(x) -> bool:
  return isinstance(x, jax.core.Tracer)


def _check_ratio(ratio) -> None:
  if _is_traced(ratio):
    return  # a hyperparameter injected under jit: checked where it was set
  value = float(jnp.asarray(ratio))
  if not 0.0 <= value < 1.0:
    raise ValueError(
        f"mask_by_magnitude: ratio={value} is outside [0, 1). The ratio T is the"
        " fraction of output features whose gradient is zeroed (0.7 keeps 30%)."
    )


def _path_names(path) -> tuple[str, ...]:
  names = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)))
        break
    else:
      names.append(str(key))
  return tuple(names)


def _flatten(tree) -> dict[tuple[str, ...], Any]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_path_names(path): leaf for path, leaf in leaves}


def kept_count(n: int, ratio) -> jax.Array | int:
  """The paper's count of kept features: ``n - floor(T * n)``."""
  if _is_traced(ratio):
    # float32 ratio: nudge products that are integers in exact arithmetic.
    return n - jnp.floor(ratio * n * (1 + 1e-6)).astype(jnp.int32)
  return n - math.floor(float(ratio) * n)


def keep_mask(scores: jax.Array, ratio, *, exact_count: bool = False) -> jax.Array:
  """Which output features of one layer keep their gradient.

  Args:
    scores: importance per output feature (any shape; ranked jointly).
    ratio: ``T``, the fraction frozen, in ``[0, 1)``.
    exact_count: if False (the reference), keep ``scores >= quantile(scores, T)``
      (ties at the threshold are all kept). If True, keep exactly
      ``n - floor(T n)`` features, the largest, ties broken by position.

  Returns:
    A boolean array shaped like ``scores``.

  Example:
    >>> import jax.numpy as jnp
    >>> from migu_jax import keep_mask
    >>> keep_mask(jnp.array([4., 1., 3., 2.]), 0.5).tolist()
    [True, False, True, False]
  """
  flat = scores.reshape(-1).astype(jnp.float32)
  if exact_count:
    order = jnp.argsort(-flat, stable=True)
    ranks = jnp.zeros_like(order).at[order].set(jnp.arange(flat.size, dtype=order.dtype))
    keep = ranks < kept_count(flat.size, ratio)
  else:
    keep = flat >= jnp.quantile(flat, ratio)
  return keep.reshape(scores.shape)


def _raise_not_finite(names: tuple[str, ...], finite) -> None:
  bad = [name for name, ok in zip(names, finite) if not ok]
  if bad:
    raise ValueError(
        f"mask_by_magnitude: the magnitudes of {', '.join(bad)} contain NaN or Inf."
        " The forward pass overflowed (keep the statistics in float32, lower the"
        " learning rate) or the magnitudes were built by hand wrongly."
    )


def _check_finite(named_magnitudes: dict[str, jax.Array]) -> None:
  """One check for all layers: under jit a single host callback, on failure only."""
  if not named_magnitudes:
    return
  names = tuple(named_magnitudes)
  finite = jnp.stack([jnp.all(jnp.isfinite(m)) for m in named_magnitudes.values()])
  if _is_traced(finite):
    jax.lax.cond(
        jnp.all(finite),
        lambda f: None,
        lambda f: jax.debug.callback(functools.partial(_raise_not_finite, names), f),
        finite,
    )
  else:
    _raise_not_finite(names, np.asarray(finite))


def _check_shape(where: str, m: jax.Array, kernel_shape: tuple[int, ...]) -> None:
  tail = kernel_shape[len(kernel_shape) - m.ndim :] if m.ndim else ()
  if m.ndim > len(kernel_shape) or any(a not in (1, b) for a, b in zip(m.shape, tail)):
    raise ValueError(
        f"mask_by_magnitude: the magnitudes of {where} have shape {m.shape}, which"
        f" does not match the output axes of its kernel {kernel_shape}. Expected"
        f" the kernel's trailing output axes, e.g. ({kernel_shape[-1]},) for"
        " nn.Dense; were they captured from another model?"
    )


def layer_masks(
    updates,
    magnitudes,
    score_fn: Callable[[tuple[str, ...], jax.Array], jax.Array],
    ratio,
    *,
    exact_count: bool = False,
    where: Where | None = None,
) -> dict[tuple[str, ...], jax.Array]:
  """The keep-mask of every selected kernel, keyed by parameter path.

  ``score_fn(path, magnitude)`` gives the scores ranked for one layer; each mask
  is shaped like the layer's magnitudes, which broadcast against its kernel.
  """
  if magnitudes is None:
    raise TypeError(
        "mask_by_magnitude: update() needs the keyword argument magnitudes=..., the"
        " statistics from migu.apply_with_magnitudes (the loss function's aux"
        " output): tx.update(grads, opt_state, params, magnitudes=mags)."
    )
  where = where or is_kernel
  flat_mags = _flatten(magnitudes)
  masks, checked = {}, {}
  for path, update in _flatten(updates).items():
    if update is None or not where(path, update):
      continue
    name = "/".join(path)
    if path not in flat_mags:
      raise KeyError(
          f"mask_by_magnitude: no magnitudes for the kernel {name}. Compute the"
          " loss with migu.apply_with_magnitudes over the whole model, or leave"
          " this parameter out of the mask with where=..."
      )
    m = jnp.asarray(flat_mags[path])
    _check_shape(name, m, update.shape)
    checked[name] = m
    masks[path] = keep_mask(score_fn(path, m), ratio, exact_count=exact_count)
  _check_finite(checked)
  return masks


def apply_masks(updates, masks: dict[tuple[str, ...], jax.Array], enabled=True):
  """Zeroes the masked output features of each kernel; dtype preserved."""

  def mask_leaf(path, u):
    keep = masks.get(_path_names(path))
    if keep is None:
      return u
    keep = jnp.logical_or(keep, jnp.logical_not(enabled))
    return jnp.where(keep, u, jnp.zeros((), u.dtype))

  return jax.tree_util.tree_map_with_path(mask_leaf, updates)


def _magnitude_score(path, m):
  del path
  return m


def mask_by_magnitude(
    ratio: float | jax.Array = 0.7,
    *,
    enabled: bool | jax.Array = True,
    exact_count: bool = False,
    axis_name: str | None = None,
    where: Where | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""MIGU: zero the gradient of each linear layer's low-magnitude outputs.

  For each kernel selected by ``where``, with the output magnitudes ``n`` of
  its layer (the keyword-only extra argument ``magnitudes``):

  .. math::
    g_{:, i} \leftarrow g_{:, i} \cdot [\, n_i \ge Q_T(n) \,]

  where :math:`Q_T` is the ``T``-quantile with linear interpolation (the
  default of ``torch.quantile`` and ``jnp.quantile``).

  .. warning::
    The mask acts on the gradient, before the rest of an ``optax.chain``: with
    ``optax.adamw`` after it, masked rows still move through Adam's momentum
    and weight decay, as in the reference implementation. For a true freeze use
    :func:`strict_mask_by_magnitude`.

  Args:
    ratio: ``T`` in ``[0, 1)``, the fraction of output features frozen per layer.
    enabled: switch; ``False`` passes gradients unchanged (MIGU trains the first
      task of a sequence unmasked). Injected with ``optax.inject_hyperparams``,
      both ``ratio`` and ``enabled`` change between tasks without recompiling;
      there give ``enabled=jnp.asarray(True)`` (optax keeps a Python bool
      static).
    exact_count: keep exactly ``d_out - floor(T d_out)`` features (the paper's
      count, via ranks) instead of the quantile threshold.
    axis_name: if set, average the magnitudes over this ``pmap`` axis first
      (``lax.pmean``), so that every replica applies the same mask.
    where: ``where(path, leaf) -> bool`` selects the parameters to mask;
      default (None): every leaf named ``kernel``. Under
      ``optax.inject_hyperparams`` pass it in ``static_args`` (optax would take
      a callable for a schedule).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` takes
    ``magnitudes=`` (from :func:`migu_jax.apply_with_magnitudes`) and ignores
    other extra arguments.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, optax
    >>> import migu_jax as migu
    >>> model = nn.Dense(10)
    >>> x = jax.random.normal(jax.random.key(0), (8, 4))
    >>> params = model.init(jax.random.key(1), x)["params"]
    >>> def loss_fn(params):
    ...   y, mags = migu.apply_with_magnitudes(model, {"params": params}, x)
    ...   return jnp.mean(y ** 2), mags
    >>> (loss, mags), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    >>> tx = optax.chain(migu.mask_by_magnitude(0.7), optax.sgd(0.1))
    >>> updates, _ = tx.update(grads, tx.init(params), params, magnitudes=mags)
    >>> int((updates["kernel"] != 0).any(axis=0).sum())  # 10 - floor(7) kept
    3

  References:
    Du et al., "Unlocking Continual Learning Abilities in Language Models",
    Findings of EMNLP 2024 (arXiv:2406.17245).
  """
  _check_ratio(ratio)

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, *, magnitudes=None, **extra_args):
    del params, extra_args
    if axis_name is not None and magnitudes is not None:
      magnitudes = jax.lax.pmean(magnitudes, axis_name)
    masks = layer_masks(
        updates, magnitudes, _magnitude_score, ratio, exact_count=exact_count, where=where
    )
    return apply_masks(updates, masks, enabled), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class StrictMaskState(NamedTuple):
  """State of :func:`strict_mask_by_magnitude`: the wrapped optimizer's state."""

  inner_state: optax.OptState


def strict_mask_by_magnitude(
    ratio: float | jax.Array,
    optimizer: optax.GradientTransformation,
    *,
    enabled: bool | jax.Array = True,
    exact_count: bool = False,
    axis_name: str | None = None,
    where: Where | None = None,
) -> optax.GradientTransformationExtraArgs:
  """MIGU with a true freeze: masks the gradient and the optimizer's final update.

  Same mask as :func:`mask_by_magnitude`, applied to the gradient before
  ``optimizer`` and again to its output, so masked output features do not move
  at all: no drift from momentum built up on earlier steps, no weight decay.

  Args:
    ratio: ``T`` in ``[0, 1)``.
    optimizer: the wrapped optimizer, e.g. ``optax.adamw(1e-4)`` (or a chain
      with clipping).
    enabled, exact_count, axis_name, where: as in :func:`mask_by_magnitude`.

  Example:
    >>> import optax, migu_jax as migu
    >>> tx = migu.strict_mask_by_magnitude(0.7, optax.adamw(1e-3))
  """
  _check_ratio(ratio)
  optimizer = optax.with_extra_args_support(optimizer)

  def init_fn(params):
    return StrictMaskState(optimizer.init(params))

  def update_fn(updates, state, params=None, *, magnitudes=None, **extra_args):
    if axis_name is not None and magnitudes is not None:
      magnitudes = jax.lax.pmean(magnitudes, axis_name)
    masks = layer_masks(
        updates, magnitudes, _magnitude_score, ratio, exact_count=exact_count, where=where
    )
    updates = apply_masks(updates, masks, enabled)
    updates, inner = optimizer.update(
        updates, state.inner_state, params, magnitudes=magnitudes, **extra_args
    )
    return apply_masks(updates, masks, enabled), StrictMaskState(inner)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class RandomMaskState(NamedTuple):
  """State of :func:`random_mask`: the PRNG key of the next step's mask."""

  key: chex.PRNGKey


def random_mask(
    ratio: float | jax.Array = 0.7,
    *,
    seed: int = 0,
    enabled: bool | jax.Array = True,
    where: Where | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Baseline: zero a random set of output features, as many as MIGU would.

  Each step, each selected kernel keeps ``d_out - floor(T d_out)`` output
  features drawn at random (the reference's ``random_update``). The key lives
  in the state, so every data-parallel replica draws the same mask. The
  features are those of ``magnitudes`` when given (for their shape only), else
  the kernel's last axis.

  Example:
    >>> import jax.numpy as jnp, migu_jax as migu
    >>> params = {"kernel": jnp.ones((4, 10))}
    >>> tx = migu.random_mask(0.7, seed=0)
    >>> updates, state = tx.update(params, tx.init(params), params)
    >>> int((updates["kernel"] != 0).any(axis=0).sum())
    3
  """
  _check_ratio(ratio)

  def init_fn(params):
    del params
    return RandomMaskState(jax.random.key(seed))

  def update_fn(updates, state, params=None, *, magnitudes=None, **extra_args):
    del params, extra_args
    key, step_key = jax.random.split(state.key)
    if magnitudes is None:
      magnitudes = {
          path: jnp.ones(u.shape[-1:])
          for path, u in _flatten(updates).items()
          if (where or is_kernel)(path, u)
      }
      magnitudes = traverse_util.unflatten_dict(magnitudes)
    paths = sorted(_flatten(magnitudes))
    keys = dict(zip(paths, jax.random.split(step_key, max(len(paths), 1))))

    def random_scores(path, m):
      return jax.random.uniform(keys[path], m.shape)

    masks = layer_masks(updates, magnitudes, random_scores, ratio, exact_count=True, where=where)
    return apply_masks(updates, masks, enabled), RandomMaskState(key)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)

