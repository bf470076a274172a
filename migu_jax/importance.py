"""Where a mask's ranking comes from: importance scores per output feature.

MIGU ranks the output features of a layer by the L1 norm of their outputs
(:func:`output_magnitude`). Its ablation (Table 11 of the paper) and later work
rank by other signals; each is an :class:`Importance` here, so
:func:`migu_jax.mask_by_importance` takes any of them, or one of your own.

For the sources computed from a kernel (gradient, weight, Fisher), the output
features are the kernel's last axis (Flax kernels are ``[in, out]``); the
score of feature ``i`` reduces the kernel slice ``[..., i]``:

=====================  ==================================================
``output_magnitude``   ``n_i = sum |y_i|`` over batch and sequence (MIGU)
``gradient_magnitude``  ``sum |g[..., i]|``
``weight_magnitude``   ``sum |w[..., i]|``
``fisher(decay)``      ``F_i <- decay F_i + (1 - decay) sum g[..., i]^2``
``random_scores(seed)`` uniform noise (the random-mask baseline)
=====================  ==================================================

An importance is two pure functions: ``init(params) -> state`` and
``scores(updates, state, params, magnitudes) -> (scores, state)``, where
``scores`` is a tree whose leaf at a kernel's path broadcasts against that
kernel (as the magnitudes do).

Example:
  >>> import jax.numpy as jnp
  >>> from migu_jax import importance
  >>> grads = {"kernel": jnp.array([[1., -2., 0.], [1., 2., 0.5]])}
  >>> scores, _ = importance.gradient_magnitude().scores(grads, None, None, None)
  >>> scores["kernel"].tolist()
  [2.0, 4.0, 0.5]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax


class Importance(NamedTuple):
  """A source of per-output-feature importance scores (see the module docstring)."""

  init: Callable[[Any], Any]
  scores: Callable[[Any, Any, Any, Any], tuple[Any, Any]]


StackedAxes = int | Mapping[str, int] | None
"""How many leading axes of a layer's scores index stacked (scanned) layers: one number for every masked
leaf, or ``{path prefix: number}`` per leaf (see :func:`stacked_axes_at`)."""


def stacked_axes_at(stacked_axes: StackedAxes, path: tuple[str, ...]) -> int:
  """The stacked (layer) axes of the leaf at ``path`` under ``stacked_axes``.

  An int (or None: 0) applies to every leaf. A mapping gives a path prefix (names joined by "/") its
  count; a leaf takes its longest matching prefix's count, and 0 when none matches. So a layer-scanned
  model whose stacked kernels live under ``layers`` but whose embedding (a tied head's ``[vocab, 1]``
  statistic) or ``lm_head`` do not is masked with ``stacked_axes={"layers": 1}``.

  Example:
    >>> spec = {"model/layers": 1}
    >>> stacked_axes_at(spec, ("model", "layers", "mlp", "up_proj", "kernel"))
    1
    >>> stacked_axes_at(spec, ("model", "embed", "embedding")), stacked_axes_at(2, ("anything",))
    (0, 2)
  """
  if not isinstance(stacked_axes, Mapping):
    return int(stacked_axes or 0)
  matches = [k for k in stacked_axes if tuple(k.split("/")) == path[: len(k.split("/"))]]
  return int(stacked_axes[max(matches, key=len)]) if matches else 0


def _key_names(path) -> tuple[str, ...]:
  return tuple(str(next((getattr(k, a) for a in ("key", "name", "idx") if hasattr(k, a)), k)) for k in path)


def _per_output_feature(x: jax.Array, power: int = 1, stacked_axes: int = 0) -> jax.Array:
  """``sum |x|**power`` over all axes but the last and the ``stacked_axes`` leading (layer) ones, in
  float32: ``[..., d_out]`` kernels give ``[d_out]``, a ``[L, d_in, d_out]`` stack with
  ``stacked_axes=1`` gives ``[L, 1, d_out]`` (shaped like stacked magnitudes, broadcasting against it)."""
  x = jnp.abs(x.astype(jnp.float32)) ** power
  axes = tuple(range(min(stacked_axes, x.ndim - 1), x.ndim - 1))
  return x.sum(axis=axes, keepdims=bool(stacked_axes))


def _per_output_features(tree, power: int, stacked_axes: StackedAxes):
  """:func:`_per_output_feature` of every leaf of ``tree``, each with its stacked axes (:func:`stacked_axes_at`)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: _per_output_feature(x, power, stacked_axes_at(stacked_axes, _key_names(path))), tree)


def _no_state(params):
  del params
  return optax.EmptyState()


def output_magnitude() -> Importance:
  """MIGU's importance: the output magnitudes passed as ``magnitudes=``."""

  def scores(updates, state, params, magnitudes):
    del updates, params
    if magnitudes is None:
      raise TypeError(
          "mask_by_magnitude: update() needs the keyword argument magnitudes=..., the"
          " statistics from migu.apply_with_magnitudes (the loss function's aux"
          " output): tx.update(grads, opt_state, params, magnitudes=mags)."
      )
    return magnitudes, state

  return Importance(_no_state, scores)


def gradient_magnitude(stacked_axes: StackedAxes = 0) -> Importance:
  """``sum |g|`` per output feature: the gradient-based ablation of the paper.

  ``stacked_axes``: leading axes of scanned (stacked) kernels kept apart, one score vector per layer, for
  ``mask_by_importance(..., stacked_axes=...)`` (an int for every leaf, or ``{path prefix: count}``, see
  :func:`stacked_axes_at`); the same for :func:`weight_magnitude` and :func:`fisher`.
  """

  def scores(updates, state, params, magnitudes):
    del params, magnitudes
    return _per_output_features(updates, 1, stacked_axes), state

  return Importance(_no_state, scores)


def weight_magnitude(stacked_axes: StackedAxes = 0) -> Importance:
  """``sum |w|`` per output feature: the weight-based ablation of the paper."""

  def scores(updates, state, params, magnitudes):
    del updates, magnitudes
    if params is None:
      raise TypeError("weight_magnitude: update() needs params: tx.update(grads, state, params, ...).")
    return _per_output_features(params, 1, stacked_axes), state

  return Importance(_no_state, scores)


class FisherState(NamedTuple):
  """Running average of the squared gradient per output feature of each leaf."""

  fisher: Any


def fisher(decay: float = 0.9, stacked_axes: StackedAxes = 0) -> Importance:
  """Diagonal Fisher information per output feature, averaged over recent steps.

  ``F_i <- decay * F_i + (1 - decay) * sum g[..., i]^2`` (an exponential moving
  average; scores are taken after this step's update). The state holds one
  float32 vector per parameter, of its last axis' length (per layer with ``stacked_axes``).
  """

  def init(params):
    return FisherState(_per_output_features(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params), 1,
                                            stacked_axes))

  def scores(updates, state, params, magnitudes):
    del params, magnitudes
    new = jax.tree.map(lambda f, g: decay * f + (1 - decay) * g, state.fisher,
                       _per_output_features(updates, 2, stacked_axes))
    return new, FisherState(new)

  return Importance(init, scores)


class RandomState(NamedTuple):
  """The PRNG key of the next step's random scores."""

  key: jax.Array


def random_scores(seed: int = 0) -> Importance:
  """Uniform random scores: with an exact-count threshold, the random-mask baseline.

  Shaped like ``magnitudes`` when they are given, else one score per index of
  each leaf's last axis. The key lives in the state, so every data-parallel
  replica draws the same scores.
  """

  def init(params):
    del params
    return RandomState(jax.random.key(seed))

  def scores(updates, state, params, magnitudes):
    del params
    key, step_key = jax.random.split(state.key)
    shapes = magnitudes if magnitudes is not None else jax.tree.map(lambda u: u[(0,) * (u.ndim - 1)], updates)
    leaves, treedef = jax.tree.flatten(shapes)
    keys = jax.random.split(step_key, max(len(leaves), 1))
    noise = [jax.random.uniform(k, jnp.shape(leaf)) for k, leaf in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, noise), RandomState(key)

  return Importance(init, scores)


IMPORTANCES: dict[str, Callable[[], Importance]] = {
    "magnitude": output_magnitude,
    "gradient": gradient_magnitude,
    "weight": weight_magnitude,
    "fisher": fisher,
    "random": random_scores,
}
"""Built-in importance sources by name (each a factory with default arguments)."""
