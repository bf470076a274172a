"""LoRA, and MIGU on LoRA, for any flax.linen model without changing the model.

LoRA (Hu et al., 2021) freezes a linear layer's kernel ``W`` and trains a
low-rank update: with ``A`` of shape ``[*in_axes, r]`` and ``B`` of shape
``[r, *out_axes]``, the adapted layer computes

    y = x W + b + (dropout(x) A) B * alpha / r

``apply_with_lora`` runs ``module.apply`` with this change made to every
adapted ``nn.Dense`` / ``nn.DenseGeneral`` call by a method interceptor
(``flax.linen.intercept_methods``): the model's code and parameters stay as
they are, and the LoRA parameters are a separate tree, so ``jax.grad`` of a
loss over that tree trains the adapters alone.

MIGU on LoRA masks the adapters by their output magnitudes. For each adapted
layer ``apply_with_lora`` also returns, keyed like the LoRA tree,

* ``lora_a``: ``sum |x A|`` per rank component (length ``r``), which masks the
  rank components of ``A`` (its last axis);
* ``lora_b``: ``sum |y|`` of the layer's full output (base + update) per output
  feature, which masks the output features of ``B`` (its trailing axes);

so that ``migu.mask_by_magnitude(T, where=is_lora)`` keeps the gradient of the
largest ``1 - T`` of each. ``merge_lora`` folds the adapters into the kernels
for evaluation or saving.

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn, optax
  >>> import migu_jax as migu
  >>> from migu_jax import lora
  >>> model = nn.Dense(16)
  >>> batch = {"x": jax.random.normal(jax.random.key(0), (4, 8)),
  ...          "y": jnp.ones((4, 16))}
  >>> params = model.init(jax.random.key(1), batch["x"])["params"]
  >>> lora_params = lora.init_lora(jax.random.key(2), params, rank=8)
  >>> jax.tree.map(jnp.shape, lora_params)
  {'lora_a': (8, 8), 'lora_b': (8, 16)}
  >>> tx = optax.chain(migu.mask_by_magnitude(0.7, where=lora.is_lora),
  ...                  optax.adamw(1e-3))
  >>> state = tx.init(lora_params)
  >>> def loss_fn(lora_params, batch):
  ...   out, mags = lora.apply_with_lora(model, {"params": params}, lora_params,
  ...                                    batch["x"], alpha=16, rank=8)
  ...   return jnp.mean((out - batch["y"]) ** 2), mags
  >>> (l, mags), grads = jax.value_and_grad(loss_fn, has_aux=True)(lora_params, batch)
  >>> updates, state = tx.update(grads, state, lora_params, magnitudes=mags)
  >>> lora_params = optax.apply_updates(lora_params, updates)
  >>> merged = lora.merge_lora(params, lora_params, alpha=16, rank=8)
  >>> out, _ = lora.apply_with_lora(model, {"params": params}, lora_params,
  ...                               batch["x"], alpha=16, rank=8)
  >>> bool(jnp.allclose(model.apply({"params": merged}, batch["x"]), out, atol=1e-5))
  True

References:
  Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022
  (arXiv:2106.09685). Du et al., "Unlocking Continual Learning Abilities in
  Language Models", Findings of EMNLP 2024 (arXiv:2406.17245).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from migu_jax import magnitudes as _magnitudes

LORA_COLLECTION = "lora_magnitudes"
"""Flax collection the ``sum |x A|`` statistics are sown into."""

DROPOUT_RNG = "lora_dropout"
"""Name of the rng stream of the LoRA dropout."""

ADAPTABLE = (nn.Dense, nn.DenseGeneral)
"""Module types LoRA adapts."""

Targets = Sequence[str] | Callable[[tuple[str, ...]], bool] | None
Path = tuple[str, ...]


def is_lora(path: tuple[str, ...], leaf: Any) -> bool:
  """``where=`` for ``migu.mask_by_magnitude``: the leaves named lora_a / lora_b.

  Example:
    >>> from migu_jax.lora import is_lora
    >>> is_lora(("block", "query", "lora_a"), None), is_lora(("head", "kernel"), None)
    (True, False)
  """
  del leaf
  return bool(path) and path[-1] in ("lora_a", "lora_b")


def _check_rank(fn: str, rank) -> None:
  if not isinstance(rank, numbers.Integral) or isinstance(rank, bool) or rank <= 0:
    raise ValueError(f"{fn}: rank={rank!r} must be a positive int (e.g. rank=8).")


def _as_dict(tree) -> dict:
  return flax.core.unfreeze(tree) if isinstance(tree, flax.core.FrozenDict) else tree


def _flat(tree) -> dict[Path, Any]:
  tree = _as_dict(tree)
  return traverse_util.flatten_dict(tree) if tree else {}


def _name(module_path: Path) -> str:
  return "/".join(module_path) or "<root>"


def _select(flat_params: dict[Path, Any], targets: Targets) -> list[Path]:
  """The module paths whose kernel ``targets`` selects."""
  kernels = [p for p in flat_params if p[-1] == "kernel"]
  if targets is None:
    modules = {p[:-1] for p in flat_params if p[-1] == "embedding"}
    chosen = [p for p in kernels if p[:-1] not in modules]
  elif callable(targets):
    chosen = [p for p in kernels if targets(p)]
  else:
    names = (targets,) if isinstance(targets, str) else tuple(targets)
    if not names or not all(isinstance(n, str) for n in names):
      raise TypeError(
          f"init_lora: targets={targets!r} must be None, a sequence of module-name"
          " substrings such as ('query', 'value'), or a callable path -> bool."
      )
    chosen = [p for p in kernels if len(p) > 1 and any(n in p[-2] for n in names)]
  if not chosen:
    shown = ", ".join(_name(p[:-1]) for p in kernels[:8]) or "none"
    raise ValueError(
        f"init_lora: targets={targets!r} selects no kernel. Kernels of these params"
        f" (module paths): {shown}{', ...' if len(kernels) > 8 else ''}. Name"
        " modules from this list (substrings of the module name), or pass"
        " targets=None for every Dense/DenseGeneral kernel."
    )
  return sorted(p[:-1] for p in chosen)


def _layer_kinds(module, params, inputs, apply_kwargs) -> dict[Path, tuple[type, int, bool]]:
  """Traces ``module`` (shapes only): per linear layer, its type, number of
  contracted input axes, and whether it has ``batch_dims``."""
  kinds = {}

  def record(next_fun, args, kwargs, context):
    mod = context.module
    if context.method_name == "__call__":
      if isinstance(mod, nn.DenseGeneral):
        n_in = len(mod.axis) if isinstance(mod.axis, tuple) else 1
        kinds[tuple(mod.scope.path)] = (nn.DenseGeneral, n_in, bool(mod.batch_dims))
      elif isinstance(mod, nn.Dense):
        kinds[tuple(mod.scope.path)] = (nn.Dense, 1, False)
      else:
        kinds.setdefault(tuple(mod.scope.path), (type(mod), 0, False))
    return next_fun(*args, **kwargs)

  def run(p):
    # mutable=True: collections other than params (batch_stats, cache) are
    # created on the fly instead of being required for a shape-only trace.
    with nn.intercept_methods(record):
      return module.apply({"params": p}, *inputs, **{"mutable": True, **(apply_kwargs or {})})

  jax.eval_shape(run, params)
  return kinds


def init_lora(
    key: jax.Array,
    params,
    *,
    rank: int,
    targets: Targets = None,
    module: nn.Module | None = None,
    inputs: tuple = (),
    apply_kwargs: dict | None = None,
) -> dict:
  """LoRA parameters ``{'lora_a', 'lora_b'}`` for every kernel ``targets`` selects.

  ``A`` is drawn as PEFT's ``kaiming_uniform_(a=sqrt(5))``, i.e. uniform in
  ``±1/sqrt(fan_in)`` with ``fan_in`` the product of the input axes; ``B`` is
  zero, so the adapted model starts equal to the base model. Both float32.

  A 2-D kernel ``[in, out]`` is split as it reads. A kernel with more axes
  (``nn.DenseGeneral`` with a ``features`` tuple or an ``axis`` tuple) cannot
  be split from its shape alone: pass ``module`` and example ``inputs``, and
  ``init_lora`` traces the model (shapes only) to see which axes each layer
  contracts. With ``module``, the default targets also leave out ``nn.Einsum``
  layers, and explicit targets that select an ``nn.Einsum`` (or any layer other
  than ``nn.Dense`` / ``nn.DenseGeneral``) raise an error.

  Args:
    key: PRNG key.
    params: the model's parameters (``variables["params"]``).
    rank: ``r``, a positive int.
    targets: which kernels to adapt. None: every leaf named ``kernel`` whose
      module has no ``embedding`` (the Dense/DenseGeneral kernels); a sequence
      of substrings of module names, e.g. ``("query", "value")``; or a callable
      that takes a kernel's path (``("layer_0", "query", "kernel")``) and
      returns a bool.
    module: optional, the flax module of ``params``, to trace.
    inputs: positional arguments of ``module.apply`` for the trace.
    apply_kwargs: keyword arguments of ``module.apply`` for the trace.

  Returns:
    A nested dict mirroring the module paths of the adapted kernels:
    ``lora[...]['query'] = {'lora_a': [*in_axes, r], 'lora_b': [r, *out_axes]}``.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from migu_jax.lora import init_lora
    >>> model = nn.DenseGeneral((2, 3), name="query")
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    >>> lora = init_lora(jax.random.key(1), params, rank=2, module=model,
    ...                  inputs=(jnp.ones((1, 4)),))
    >>> jax.tree.map(jnp.shape, lora)
    {'lora_a': (4, 2), 'lora_b': (2, 2, 3)}
  """
  _check_rank("init_lora", rank)
  params = _as_dict(params)
  if isinstance(params, dict) and set(params) == {"params"}:
    raise ValueError(
        "init_lora: params has the single top-level key 'params'; pass the"
        " parameters, variables['params'], not the variables dict."
    )
  flat = _flat(params)
  paths = _select(flat, targets)
  kinds = _layer_kinds(module, params, inputs, apply_kwargs) if module is not None else None
  if kinds is not None:
    paths = _check_kinds(paths, kinds, default=targets is None)
  keys = jax.random.split(key, len(paths))
  lora = {}
  for k, path in zip(keys, paths):
    kernel_shape = tuple(flat[(*path, "kernel")].shape)
    n_in = _n_in(path, kernel_shape, kinds)
    in_shape, out_shape = kernel_shape[:n_in], kernel_shape[n_in:]
    bound = 1.0 / math.sqrt(math.prod(in_shape))
    lora[(*path, "lora_a")] = jax.random.uniform(
        k, (*in_shape, rank), jnp.float32, -bound, bound
    )
    lora[(*path, "lora_b")] = jnp.zeros((rank, *out_shape), jnp.float32)
  return traverse_util.unflatten_dict(lora)


def _check_kinds(paths, kinds, default: bool) -> list[Path]:
  kept = []
  for path in paths:
    kind = kinds.get(path)
    if kind is None:
      continue  # not called for these inputs: split by shape below
    cls, _, batch_dims = kind
    if cls not in ADAPTABLE or batch_dims:
      if default:
        continue
      what = "nn.DenseGeneral with batch_dims" if batch_dims else cls.__name__
      raise ValueError(
          f"init_lora: targets select {_name(path)}, a {what}; LoRA adapts only"
          " nn.Dense and nn.DenseGeneral (without batch_dims). Leave it out of"
          " targets."
      )
    kept.append(path)
  if not kept:
    raise ValueError(
        "init_lora: the targets select no nn.Dense / nn.DenseGeneral layer that"
        " runs for these inputs; check targets=... and inputs=..."
    )
  return kept


def _n_in(path: Path, kernel_shape, kinds) -> int:
  if kinds is not None and path in kinds:
    return kinds[path][1]
  if len(kernel_shape) == 2:
    return 1
  raise ValueError(
      f"init_lora: the kernel at {_name(path)} has shape {kernel_shape}; which of"
      " its axes are inputs and which are outputs cannot be told from the shape"
      " (an nn.DenseGeneral with a features or axis tuple). Pass module=model"
      " and inputs=(example inputs,) so init_lora can trace the layer."
  )


def _lora_layers(params, lora, rank: int, fn: str) -> dict[Path, tuple[jax.Array, jax.Array]]:
  """``{module_path: (A, B)}``, checked against the kernels of ``params``."""
  flat_params = _flat(params)
  layers: dict[Path, dict[str, Any]] = {}
  for path, leaf in _flat(lora).items():
    if path[-1] not in ("lora_a", "lora_b"):
      raise ValueError(
          f"{fn}: the LoRA tree has a leaf {'/'.join(path)}; each adapted module"
          " holds exactly 'lora_a' and 'lora_b' (make the tree with init_lora)."
      )
    layers.setdefault(path[:-1], {})[path[-1]] = leaf
  if not layers:
    raise ValueError(f"{fn}: the LoRA tree is empty; make it with init_lora(key, params, rank=...).")
  out = {}
  for path, ab in sorted(layers.items()):
    where = _name(path)
    if set(ab) != {"lora_a", "lora_b"}:
      raise ValueError(f"{fn}: the LoRA module {where} lacks {sorted({'lora_a', 'lora_b'} - set(ab))}.")
    kernel = flat_params.get((*path, "kernel"))
    if kernel is None:
      raise ValueError(
          f"{fn}: the LoRA tree adapts {where}, but the params have no kernel at"
          f" {where}/kernel. Was the LoRA tree made for another model? Make it with"
          " init_lora(key, params, ...) from these params."
      )
    a, b = ab["lora_a"], ab["lora_b"]
    if a.shape[-1] != rank or b.shape[0] != rank:
      raise ValueError(
          f"{fn}: the LoRA module {where} has lora_a {a.shape} and lora_b {b.shape},"
          f" of rank {a.shape[-1]}, but rank={rank} was given; pass the rank the"
          " tree was made with (the scale is alpha / rank)."
      )
    if tuple(a.shape[:-1]) + tuple(b.shape[1:]) != tuple(kernel.shape):
      raise ValueError(
          f"{fn}: the LoRA module {where} has lora_a {a.shape} and lora_b {b.shape},"
          f" which do not make its kernel's shape {kernel.shape} ([*in, r] x"
          " [r, *out]). Was the LoRA tree made for another model? Make it with"
          " init_lora(key, params, ...) from these params."
      )
    out[path] = (a, b)
  return out


def _params_of(variables):
  variables = _as_dict(variables)
  if not isinstance(variables, dict) or "params" not in variables:
    raise ValueError(
        "apply_with_lora: variables must be the module's variables, e.g."
        " {'params': params}."
    )
  return variables["params"]


def apply_with_lora(
    module: nn.Module,
    variables,
    lora,
    *args,
    alpha: float,
    rank: int,
    dropout: float = 0.0,
    dropout_rng: jax.Array | None = None,
    **kwargs,
):
  """Runs ``module.apply`` with LoRA on the adapted layers; returns MIGU magnitudes.

  Every ``nn.Dense`` / ``nn.DenseGeneral`` call whose module path has an entry
  in ``lora`` returns ``base(x) + (dropout(x) A) B * alpha / rank`` (``A``
  contracts the layer's input axes; computed in float32, cast to the layer's
  output dtype). The LoRA parameters are read from ``lora`` by the module's
  path, so gradients with respect to ``lora`` flow through this call. Works
  under ``jax.jit`` and ``nn.remat``; under ``nn.scan`` it raises, as
  :func:`migu_jax.apply_with_magnitudes` does.

  Args:
    module: any flax.linen module; it is not changed.
    variables: the module's variables, e.g. ``{"params": params}``.
    lora: the LoRA tree from :func:`init_lora`.
    *args: positional arguments of ``module.apply``.
    alpha: LoRA's ``alpha``; the update is scaled by ``alpha / rank``.
    rank: the rank ``r`` of ``lora``.
    dropout: dropout rate on the adapters' input ``x`` (PEFT's
      ``lora_dropout``); needs ``dropout_rng``.
    dropout_rng: PRNG key of that dropout (each layer and call draws its own).
    **kwargs: keyword arguments of ``module.apply`` (``rngs``, ``method``,
      ``mutable``, ...). With ``mutable``, the outputs are
      ``(outputs, mutated_variables)``.

  Returns:
    ``(outputs, magnitudes)``: ``magnitudes`` is keyed like ``lora``, with
    ``lora_a`` the float32 ``sum |x A|`` per rank component (shape ``(r,)``; ``x``
    after the dropout) and
    ``lora_b`` the float32 ``sum |y|`` of the full output per output feature
    (shape ``out_axes``). An adapted layer that did not run gets zeros (its
    gradient is zero too).
  """
  _check_rank("apply_with_lora", rank)
  _check_dropout(dropout, dropout_rng)
  layers = _lora_layers(_params_of(variables), lora, rank, "apply_with_lora")
  ran: set[Path] = set()
  interceptor = _adapter_interceptor(layers, alpha / rank, dropout, ran)
  run = _run_inside(interceptor, kwargs.pop("method", None))
  extra = _magnitudes.mutable_list(kwargs.pop("mutable", False))
  if dropout > 0.0:
    rngs = kwargs.pop("rngs", None) or {}
    rngs = dict(rngs) if isinstance(rngs, dict) else {"params": rngs}
    kwargs["rngs"] = {**rngs, DROPOUT_RNG: dropout_rng}
  (outputs, state), mags = _magnitudes.apply_with_magnitudes(
      module, variables, *args, method=run, mutable=[LORA_COLLECTION, *extra], **kwargs
  )
  state = dict(state)
  result = _adapter_magnitudes(layers, ran, state.pop(LORA_COLLECTION, {}), mags)
  if extra:
    outputs = (outputs, state)
  return outputs, result


def _check_dropout(dropout: float, dropout_rng) -> None:
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"apply_with_lora: dropout={dropout} must be in [0, 1).")
  if dropout > 0.0 and dropout_rng is None:
    raise ValueError(
        f"apply_with_lora: dropout={dropout} needs dropout_rng=jax.random.key(...);"
        " for evaluation pass dropout=0.0."
    )


def _check_adaptable(mod: nn.Module, path: Path) -> None:
  if not isinstance(mod, ADAPTABLE) or getattr(mod, "batch_dims", ()):
    raise ValueError(
        f"apply_with_lora: the LoRA tree adapts {_name(path)}, a"
        f" {type(mod).__name__}{' with batch_dims' if isinstance(mod, nn.DenseGeneral) else ''};"
        " LoRA adapts only nn.Dense and nn.DenseGeneral (without batch_dims)."
        " Leave it out with init_lora(..., targets=...)."
    )


def _input_axes(mod: nn.Module, x: jax.Array, a: jax.Array, path: Path) -> tuple[int, ...]:
  """The input axes of ``x`` that the layer (and so ``A``) contracts, non-negative."""
  axis = mod.axis if isinstance(mod, nn.DenseGeneral) else -1
  axis = tuple(ax % x.ndim for ax in (axis if isinstance(axis, tuple) else (axis,)))
  if len(axis) != a.ndim - 1:
    raise ValueError(
        f"apply_with_lora: {_name(path)} contracts {len(axis)} input axes, but its"
        f" lora_a {a.shape} has {a.ndim - 1}; make the LoRA tree with"
        " init_lora(..., module=model, inputs=...) so the axes are split right."
    )
  return axis


def _adapter_interceptor(layers, scale: float, dropout: float, ran: set[Path]):
  """The interceptor that adds ``(dropout(x) A) B * scale`` to each adapted layer's output.

  It sows ``sum |x A|`` per rank component into :data:`LORA_COLLECTION` and records in ``ran`` the
  adapted layers that were called.
  """

  def interceptor(next_fun, call_args, call_kwargs, context):
    y = next_fun(*call_args, **call_kwargs)
    mod = context.module
    path = tuple(mod.scope.path)
    if context.method_name != "__call__" or path not in layers:
      return y
    _check_adaptable(mod, path)
    a, b = layers[path]
    x = call_args[0] if call_args else call_kwargs["inputs"]
    axis = _input_axes(mod, x, a, path)
    x = x.astype(jnp.promote_types(x.dtype, a.dtype))
    if dropout > 0.0:
      keep = jax.random.bernoulli(mod.make_rng(DROPOUT_RNG), 1.0 - dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - dropout), jnp.zeros((), x.dtype))
    # dot_general puts x's free axes first, then A's rank axis: as DenseGeneral.
    xa = jax.lax.dot_general(
        x, a.astype(x.dtype), ((axis, tuple(range(len(axis)))), ((), ())),
        precision=mod.precision,
    )
    _magnitudes.sow_sum(mod, LORA_COLLECTION, "lora_a", _magnitudes.sum_abs(xa, (xa.ndim - 1,)))
    ran.add(path)
    delta = jnp.tensordot(xa, b.astype(xa.dtype), axes=1, precision=mod.precision)
    return y + (delta * scale).astype(y.dtype)

  return interceptor


def _run_inside(interceptor, user_method):
  """A ``method`` for ``module.apply`` that calls ``user_method`` (default ``__call__``) under ``interceptor``.

  It runs inside :func:`migu_jax.apply_with_magnitudes`' own interceptor, so the LoRA interceptor is
  the inner one and the magnitudes see the adapted output.
  """

  def run(mod, *call_args, **call_kwargs):
    with nn.intercept_methods(interceptor):
      if user_method is None:
        return mod(*call_args, **call_kwargs)
      if isinstance(user_method, str):
        return getattr(mod, user_method)(*call_args, **call_kwargs)
      return user_method(mod, *call_args, **call_kwargs)

  return run


def _adapter_magnitudes(layers, ran: set[Path], sown_a, mags):
  """``{path: {"lora_a": sum |x A|, "lora_b": sum |y|}}``; zeros for an adapted layer that did not run."""
  flat_a, flat_mags = _flat(sown_a), _flat(mags)
  result = {}
  for path, (a, b) in layers.items():
    if path in ran:
      result[(*path, "lora_a")] = flat_a[(*path, "lora_a")]
      result[(*path, "lora_b")] = flat_mags[(*path, "kernel")]
    else:
      result[(*path, "lora_a")] = jnp.zeros(a.shape[-1:], jnp.float32)
      result[(*path, "lora_b")] = jnp.zeros(b.shape[1:], jnp.float32)
  return traverse_util.unflatten_dict(result)


def merge_lora(params, lora, *, alpha: float, rank: int):
  """The parameters with each adapted kernel replaced by ``W + A B alpha / rank``.

  The result runs with plain ``module.apply`` (for evaluation or saving) and
  equals :func:`apply_with_lora` without dropout. Kernel dtypes are kept.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from migu_jax.lora import init_lora, merge_lora
    >>> params = nn.Dense(3).init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    >>> lora = init_lora(jax.random.key(1), params, rank=2)
    >>> merged = merge_lora(params, lora, alpha=4, rank=2)
    >>> bool((merged["kernel"] == params["kernel"]).all())  # B starts at zero
    True
  """
  _check_rank("merge_lora", rank)
  layers = _lora_layers(params, lora, rank, "merge_lora")
  flat = _flat(params)
  for path, (a, b) in layers.items():
    kernel = flat[(*path, "kernel")]
    delta = jnp.tensordot(a, b, axes=1) * (alpha / rank)
    flat[(*path, "kernel")] = (kernel + delta).astype(kernel.dtype)
  return traverse_util.unflatten_dict(flat)
