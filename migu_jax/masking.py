"""MIGU's gradient mask as optax transformations.

After backprop, each linear layer keeps the gradient of the output features
whose magnitude ``n_i`` (see ``migu_jax.magnitudes``) reaches the layer's
``T``-quantile, and zeroes the rest:

    keep_i = n_i >= quantile(n, T)          (linear interpolation, as torch.quantile)

The ranking (``migu_jax.importance``) and the rule that turns it into a mask
(:data:`THRESHOLDS`) are pluggable: :func:`mask_by_importance` takes any pair,
:func:`mask_by_magnitude` is MIGU's.

``T`` (``ratio``) is the fraction frozen: ``T=0.7`` keeps about 30% of the
output features of every layer. A Flax kernel is ``[in, out]``: an output
feature is a slice of the kernel's output axes, so the mask broadcasts over the
input axes. Only kernels are masked, and embeddings that serve as a tied output
layer (by vocabulary row); biases, norms and input embeddings keep their whole
gradient.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from migu_jax import importance as importance_lib
from migu_jax.importance import StackedAxes, stacked_axes_at

Where = Callable[[tuple[str, ...], jax.Array], bool]


def is_kernel(path: tuple[str, ...], leaf: Any) -> bool:
  """Every parameter named ``kernel`` (the linear layers): ``where`` that leaves tied embeddings out."""
  del leaf
  return bool(path) and path[-1] == "kernel"


def is_output_layer(path: tuple[str, ...], leaf: Any) -> bool:
  """Default ``where``: every kernel, and every embedding used as a tied output layer.

  An ``embedding`` is masked only when the magnitudes have a statistic for it
  (:func:`migu_jax.apply_with_magnitudes` captures ``nn.Embed.attend``, the
  tied LM head); an embedding that only embeds inputs has none and keeps its
  whole gradient.
  """
  del leaf
  return bool(path) and path[-1] in ("kernel", "embedding")


def _is_traced(x) -> bool:
  return isinstance(x, jax.core.Tracer)


def _check_ratio(ratio) -> None:
  if _is_traced(ratio):
    return  # a hyperparameter injected under jit: checked where it was set
  value = float(np.asarray(ratio))  # numpy: a Python number stays concrete under jit
  if not 0.0 <= value < 1.0:
    raise ValueError(
        f"mask_by_magnitude: ratio={value} is outside [0, 1). The ratio T is the"
        " fraction of output features whose gradient is zeroed (0.7 keeps 30%)."
    )


def _path_names(path) -> tuple[str, ...]:
  """Names of a tree path; a trailing ``.value`` (a Flax NNX Variable's) is dropped."""
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
    path = path[:-1]
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


def quantile_rule(scores: jax.Array, ratio) -> jax.Array:
  """The reference: keep ``s_i >= quantile(s, T)`` (ties at the threshold all kept)."""
  return scores >= jnp.quantile(scores, ratio)


def _descending_ranks(scores: jax.Array) -> jax.Array:
  order = jnp.argsort(-scores, stable=True)
  return jnp.zeros_like(order).at[order].set(jnp.arange(scores.size, dtype=order.dtype))


def top_k_rule(scores: jax.Array, ratio) -> jax.Array:
  """The paper's count: keep exactly ``n - floor(T n)`` largest (ties by position)."""
  return _descending_ranks(scores) < kept_count(scores.size, ratio)


def l1_mass_rule(scores: jax.Array, ratio) -> jax.Array:
  """Adaptive: keep the fewest largest features that hold ``1 - T`` of the L1 mass.

  With ``s`` sorted descending, keep feature ``k`` iff ``sum_{j<k} s_j <
  (1 - T) sum_j s_j``. A flat layer keeps about ``1 - T`` of its features, like
  the quantile; a layer whose mass sits in few features keeps only those.
  Scores must be non-negative.
  """
  sorted_desc = -jnp.sort(-scores)
  mass_before = jnp.cumsum(sorted_desc) - sorted_desc
  keep_sorted = mass_before < (1 - ratio) * jnp.sum(scores)
  return keep_sorted[_descending_ranks(scores)]


THRESHOLDS: dict[str, Callable[[jax.Array, Any], jax.Array]] = {
    "quantile": quantile_rule,
    "top_k": top_k_rule,
    "l1_mass": l1_mass_rule,
}
"""Threshold rules by name: ``rule(scores, ratio) -> keep`` on one layer's flat scores."""


def keep_mask(scores: jax.Array, ratio, *, threshold: str | Callable = "quantile") -> jax.Array:
  """Which output features of one layer keep their gradient.

  Args:
    scores: importance per output feature (any shape; ranked jointly).
    ratio: ``T``, the fraction frozen, in ``[0, 1)``.
    threshold: a rule of :data:`THRESHOLDS` (``"quantile"``, the reference;
      ``"top_k"``, exactly ``n - floor(T n)`` kept; ``"l1_mass"``) or a callable
      ``rule(flat_scores, ratio) -> flat_keep``.

  Returns:
    A boolean array shaped like ``scores``.

  Example:
    >>> import jax.numpy as jnp
    >>> from migu_jax import keep_mask
    >>> keep_mask(jnp.array([4., 1., 3., 2.]), 0.5).tolist()
    [True, False, True, False]
    >>> keep_mask(jnp.array([7., 1., 1., 1.]), 0.5, threshold="l1_mass").tolist()
    [True, False, False, False]
  """
  rule = THRESHOLDS[threshold] if isinstance(threshold, str) else threshold
  return rule(scores.reshape(-1).astype(jnp.float32), ratio).reshape(scores.shape)


def _raise_not_finite(names: tuple[str, ...], finite) -> None:
  bad = [name for name, ok in zip(names, finite) if not ok]
  if bad:
    raise ValueError(
        f"mask_by_magnitude: the magnitudes of {', '.join(bad)} contain NaN or Inf."
        " The forward pass overflowed (keep the statistics in float32, lower the"
        " learning rate) or the magnitudes were built by hand wrongly."
    )


def _finite_flags(named_scores: dict) -> dict:
  """``{key: finite}``, one boolean scalar per layer; raises at once when the scores are concrete.

  Layers of one shape are stacked (as :func:`_masks_by_shape` stacks them for
  the sort; XLA computes the stack once) and reduced to one ``max |s|`` each:
  one fused reduction per shape. Under jit nothing is raised (a conditional
  host callback cost about 5% of a CPU train step); the caller poisons the
  layer's update instead (:func:`_poison_not_finite`), so a non-finite
  statistic can never silently zero a layer's gradient.
  """
  if not named_scores:
    return {}
  groups: dict[tuple, list] = {}
  for key, m in named_scores.items():
    groups.setdefault((m.shape, m.dtype), []).append(key)
  keys = [key for group in groups.values() for key in group]
  peaks = []
  for group in groups.values():
    stack = jnp.stack([named_scores[k] for k in group]).reshape(len(group), -1)
    peaks.append(jnp.max(jnp.abs(stack), axis=1) if stack.shape[1] else jnp.zeros(len(group), stack.dtype))
  finite = jnp.isfinite(jnp.concatenate(peaks))
  if not _is_traced(finite):
    _raise_not_finite(tuple("/".join(k) for k in keys), np.asarray(finite))
  return dict(zip(keys, finite))


def _poison_not_finite(updates, finite: dict):
  """NaN in every entry of a layer whose statistics were not finite (a select fused into the mask)."""

  def leaf(path, u):
    ok = finite.get(_path_names(path))
    return u if ok is None else jnp.where(ok, u, jnp.full((), jnp.nan, u.dtype))

  return jax.tree_util.tree_map_with_path(leaf, updates)


def _check_shape(where: str, m: jax.Array, kernel_shape: tuple[int, ...]) -> None:
  tail = kernel_shape[len(kernel_shape) - m.ndim :] if m.ndim else ()
  # Axes of size 1 broadcast (a kernel's input axes), but a single number selects no output feature.
  single = m.size == 1 and kernel_shape and kernel_shape[-1] > 1
  if single or m.ndim > len(kernel_shape) or any(a not in (1, b) for a, b in zip(m.shape, tail)):
    raise ValueError(
        f"mask_by_magnitude: the magnitudes of {where} have shape {m.shape}, which"
        f" does not match the output axes of its kernel {kernel_shape}. Expected"
        f" the kernel's trailing output axes, e.g. ({kernel_shape[-1]},) for"
        " nn.Dense; were they captured from another model?"
    )


def _masks_by_shape(scores: dict, ratio, threshold) -> dict:
  """:func:`keep_mask` of each layer, one batched threshold per score shape.

  Layers of the same width share one (vmapped) sort instead of one each: a
  transformer has a handful of widths, and dozens of layers.
  """
  groups: dict[tuple, list] = {}
  for path, s in scores.items():
    groups.setdefault((s.shape, s.dtype), []).append(path)
  masks = {}
  for paths in groups.values():
    if len(paths) == 1:
      masks[paths[0]] = keep_mask(scores[paths[0]], ratio, threshold=threshold)
      continue
    batch = jnp.stack([scores[p] for p in paths])
    keep = jax.vmap(lambda x: keep_mask(x, ratio, threshold=threshold))(batch)
    masks.update(zip(paths, keep))
  return masks


def layer_masks(
    updates,
    scores,
    ratio,
    *,
    threshold: str | Callable = "quantile",
    where: Where | None = None,
    stacked_axes: StackedAxes = None,
) -> dict[tuple[str, ...], jax.Array]:
  """The keep-mask of every kernel selected by ``where``, keyed by parameter path.

  Args:
    updates: the gradient (or any tree shaped like the parameters).
    scores: per-output-feature scores, a tree like the magnitudes: the leaf at
      a kernel's path broadcasts against the kernel.
    ratio, threshold: as in :func:`keep_mask`.
    where: ``where(path, leaf) -> bool``; default :func:`is_kernel`. With
      :func:`is_output_layer`, ``embedding`` leaves that have scores (tied
      output layers) are masked by row; a selected ``embedding`` without
      scores is skipped.
    stacked_axes: the scores' leading axes that index separate layers (kernels
      stacked by ``nn.scan``/``nnx.scan``): each layer gets its own threshold.
      An int for every leaf, or ``{path prefix: count}`` per leaf
      (:func:`stacked_axes_at`).

  Returns:
    ``{path: keep}``, each ``keep`` shaped like the layer's scores.

  Raises:
    ValueError: concrete scores with a NaN or Inf (under jit, the
      transformations of this module make that layer's update NaN instead).
  """
  return _masks_and_flags(updates, scores, ratio, threshold=threshold, where=where, stacked_axes=stacked_axes)[0]


def _per_layer_mask(name: str, s: jax.Array, n: int, ratio, threshold) -> jax.Array:
  """:func:`keep_mask` of each layer of scores ``s`` whose ``n`` leading axes index stacked layers."""
  if s.ndim <= n:
    raise ValueError(
        f"mask_by_magnitude: the scores of {name} have shape {s.shape}, with no"
        f" output axis after the {n} stacked (layer) axes, so every"
        " layer's features would share one threshold. Capture them with"
        " apply_with_magnitudes(..., stacked=True), or build the importance with"
        f" stacked_axes={n} (e.g. importance.gradient_magnitude(stacked_axes={n}))."
    )
  per_layer = s.reshape((-1,) + s.shape[n:])
  return jax.vmap(lambda x: keep_mask(x, ratio, threshold=threshold))(per_layer).reshape(s.shape)


def _masks_and_flags(updates, scores, ratio, *, threshold, where, stacked_axes):
  """:func:`layer_masks` and ``{path: finite}`` of each masked layer's scores (see :func:`_finite_flags`)."""
  where = where or is_kernel
  flat_scores = _flatten(scores)
  masks, checked, single = {}, {}, {}
  for path, update in _flatten(updates).items():
    if update is None or not where(path, update):
      continue
    name = "/".join(path)
    if path not in flat_scores and path[-1] == "embedding":
      continue  # an input embedding: not an output layer (a tied head has a statistic)
    if path not in flat_scores:
      raise KeyError(
          f"mask_by_magnitude: no magnitudes for the kernel {name}. Compute the"
          " loss with migu.apply_with_magnitudes over the whole model, or leave"
          " this parameter out of the mask with where=..."
      )
    s = jnp.asarray(flat_scores[path])
    _check_shape(name, s, update.shape)
    checked[path] = s
    n = stacked_axes_at(stacked_axes, path)
    if n:
      masks[path] = _per_layer_mask(name, s, n, ratio, threshold)
    else:
      single[path] = s
  masks.update(_masks_by_shape(single, ratio, threshold))
  if not masks:
    raise ValueError(
        "mask_by_magnitude: no parameter was selected for masking (default: leaves"
        " named 'kernel'), so nothing would be masked. Pass the gradient tree of the"
        " model's parameters, or select the masked leaves with where=..."
    )
  return masks, _finite_flags(checked)


def apply_masks(updates, masks: dict[tuple[str, ...], jax.Array], enabled=True):
  """Zeroes the masked output features of each kernel; dtype preserved."""

  def mask_leaf(path, u):
    keep = masks.get(_path_names(path))
    if keep is None:
      return u
    keep = jnp.logical_or(keep, jnp.logical_not(enabled))
    return jnp.where(keep, u, jnp.zeros((), u.dtype))

  return jax.tree_util.tree_map_with_path(mask_leaf, updates)


class MaskState(NamedTuple):
  """State of a mask transformation: its importance source's state."""

  importance: optax.OptState


class StrictMaskState(NamedTuple):
  """State of a strict mask: the importance state and the wrapped optimizer's."""

  importance: optax.OptState
  inner_state: optax.OptState


def mask_by_importance(
    ratio: float | jax.Array,
    importance: importance_lib.Importance,
    *,
    threshold: str | Callable = "quantile",
    enabled: bool | jax.Array = True,
    axis_name: str | None = None,
    where: Where | None = None,
    stacked_axes: StackedAxes = None,
    optimizer: optax.GradientTransformation | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Zero the gradient of each kernel's least important output features.

  The general form of MIGU: per kernel selected by ``where``, rank its output
  features by ``importance`` (:mod:`migu_jax.importance`) and keep those that
  pass ``threshold`` (:data:`THRESHOLDS`) at ``ratio``.

  Args:
    ratio: ``T`` in ``[0, 1)``, the fraction of output features frozen per layer.
    importance: an :class:`migu_jax.importance.Importance`.
    threshold: a name in :data:`THRESHOLDS` or ``rule(flat_scores, ratio)``.
    enabled: switch; ``False`` passes gradients unchanged.
    axis_name: average the ``magnitudes`` over this ``pmap`` axis first.
    where: ``where(path, leaf) -> bool`` selects the masked parameters.
    stacked_axes: leading axes of the scores that index stacked layers (a
      scanned layer stack); each layer is thresholded on its own. An int for
      every leaf, or ``{path prefix: count}`` (:func:`stacked_axes_at`).
    optimizer: if given, the transformation wraps it and masks its final
      update too (the strict mode, see :func:`strict_mask_by_magnitude`).

  Example:
    >>> import jax.numpy as jnp, optax, migu_jax as migu
    >>> grads = {"kernel": jnp.array([[1., -4., 2., 0.], [1., 4., 2., 0.]])}
    >>> tx = migu.mask_by_importance(0.5, migu.importance.gradient_magnitude())
    >>> updates, _ = tx.update(grads, tx.init(grads))
    >>> updates["kernel"].tolist()
    [[0.0, -4.0, 2.0, 0.0], [0.0, 4.0, 2.0, 0.0]]
  """
  _check_ratio(ratio)
  if optimizer is not None:
    optimizer = optax.with_extra_args_support(optimizer)

  def init_fn(params):
    if optimizer is None:
      return MaskState(importance.init(params))
    return StrictMaskState(importance.init(params), optimizer.init(params))

  def update_fn(updates, state, params=None, *, magnitudes=None, **extra_args):
    if axis_name is not None and magnitudes is not None:
      magnitudes = jax.lax.pmean(magnitudes, axis_name)
    scores, importance_state = importance.scores(updates, state.importance, params, magnitudes)
    masks, finite = _masks_and_flags(
        updates, scores, ratio, threshold=threshold, where=where, stacked_axes=stacked_axes
    )
    updates = _poison_not_finite(apply_masks(updates, masks, enabled), finite)
    if optimizer is None:
      return updates, MaskState(importance_state)
    updates, inner = optimizer.update(
        updates, state.inner_state, params, magnitudes=magnitudes, **extra_args
    )
    return _poison_not_finite(apply_masks(updates, masks, enabled), finite), StrictMaskState(importance_state, inner)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def resolve_threshold(exact_count: bool, threshold: str | Callable | None) -> str | Callable:
  """The threshold rule of ``exact_count`` and ``threshold``: ``"top_k"`` with ``exact_count``, else
  ``threshold``, else ``"quantile"``; an ``exact_count`` beside another rule is an error.

  Example:
    >>> resolve_threshold(True, None), resolve_threshold(False, None), resolve_threshold(False, "l1_mass")
    ('top_k', 'quantile', 'l1_mass')
  """
  if exact_count and threshold not in (None, "top_k"):
    raise ValueError(f"exact_count=True is threshold='top_k', not {threshold!r}: leave threshold unset (None) or "
                     "drop exact_count.")
  return "top_k" if exact_count else (threshold or "quantile")


def mask_by_magnitude(
    ratio: float | jax.Array = 0.7,
    *,
    enabled: bool | jax.Array = True,
    exact_count: bool = False,
    threshold: str | Callable | None = None,
    axis_name: str | None = None,
    where: Where | None = None,
    stacked_axes: StackedAxes = None,
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
      count, via ranks) instead of the quantile threshold; the same as
      ``threshold="top_k"``.
    threshold: another rule of :data:`THRESHOLDS` (default: the quantile).
    axis_name: if set, average the magnitudes over this ``pmap`` axis first
      (``lax.pmean``), so that every replica applies the same mask.
    where: ``where(path, leaf) -> bool`` selects the parameters to mask;
      default (None): every leaf named ``kernel`` and every tied output
      embedding (:func:`is_output_layer`); ``where=migu.is_kernel`` leaves
      the embedding out. Under
      ``optax.inject_hyperparams`` pass it in ``static_args`` (optax would take
      a callable for a schedule).
    stacked_axes: for kernels stacked over layers (``nn.scan``/``nnx.scan``,
      e.g. ``migu.apply_with_magnitudes(..., stacked=True)``): the number of
      leading stacked axes; each layer gets its own threshold. An int applies
      to every masked leaf (a leaf whose scores have no axis after it is an
      error); a mapping ``{path prefix: count}`` applies per leaf, 0 where no
      prefix matches (:func:`stacked_axes_at`): a scanned Llama takes
      ``{"layers": 1}``, so its layer kernels are thresholded per layer and
      its tied embedding or ``lm_head`` as one layer (example below). Under
      ``optax.inject_hyperparams`` name it in ``static_args``.

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

    A scanned stack beside an unstacked head: one threshold per layer, and one for the head.

    >>> grads = {"layers": {"kernel": jnp.ones((2, 4, 10))}, "head": {"kernel": jnp.ones((4, 10))}}
    >>> mags = {"layers": {"kernel": jnp.stack([jnp.arange(10.), -jnp.arange(10.)])[:, None]},
    ...         "head": {"kernel": jnp.arange(10.)}}
    >>> tx = migu.mask_by_magnitude(0.7, stacked_axes={"layers": 1})
    >>> updates, _ = tx.update(grads, tx.init(grads), magnitudes=mags)
    >>> (updates["layers"]["kernel"][:, 0] != 0).astype(int).tolist()
    [[0, 0, 0, 0, 0, 0, 0, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]]
    >>> (updates["head"]["kernel"][0] != 0).astype(int).tolist()
    [0, 0, 0, 0, 0, 0, 0, 1, 1, 1]

  References:
    Du et al., "Unlocking Continual Learning Abilities in Language Models",
    Findings of EMNLP 2024 (arXiv:2406.17245).
  """
  return mask_by_importance(
      ratio, importance_lib.output_magnitude(), threshold=resolve_threshold(exact_count, threshold),
      enabled=enabled, axis_name=axis_name, where=where or is_output_layer, stacked_axes=stacked_axes,
  )


def strict_mask_by_magnitude(
    ratio: float | jax.Array,
    optimizer: optax.GradientTransformation,
    *,
    enabled: bool | jax.Array = True,
    exact_count: bool = False,
    threshold: str | Callable | None = None,
    axis_name: str | None = None,
    where: Where | None = None,
    stacked_axes: StackedAxes = None,
) -> optax.GradientTransformationExtraArgs:
  """MIGU with a true freeze: masks the gradient and the optimizer's final update.

  Same mask as :func:`mask_by_magnitude`, applied to the gradient before
  ``optimizer`` and again to its output, so masked output features do not move
  at all: no drift from momentum built up on earlier steps, no weight decay.

  Args:
    ratio: ``T`` in ``[0, 1)``.
    optimizer: the wrapped optimizer, e.g. ``optax.adamw(1e-4)`` (or a chain
      with clipping).
    enabled, exact_count, threshold, axis_name, where, stacked_axes: as in
      :func:`mask_by_magnitude`.

  Example:
    >>> import optax, migu_jax as migu
    >>> tx = migu.strict_mask_by_magnitude(0.7, optax.adamw(1e-3))
  """
  return mask_by_importance(
      ratio, importance_lib.output_magnitude(), threshold=resolve_threshold(exact_count, threshold),
      enabled=enabled, axis_name=axis_name, where=where or is_output_layer, stacked_axes=stacked_axes,
      optimizer=optimizer,
  )


def random_mask(
    ratio: float | jax.Array = 0.7,
    *,
    seed: int = 0,
    enabled: bool | jax.Array = True,
    where: Where | None = None,
    stacked_axes: StackedAxes = None,
) -> optax.GradientTransformationExtraArgs:
  """Baseline: zero a random set of output features, as many as MIGU would.

  Each step, each selected kernel keeps ``d_out - floor(T d_out)`` output
  features drawn at random (the reference's ``random_update``). The key lives
  in the state, so every data-parallel replica draws the same mask. The
  features are those of ``magnitudes`` when given (for their shape only), else
  the kernel's last axis. ``stacked_axes``: as in :func:`mask_by_magnitude` (the count per layer of a
  scanned stack).

  Example:
    >>> import jax.numpy as jnp, migu_jax as migu
    >>> params = {"kernel": jnp.ones((4, 10))}
    >>> tx = migu.random_mask(0.7, seed=0)
    >>> updates, state = tx.update(params, tx.init(params), params)
    >>> int((updates["kernel"] != 0).any(axis=0).sum())
    3
  """
  return mask_by_importance(
      ratio, importance_lib.random_scores(seed), threshold="top_k", enabled=enabled, where=where,
      stacked_axes=stacked_axes,
  )
