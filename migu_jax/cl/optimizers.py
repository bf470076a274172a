"""The optimizer of a continual-learning method: ``[mask] -> clip_by_global_norm -> adamw``.

The mask comes first, so the clipping norm is that of the kept gradient; its ``ratio`` and ``enabled``
switch are injected (``optax.inject_hyperparams``), so the first task trains unmasked and later tasks
masked without recompiling (:func:`start_task`). Which parameters a mask acts on: every kernel of the
model (and a tied LM head's embedding, by vocabulary row), or the LoRA factors, limited by
``cfg.mask_targets`` (a name of :data:`LAYER_TYPES` or path patterns).

Example:
  >>> from migu_jax.cl import methods, optimizers
  >>> from migu_jax.cl.runner import Config
  >>> tx = optimizers.make_optimizer(methods.get_method("migu"), Config())
  >>> callable(tx.update)
  True
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import migu_jax as migu
from migu_jax import lora as lora_lib
from migu_jax.cl.methods import Method



LAYER_TYPES: dict[str, tuple[str, ...]] = {
    "all": (),
    "attention": (r"/(attention|self_attention|cross_attention)/",),
    "ffn": (r"/(intermediate|output|mlp)/",),
    "head": (r"/lm_head/kernel$", r"/(embed|shared)/embedding$"),
}
"""Named ``cfg.mask_targets`` for the layer-type ablation: attention projections or feed-forward layers
of the BERT, Llama and T5 models of :mod:`migu_jax.models` ("all": every kernel)."""


def mask_patterns(cfg) -> tuple[str, ...]:
  """``cfg.mask_targets`` as regular expressions: a name of :data:`LAYER_TYPES`, or the patterns."""
  targets = cfg.mask_targets
  if len(targets) == 1 and targets[0] in LAYER_TYPES:
    return LAYER_TYPES[targets[0]]
  for pattern in targets:
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f"Config.mask_targets: {pattern!r} is not a regular expression ({e}); give a name of "
                       f"{sorted(LAYER_TYPES)} or patterns searched in paths like 'model/layers_0/attention/"
                       f"query/kernel'.") from None
  return targets


# Masks whose scores are shaped by the magnitudes, so a tied embedding's [vocab, 1] statistic selects rows.
_ROW_MASKS = ("magnitude", "strict", "random")


def _where(method: Method, patterns: tuple[str, ...] = (), tied_embedding: bool = True
           ) -> Callable[[tuple[str, ...], Any], bool]:
  """Which leaves the mask acts on: the model's kernels (and, for ``tied_embedding`` with a mask ranked by
  the magnitudes, the embedding of a tied LM head, by vocabulary row), or the LoRA factors; with
  ``patterns``, only those whose "/"-joined path matches one of them (the others keep their whole
  gradient)."""
  if method.lora:
    base = lambda path, leaf: path[0] == "lora" and lora_lib.is_lora(path[1:], leaf)
  elif tied_embedding and method.mask in _ROW_MASKS:
    base = lambda path, leaf: path[0] == "model" and migu.is_output_layer(path, leaf)
  else:
    base = lambda path, leaf: path[0] == "model" and migu.is_kernel(path, leaf)
  if not patterns:
    return base
  compiled = [re.compile(p) for p in patterns]
  return lambda path, leaf: base(path, leaf) and any(c.search("/".join(map(str, path))) for c in compiled)


def stacked_axes(cfg) -> dict[str, int] | None:
  """The masks' ``stacked_axes`` (:func:`migu_jax.importance.stacked_axes_at`): with ``cfg.scan_layers``,
  the scanned Llama's stack ``model/layers`` has one leading layer axis (a threshold per layer), the
  embedding and ``lm_head`` none; else None.

  Example:
    >>> from migu_jax.cl.runner import Config
    >>> stacked_axes(Config(model="smollm2-135m", scan_layers=True))
    {'model/layers': 1}
  """
  return {"model/layers": 1} if cfg.scan_layers else None


def _injected(factory):
  """``optax.inject_hyperparams(factory)`` with only ``ratio`` and ``enabled`` injected (changeable between
  tasks without recompiling); every other argument (where, seed, optimizer, ...) stays static."""
  static = tuple(p for p in inspect.signature(factory).parameters if p not in ("ratio", "enabled"))
  return optax.inject_hyperparams(factory, static_args=static)


def _threshold(cfg) -> str:
  return migu.masking.resolve_threshold(cfg.exact_count, cfg.threshold)


def _magnitude_mask(cfg, optimizer, where):
  mask = _injected(migu.mask_by_magnitude)(ratio=cfg.ratio, enabled=jnp.asarray(True),
                                           threshold=_threshold(cfg), where=where, stacked_axes=stacked_axes(cfg))
  return optax.chain(mask, optimizer)


def _strict_mask(cfg, optimizer, where):
  return _injected(migu.strict_mask_by_magnitude)(ratio=cfg.ratio, optimizer=optimizer, enabled=jnp.asarray(True),
                                                  threshold=_threshold(cfg), where=where,
                                                  stacked_axes=stacked_axes(cfg))


def _importance_mask(source: str):
  """A mask ranked by ``migu_jax.importance.IMPORTANCES[source]`` (gradient, weight, Fisher)."""

  def build(cfg, optimizer, where):
    stacked = stacked_axes(cfg)
    mask = _injected(migu.mask_by_importance)(
        ratio=cfg.ratio, importance=migu.importance.IMPORTANCES[source](stacked_axes=stacked),
        enabled=jnp.asarray(True), threshold=_threshold(cfg), where=where, stacked_axes=stacked)
    return optax.chain(mask, optimizer)

  return build


def _random_mask(cfg, optimizer, where, *, seed):
  mask = _injected(migu.random_mask)(ratio=cfg.ratio, seed=seed, enabled=jnp.asarray(True), where=where,
                                     stacked_axes=stacked_axes(cfg))
  return optax.chain(mask, optimizer)


MASKS: dict[str, Callable] = {
    "magnitude": _magnitude_mask,
    "strict": _strict_mask,
    "random": _random_mask,
    "gradient": _importance_mask("gradient"),
    "weight": _importance_mask("weight"),
    "fisher": _importance_mask("fisher"),
}
"""Mask name -> ``build(cfg, optimizer, where)`` wrapping the optimizer with the mask first (the masks of
:data:`SEEDED_MASKS` also take the run's ``seed``)."""

SEEDED_MASKS = ("random",)
"""Masks that draw from the run's seed."""

SCHEDULES: dict[str, Callable[[Any], optax.Schedule]] = {
    "constant": lambda cfg: optax.constant_schedule(cfg.learning_rate),
    "warmup_constant": lambda cfg: optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.learning_rate, max(1, cfg.warmup_steps)),
         optax.constant_schedule(cfg.learning_rate)], [max(1, cfg.warmup_steps)]),
}
"""Learning-rate schedule name -> ``build(cfg)``. The reference trains with a constant rate;
``warmup_constant`` rises linearly from 0 over ``cfg.warmup_steps`` steps of each task, then stays.
The step count lives in the optimizer state, so with ``cfg.reset_optimizer`` it restarts at every task."""


def make_optimizer(method: Method, cfg, seed: int = 0) -> optax.GradientTransformationExtraArgs:
  """``[mask] -> clip_by_global_norm(cfg.clip_norm) -> adamw``; LoRA methods freeze ``params['model']``."""
  if cfg.schedule not in SCHEDULES:
    raise ValueError(f"Unknown schedule {cfg.schedule!r}; choose one of {sorted(SCHEDULES)} (config.schedule).")
  parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm else []
  parts.append(optax.adamw(SCHEDULES[cfg.schedule](cfg), b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
                           weight_decay=cfg.weight_decay))
  tx = optax.chain(*parts)
  if method.mask is not None:
    where = _where(method, mask_patterns(cfg), cfg.mask_tied_embedding)
    seeded = {"seed": seed} if method.mask in SEEDED_MASKS else {}
    tx = MASKS[method.mask](cfg, tx, where, **seeded)
  if not method.lora:
    return optax.with_extra_args_support(tx)

  def labels(params):
    return {k: jax.tree.map(lambda _: "frozen" if k == "model" else "train", v) for k, v in params.items()}

  return optax.partition({"train": tx, "frozen": optax.set_to_zero()}, labels)


def _is_injected(x) -> bool:
  return isinstance(x, (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState))


def set_hyperparam(opt_state, name: str, value):
  """``opt_state`` with the injected hyperparameter ``name`` set to ``value`` wherever it occurs."""

  def update(state):
    if _is_injected(state) and name in state.hyperparams:
      old = state.hyperparams[name]
      return state._replace(hyperparams={**state.hyperparams, name: jnp.asarray(value, old.dtype)})
    return state

  return jax.tree.map(update, opt_state, is_leaf=_is_injected)


def check_mask_targets(method: Method, cfg, params) -> None:
  """Raises naming the fix when ``cfg.mask_targets`` selects no leaf of ``params`` (a silent no-op mask
  otherwise: a pattern written for one layout, say ``layers_\\d+/mlp``, finds nothing in a scanned
  model's ``model/layers/mlp/...``).

  Example:
    >>> from migu_jax.cl import methods as methods_lib
    >>> from migu_jax.cl.runner import Config
    >>> params = {"model": {"layers_0": {"mlp": {"kernel": jnp.ones((2, 3))}}}}
    >>> check_mask_targets(methods_lib.get_method("migu"), Config(mask_targets=("mlp",)), params)
  """
  where = _where(method, mask_patterns(cfg), cfg.mask_tied_embedding)
  flat = migu.masking._flatten(params)  # the paths the mask itself gives ``where``
  if not any(where(path, leaf) for path, leaf in flat.items()):
    kernels = ["/".join(path) for path in flat if path[-1] == "kernel"][:4]
    raise ValueError(f"Config.mask_targets={cfg.mask_targets!r} selects no layer of {method.name!r}'s "
                     f"parameters, so nothing would be masked; the patterns are searched in paths such as "
                     f"{kernels} (a scanned Llama's layers are 'model/layers/...', one leaf for all layers).")


def start_task(method: Method, cfg, tx, params, task_index: int, state=None):
  """The optimizer state a task starts with: fresh (``cfg.reset_optimizer``, as the reference does), or
  the previous task's ``state`` carried on; the mask is off on the first task when
  ``cfg.first_task_unmasked``."""
  if method.mask is not None and cfg.mask_targets and task_index == 0:
    check_mask_targets(method, cfg, params)
  if state is None or task_index == 0 or cfg.reset_optimizer:
    state = tx.init(params)
  if method.mask is not None:
    state = set_hyperparam(state, "enabled", not (task_index == 0 and cfg.first_task_unmasked))
  return state
