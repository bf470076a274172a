"""Capturing MIGU's output magnitudes from any flax.linen module.

MIGU ranks the output features of every linear layer by the L1 norm of their
activations: for a layer with output ``y`` of shape ``[..., d_out]`` the
statistic is ``n = sum(|y|)`` over every axis but the output features, in
float32. ``apply_with_magnitudes`` computes it for every ``nn.Dense``,
``nn.DenseGeneral`` and ``nn.Einsum`` call of a module, without changing the
module, by intercepting those calls (``flax.linen.intercept_methods``) and
sowing the statistic into a collection of its own.

The returned tree mirrors the parameters: the statistic of the kernel at
``params['Block_0']['Dense_0']['kernel']`` is at
``magnitudes['Block_0']['Dense_0']['kernel']``. Each statistic is shaped to
broadcast against its kernel (numpy rules, aligned on trailing axes): a vector
of length ``d_out`` for ``nn.Dense``, the ``features`` shape for
``nn.DenseGeneral``, and the kernel's output axes (size 1 where the kernel axis
is contracted) for ``nn.Einsum``. A layer called several times in one forward
pass adds up.

A tied output layer (``nn.Embed.attend``: logits read through the token
embedding, as in Llama/SmolLM2 with ``tie_word_embeddings`` and T5 v1.0) is
captured too, as the reference's ``lm_head`` hook sees it: its statistic is one
number per vocabulary entry, at ``magnitudes[...]["embedding"]`` shaped
``[vocab, 1]``, so the mask selects rows of the shared embedding matrix.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

COLLECTION = "magnitudes"
"""Name of the flax collection the statistics are sown into."""

LINEAR_MODULES = (nn.Dense, nn.DenseGeneral, nn.Einsum)
"""Module types whose calls are captured."""


def _sum_leading(x: jax.Array, fan_in: int = 8) -> jax.Array:
  """Sum over the leading axis as a tree of slice adds, ``fan_in`` rows at a time.

  Not ``jnp.sum``: XLA:CPU hands a plain sum to its YNNPACK reduction, which
  cannot take the layer's bias add (a broadcast), so every linear output would
  be written and read back once more (+7.7% bytes accessed for a 6-block
  stack). Adds of slices are elementwise: the first level fuses ``|x W + b|``
  into one read of the matmul's output and writes an eighth of it.
  """
  if x.shape[0] == 0:
    return jnp.zeros(x.shape[1:], x.dtype)
  while x.shape[0] > 1:
    rows = -(-x.shape[0] // fan_in) * fan_in
    x = jnp.pad(x, [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1))
    x = x.reshape(rows // fan_in, fan_in, *x.shape[1:])
    x = functools.reduce(jnp.add, [x[:, j] for j in range(fan_in)])
  return x[0]


def sum_abs(y: jax.Array, keep_axes: tuple[int, ...]) -> jax.Array:
  """MIGU's statistic: the float32 sum of ``|y|`` over every axis of ``y`` not in ``keep_axes``.

  ``keep_axes`` are the output-feature axes (``(y.ndim - 1,)`` for a dense layer's ``[..., features]``
  output); they stay, in ``y``'s order. ``y`` is not differentiated through. Every capture (linen,
  :mod:`migu_jax.nnx`, :mod:`migu_jax.lora`) computes its statistics with this function.

  Example:
    >>> import jax.numpy as jnp
    >>> sum_abs(jnp.array([[1.0, -2.0], [-3.0, 4.0]]), (1,))
    Array([4., 6.], dtype=float32)
  """
  reduce = [a for a in range(y.ndim) if a not in keep_axes]
  magnitude = jnp.abs(jax.lax.stop_gradient(y).astype(jnp.float32))
  magnitude = jnp.transpose(magnitude, reduce + sorted(keep_axes))  # kept axes in y's order
  kept_shape = magnitude.shape[len(reduce):]
  return _sum_leading(magnitude.reshape(-1, *kept_shape) if reduce else magnitude[None])


def einsum_statistic(einsum_str: str, y: jax.Array) -> jax.Array:
  """Statistic of an ``nn.Einsum`` output, shaped like the kernel's trailing axes.

  Kernel axes that appear in the output are output features; contracted kernel
  axes get size 1 so the result broadcasts against the kernel.
  """
  spec = einsum_str.replace(" ", "")
  _, rest = spec.split(",")
  kernel_spec, out_spec = rest.split("->")
  if "..." in kernel_spec:
    raise ValueError(
        f"apply_with_magnitudes: nn.Einsum kernel spec {kernel_spec!r} uses an"
        " ellipsis; name every kernel axis explicitly."
    )
  n_ellipsis = y.ndim - len(out_spec.replace("...", ""))
  out_axes = out_spec.replace("...", "." * n_ellipsis)
  kept = [out_axes.index(c) for c in kernel_spec if c in out_axes]
  stat = sum_abs(y, tuple(kept))
  # Order the kept axes as in the kernel, then insert size-1 contracted axes.
  order = sorted(range(len(kept)), key=lambda i: kept[i])
  stat = jnp.transpose(stat, [order.index(i) for i in range(len(kept))])
  shape = [y.shape[out_axes.index(c)] if c in out_axes else 1 for c in kernel_spec]
  first = next(i for i, c in enumerate(kernel_spec) if c in out_axes)
  return stat.reshape(shape[first:])


def output_statistic(module: nn.Module, y: jax.Array, args, kwargs) -> jax.Array:
  """The float32 sum of |y| per output feature of one linear-layer call."""
  if isinstance(module, nn.Einsum):
    einsum_str = args[1] if len(args) > 1 else kwargs.get("einsum_str")
    return einsum_statistic(einsum_str or module.einsum_str, y)
  if isinstance(module, nn.DenseGeneral):
    n_features = len(module.features) if isinstance(module.features, tuple) else 1
    batch_dims = module.batch_dims if isinstance(module.batch_dims, tuple) else (module.batch_dims,)
    # dot_general output: [batch dims] + [free input dims] + [features].
    n_batch = len(batch_dims)
    stat = sum_abs(y, tuple(range(n_batch)) + tuple(range(y.ndim - n_features, y.ndim)))
    n_in = len(module.axis) if isinstance(module.axis, tuple) else 1
    return stat.reshape(stat.shape[:n_batch] + (1,) * (n_in if n_batch else 0) + stat.shape[n_batch:])
  return sum_abs(y, (y.ndim - 1,))  # nn.Dense


def tied_head_statistic(y: jax.Array) -> jax.Array:
  """Statistic of an ``nn.Embed.attend`` output ``[..., vocab]``: ``[vocab, 1]``, one per embedding row."""
  return sum_abs(y, (y.ndim - 1,))[:, None]


def sow_sum(module: nn.Module, collection: str, name: str, stat: jax.Array) -> None:
  """Adds ``stat`` to ``module``'s ``collection/name``, which starts at float32 zeros.

  Several calls of one layer (a shared layer, an encoder run twice) sum into one statistic.
  """
  module.sow(collection, name, stat, init_fn=lambda: jnp.zeros(stat.shape, jnp.float32), reduce_fn=jnp.add)


def mutable_list(mutable) -> list[str]:
  """``module.apply``'s ``mutable`` argument (False, a name or names) as a list of collection names."""
  return [] if mutable is False else ([mutable] if isinstance(mutable, str) else list(mutable))


def token_weights(token_mask, path: tuple[str, ...], y: jax.Array):
  """The 0/1 token mask that applies to the output ``y`` of the layer at ``path``.

  ``token_mask`` is one ``[batch, seq]`` array, or a mapping from a module-path
  prefix (``"encoder"``, ``"decoder"``) to one; the longest matching prefix wins.
  Outputs without the mask's leading shape (e.g. a pooled ``[batch, d]``) are
  not weighted: they have no padded positions.
  """
  if token_mask is None:
    return None
  if isinstance(token_mask, Mapping):
    prefixes = [k for k in token_mask if tuple(k.split("/")) == path[: len(k.split("/"))]]
    if not prefixes:
      return None
    token_mask = token_mask[max(prefixes, key=len)]
  w = jnp.asarray(token_mask)
  if y.ndim <= w.ndim:
    return None
  if y.shape[: w.ndim] != w.shape:
    raise ValueError(
        f"apply_with_magnitudes: token_mask of shape {w.shape} does not match the"
        f" output {y.shape} of the linear layer at {'/'.join(path)}. For an"
        " encoder-decoder pass one mask per stack, e.g."
        " token_mask={'encoder': encoder_mask, 'decoder': decoder_mask}."
    )
  return w.reshape(w.shape + (1,) * (y.ndim - w.ndim)).astype(y.dtype)


def apply_with_magnitudes(
    module: nn.Module, variables, *args, mutable=False, token_mask=None, stacked=False,
    tied_heads=True, **kwargs
):
  """Runs ``module.apply`` and returns its outputs with MIGU's output magnitudes.

  For every ``nn.Dense``, ``nn.DenseGeneral`` and ``nn.Einsum`` call inside
  ``module``, computes ``n = sum(|y|)`` (float32) over all axes of the output
  ``y`` but the output features. Works under ``jax.jit`` and ``nn.remat``
  (trace it inside the jitted function, as any ``apply``). A linear layer under
  ``nn.scan`` raises an error rather than losing its statistic or sharing one
  threshold over the stack, unless ``stacked=True`` (below).

  Args:
    module: any flax.linen module; it is not changed.
    variables: the module's variables, e.g. ``{"params": params}``.
    *args: positional arguments of ``module.apply``.
    mutable: other collections to make mutable (as in ``module.apply``). When
      given, the outputs are ``(outputs, mutated_variables)``.
    token_mask: padding-aware statistics: a 0/1 ``[batch, seq]`` mask (1 for
      real tokens), or a mapping from a module-path prefix to one (for an
      encoder-decoder: ``{"encoder": ..., "decoder": ...}``). Padded positions
      then do not count. None (the reference): every position counts.
    stacked: return one statistic per layer of a scanned stack (see below).
    tied_heads: capture ``nn.Embed.attend`` calls (a tied output layer) as a
      ``[vocab, 1]`` statistic of the embedding (default, as the reference);
      False leaves the embedding without a statistic, so it is never masked.
    **kwargs: keyword arguments of ``module.apply`` (``rngs``, ``method``, ...).

  Returns:
    ``(outputs, magnitudes)``: ``magnitudes`` is a nested dict that mirrors the
    parameter tree, with a float32 statistic at each captured kernel's path.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from migu_jax import apply_with_magnitudes
    >>> model = nn.Dense(3)
    >>> x = jnp.ones((2, 4))
    >>> variables = model.init(jax.random.key(0), x)
    >>> y, mags = apply_with_magnitudes(model, variables, x)
    >>> mags["kernel"].shape
    (3,)
    >>> bool(jnp.allclose(mags["kernel"], jnp.abs(y).sum(0)))
    True
  """
  captured: set[tuple[str, ...]] = set()

  def interceptor(next_fun, call_args, call_kwargs, context):
    y = next_fun(*call_args, **call_kwargs)
    mod = context.module
    if isinstance(mod, nn.Embed) and context.method_name == "attend" and tied_heads:
      name, statistic = "embedding", lambda y: tied_head_statistic(y)
    elif isinstance(mod, LINEAR_MODULES) and context.method_name == "__call__":
      name, statistic = "kernel", lambda y: output_statistic(mod, y, call_args, call_kwargs)
    else:
      return y
    path = tuple(mod.scope.path)
    weights = token_weights(token_mask, path, y)
    stat = statistic(y if weights is None else y * weights)
    sow_sum(mod, COLLECTION, name, stat)
    captured.add((path, name, stat.ndim, mod.variables["params"][name].ndim))
    return y

  extra = mutable_list(mutable)
  with nn.intercept_methods(interceptor):
    outputs, state = module.apply(variables, *args, mutable=[COLLECTION, *extra], **kwargs)
  state = dict(state)
  magnitudes = flax.core.unfreeze(state.pop(COLLECTION, {}))
  magnitudes = _check_captured(captured, magnitudes, stacked)
  if extra:
    outputs = (outputs, state)
  return outputs, magnitudes


def _check_captured(captured, magnitudes, stacked: bool):
  """Fails loudly when a captured call has no statistic (or, unasked, a stacked one).

  Returns the magnitudes, stacked statistics reshaped to broadcast against
  their stacked kernels.
  """
  flat = traverse_util.flatten_dict(magnitudes) if magnitudes else {}
  for path, name, ndim, kernel_ndim in sorted(captured):
    stat = flat.get((*path, name))
    where = "/".join(path) or "<root>"
    if stat is None:
      raise ValueError(
          f"apply_with_magnitudes: the linear layer at {where} ran, but its"
          f" statistic was dropped (collection {COLLECTION!r}). This happens"
          " under nn.scan (or another lifted transform) that does not carry the"
          f" {COLLECTION!r} collection. MIGU needs one statistic per layer:"
          " unroll the scanned layers (a Python loop) for MIGU training."
      )
    if stat.ndim != ndim and not stacked:
      raise ValueError(
          f"apply_with_magnitudes: the statistic at {where} came back with shape"
          f" {stat.shape}, i.e. stacked by a lifted transform (nn.scan/nn.vmap"
          " with variable_axes); masked as it is, the stacked layers would share"
          " one threshold. Unroll the scanned layers for MIGU training, or pass"
          f" stacked=True and mask with mask_by_magnitude(T, stacked_axes={stat.ndim - ndim})."
      )
    lead = stat.shape[: stat.ndim - ndim]
    if lead:
      flat[(*path, name)] = stat.reshape(lead + (1,) * (kernel_ndim - ndim) + stat.shape[len(lead) :])
  return traverse_util.unflatten_dict(flat) if flat else magnitudes


def magnitude_paths(magnitudes: Any) -> list[tuple[str, ...]]:
  """The parameter paths that have a statistic, e.g. ``[("Dense_0", "kernel")]``."""
  return sorted(traverse_util.flatten_dict(magnitudes)) if magnitudes else []
