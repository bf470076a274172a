"""Capturing MIGU's output magnitudes from any Flax NNX module.

The NNX counterpart of :func:`migu_jax.apply_with_magnitudes`: for every call
of an ``nnx.Linear``, ``nnx.LinearGeneral`` or ``nnx.Einsum`` inside a model,
the statistic ``n = sum(|y|)`` (float32) of the layer's output ``y`` over every
axis but the output features. Only the reduced statistic is kept, never the
layer's outputs.

The returned ``nnx.State`` is keyed like the model's parameters: the statistic
of ``model.layers[0].attn.q.kernel`` is at ``mags["layers"][0]["attn"]["q"]
["kernel"]``, the path of that ``Param`` in ``nnx.state(model, nnx.Param)``. It
holds plain arrays, so it flattens to the same path names as the gradients
``nnx.Optimizer`` hands to optax, and :func:`migu_jax.mask_by_magnitude`
works unchanged::

    optimizer = nnx.Optimizer(
        model, optax.chain(migu.mask_by_magnitude(0.7), optax.adamw(1e-3)),
        wrt=nnx.Param)

    def loss_fn(model, batch):
      logits, mags = migu_nnx.apply_with_magnitudes(model, batch["x"])
      return loss(logits, batch["y"]), mags

    (loss, mags), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, batch)
    optimizer.update(model, grads, magnitudes=mags)

Statistic shapes are those of the linen path (they broadcast against the
kernel, aligned on trailing axes): ``[out_features]`` for ``nnx.Linear``, the
``out_features`` shape for ``nnx.LinearGeneral`` (batch axes first, size 1 on
the input axes, when it has ``batch_axis``), and the kernel's output axes (size
1 where contracted) for ``nnx.Einsum``. A layer called several times adds up.

How the calls are seen: NNX has no method interceptor like
``flax.linen.intercept_methods``. For the duration of one call,
:func:`apply_with_magnitudes` gives each linear layer *of this model* a float32
accumulator (an ``nnx.Intermediate`` attribute, so it travels through
``nnx.jit``, ``nnx.remat`` and ``nnx.scan`` like any other state) and switches
the instance's class to a cached subclass whose ``__call__`` adds the
statistic to it. Both are undone in a ``finally``; nothing global is patched
(unlike ``nnx.capture(method_outputs=...)``), so other models and threads are
not affected, and disjoint models may be captured in nested calls. A layer is
reported only if it ran (a kernel without a statistic makes
``mask_by_magnitude`` raise, as in the linen path, instead of going unmasked).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from migu_jax.magnitudes import einsum_statistic
from migu_jax.magnitudes import sum_abs
from migu_jax.magnitudes import token_weights

LINEAR_MODULES = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)
"""NNX module types whose calls are captured (subclasses included)."""

_ACCUMULATOR = "_migu_magnitude"  # the temporary attribute on each linear layer


class Magnitude(nnx.Intermediate):
  """The running ``sum |y|`` of one linear layer during a capture (temporary)."""


# ---------------------------------------------------------------------------
# Statistic of one call, and its shape known before the call.


def _einsum_specs(einsum_str: str) -> tuple[str, str]:
  _, rest = einsum_str.replace(" ", "").split(",")
  kernel_spec, out_spec = rest.split("->")
  return kernel_spec, out_spec


def _layer_shapes(layer: nnx.Module, path) -> tuple[int, tuple[int, ...]]:
  """``(kernel ndim, statistic shape)`` of one layer, without stacked axes."""
  if isinstance(layer, nnx.Einsum):
    if layer.einsum_str is None or "..." in _einsum_specs(layer.einsum_str)[0]:
      raise ValueError(
          f"migu_jax.nnx.apply_with_magnitudes: the nnx.Einsum at {_path_str(path)}"
          f" has einsum_str={layer.einsum_str!r}. Its statistic is sized before"
          " the call from the layer's own einsum_str: give the layer one, naming"
          " every kernel axis (no ellipsis)."
      )
    kernel_spec, out_spec = _einsum_specs(layer.einsum_str)
    kshape = layer.kernel.shape[layer.kernel.ndim - len(kernel_spec) :]
    shape = [k if c in out_spec else 1 for c, k in zip(kernel_spec, kshape)]
    first = next((i for i, c in enumerate(kernel_spec) if c in out_spec), len(shape))
    return len(kernel_spec), tuple(shape[first:])
  if isinstance(layer, nnx.LinearGeneral):
    batch = tuple(layer.batch_axis.values())
    n_in = len(layer.in_features)
    stat = batch + (1,) * (n_in if batch else 0) + tuple(layer.out_features)
    return len(batch) + n_in + len(layer.out_features), stat
  return 2, (layer.out_features,)  # nnx.Linear


def _call_statistic(layer: nnx.Module, y: jax.Array, args, kwargs) -> jax.Array:
  """The float32 ``sum |y|`` per output feature of one call."""
  if isinstance(layer, nnx.Einsum):
    einsum_str = args[1] if len(args) > 1 else kwargs.get("einsum_str")
    return einsum_statistic(einsum_str or layer.einsum_str, y)
  if isinstance(layer, nnx.LinearGeneral):
    n_batch, n_out = len(layer.batch_axis), len(layer.out_features)
    stat = sum_abs(y, tuple(range(n_batch)) + tuple(range(y.ndim - n_out, y.ndim)))
    n_in = len(layer.in_features) if n_batch else 0
    return stat.reshape(stat.shape[:n_batch] + (1,) * n_in + stat.shape[n_batch:])
  return sum_abs(y, (y.ndim - 1,))


# ---------------------------------------------------------------------------
# The per-instance interception.


class _Capture:
  """One active capture: its token mask and the layers that ran (static)."""

  def __init__(self, token_mask):
    self.token_mask = token_mask
    self.called: set[tuple[str, ...]] = set()


_ACTIVE: contextvars.ContextVar[tuple[_Capture, ...]] = contextvars.ContextVar(
    "migu_jax_nnx_captures", default=()
)
_CAPTURING_CLASSES: dict[type, type] = {}


def _path_str(path) -> str:
  return "/".join(str(p) for p in path) or "<root>"


def _capturing_call(self, *args, **kwargs):
  base = type(self).__migu_base__
  y = base.__call__(self, *args, **kwargs)
  acc = getattr(self, _ACCUMULATOR, None)
  active = _ACTIVE.get()
  if acc is None or acc.get_metadata("depth") >= len(active):
    return y  # not captured here (e.g. the same instance run by another thread)
  capture = active[acc.get_metadata("depth")]
  path = acc.get_metadata("path")
  weights = token_weights(capture.token_mask, tuple(map(str, path)), y)
  stat = _call_statistic(self, y if weights is None else y * weights, args, kwargs)
  if acc.get_value().shape != stat.shape:
    raise ValueError(_shape_mismatch(path, acc, stat.shape))
  acc.set_value(acc.get_value() + stat)
  capture.called.add(tuple(path))
  return y


def _shape_mismatch(path, acc: Magnitude, shape) -> str:
  where = f"migu_jax.nnx.apply_with_magnitudes: the linear layer at {_path_str(path)}"
  lead = acc.get_metadata("stacked")
  if lead and acc.get_value().shape == tuple(lead) + tuple(shape):
    return (
        f"{where} is stacked {tuple(lead)}, but a lifted transform (nnx.scan,"
        " nnx.vmap) passed its state whole instead of slicing it along the"
        " stacked axis, so its per-layer statistic has no place. Slice the"
        " capture's state like the parameters, e.g. nnx.StateAxes({nnx.Param: 0,"
        " nnx.Intermediate: 0, ...: None}), or unroll the layers in a Python loop."
    )
  return (
      f"{where} produced a statistic of shape {tuple(shape)}, but its kernel's"
      f" output axes give {acc.get_value().shape}. Was an nnx.Einsum called with"
      " an einsum_str other than its own?"
  )


def _capturing_class(cls: type) -> type:
  """A cached subclass of ``cls`` whose ``__call__`` records the statistic."""
  sub = _CAPTURING_CLASSES.get(cls)
  if sub is None:
    sub = type(cls.__name__, (cls,), {"__call__": _capturing_call, "__migu_base__": cls})
    sub.__qualname__ = cls.__qualname__
    sub.__module__ = cls.__module__
    _CAPTURING_CLASSES[cls] = sub
  return sub


@contextlib.contextmanager
def _instrumented(model: nnx.Module, depth: int):
  """Gives each linear layer of ``model`` an accumulator and a capturing class.

  ``depth`` is the capture's index in ``_ACTIVE`` (stable from call to call, so
  it does not make jit caches miss).
  """
  layers = []
  try:
    for path, layer in nnx.iter_modules(model):
      if not isinstance(layer, LINEAR_MODULES):
        continue
      if hasattr(layer, "__migu_base__"):
        raise RuntimeError(
            f"migu_jax.nnx.apply_with_magnitudes: the linear layer at"
            f" {_path_str(path)} is already being captured (a nested"
            " apply_with_magnitudes over the same module)."
        )
      kernel_ndim, stat_shape = _layer_shapes(layer, path)
      stacked = tuple(layer.kernel.shape[: layer.kernel.ndim - kernel_ndim])
      acc = Magnitude(
          jnp.zeros(stacked + stat_shape, jnp.float32),
          path=tuple(path),
          depth=depth,
          stacked=stacked,
          kernel_ndim=kernel_ndim,
      )
      setattr(layer, _ACCUMULATOR, acc)
      object.__setattr__(layer, "__class__", _capturing_class(type(layer)))
      layers.append((tuple(path), layer))
    yield layers
  finally:
    for _, layer in layers:
      object.__setattr__(layer, "__class__", type(layer).__migu_base__)
      if hasattr(layer, _ACCUMULATOR):
        delattr(layer, _ACCUMULATOR)


def apply_with_magnitudes(
    model: nnx.Module,
    *args,
    method: str | Callable[..., Any] | None = None,
    token_mask=None,
    stacked: bool = False,
    **kwargs,
) -> tuple[Any, nnx.State]:
  """Calls ``model`` and returns its outputs with MIGU's output magnitudes.

  For every ``nnx.Linear``, ``nnx.LinearGeneral`` and ``nnx.Einsum`` call inside
  ``model``, computes ``n = sum(|y|)`` (float32) over all axes of the output
  ``y`` but the output features. Call it inside the loss function, under
  ``nnx.value_and_grad`` / ``nnx.jit`` as any forward pass (or ``jax.jit``
  with the model as an argument); layers wrapped in ``nnx.remat`` work as they
  are. As any NNX code that mutates state, it cannot run on a model closed over
  by a raw ``jax`` transform.

  The magnitudes' paths match those of the gradients that ``nnx.Optimizer``
  hands optax, and those of a raw gradient ``State`` (the mask drops a
  Variable's trailing ``.value``), so ``tx.update`` can also be called directly.

  Layers stacked by ``nnx.vmap`` and run under ``nnx.scan`` get one statistic
  per layer, stacked like their kernel (``[L, 1, d_out]`` for a kernel
  ``[L, d_in, d_out]``). :func:`migu_jax.mask_by_magnitude` would rank all
  ``L`` layers jointly (one threshold for the stack, not one per layer), so
  stacked statistics raise an error unless ``stacked=True``; mask those with
  ``migu.mask_by_magnitude(T, stacked_axes=1)`` (one threshold per layer).

  Args:
    model: any ``nnx.Module``; it is left unchanged (see the module docstring
      for how its linear layers are observed during the call).
    *args: positional arguments of the call.
    method: the method to call: None for ``model(*args)``, a method name
      (``"encode"``), or a function called as ``method(model, *args, **kwargs)``.
    token_mask: padding-aware statistics: a 0/1 ``[batch, seq]`` mask (1 for
      real tokens), or a mapping from a module-path prefix (``"encoder"``,
      ``"layers/0"``) to one. Padded positions then do not count. None (the
      reference): every position counts.
    stacked: allow stacked statistics of layers under ``nnx.vmap``/``nnx.scan``
      (see above); their leading axes are the stacked ones.
    **kwargs: keyword arguments of the call.

  Returns:
    ``(outputs, magnitudes)``: ``magnitudes`` is an ``nnx.State`` of float32
    arrays with a statistic at the path of each kernel whose layer ran.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from migu_jax import nnx as migu_nnx
    >>> model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    >>> y, mags = migu_nnx.apply_with_magnitudes(model, jnp.ones((2, 4)))
    >>> mags["kernel"].shape
    (3,)
    >>> bool(jnp.allclose(mags["kernel"], jnp.abs(y).sum(0)))
    True
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(
        f"migu_jax.nnx.apply_with_magnitudes: expected an nnx.Module, got"
        f" {type(model).__name__}. For a flax.linen module use"
        " migu_jax.apply_with_magnitudes(module, variables, *args)."
    )
  capture = _Capture(token_mask)
  depth = len(_ACTIVE.get())
  token = _ACTIVE.set(_ACTIVE.get() + (capture,))
  try:
    with _instrumented(model, depth) as layers:
      if method is None:
        outputs = model(*args, **kwargs)
      elif isinstance(method, str):
        outputs = getattr(model, method)(*args, **kwargs)
      else:
        outputs = method(model, *args, **kwargs)
      flat = {}
      for path, layer in layers:
        if path not in capture.called:
          continue
        acc = getattr(layer, _ACCUMULATOR)
        flat[(*path, "kernel")] = _broadcastable(acc, path, stacked)
  finally:
    _ACTIVE.reset(token)
  return outputs, nnx.State.from_flat_path(flat)


def _broadcastable(acc: Magnitude, path, allow_stacked: bool) -> jax.Array:
  """The accumulated statistic, stacked axes first, shaped to broadcast."""
  value, lead = acc.get_value(), acc.get_metadata("stacked")
  if not lead:
    return value
  if not allow_stacked:
    raise ValueError(
        f"migu_jax.nnx.apply_with_magnitudes: the kernel at {_path_str(path)}"
        f"/kernel is stacked over {len(lead)} leading axis/axes {lead}"
        " (nnx.vmap/nnx.scan over layers). mask_by_magnitude ranks a kernel's"
        " output features jointly, so the stacked layers would share one"
        " threshold instead of one each. Unroll the layers (an nnx.List and a"
        " Python loop) for MIGU training, or pass stacked=True and mask with"
        f" migu.mask_by_magnitude(T, stacked_axes={len(lead)})."
    )
  stat = value.shape[len(lead) :]
  n_in = acc.get_metadata("kernel_ndim") - len(stat)
  return value.reshape(lead + (1,) * n_in + stat)


__all__ = ("LINEAR_MODULES", "Magnitude", "apply_with_magnitudes")
