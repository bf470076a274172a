"""Continual-learning methods: a registry from a name to what the method changes in the one train loop.

A method is a small declarative record (:class:`Method`): which gradient mask it uses (a key of
:data:`MASKS`), whether it replays earlier tasks' data, whether it trains LoRA adapters instead of the
model. From it and the run config, the functions below build

* the trainable tree: ``{"model": ..., "head": ...}`` (+ ``"lora"``; then ``"model"`` is frozen),
* ``forward(params, *args, rng=None)`` -> ``(outputs, magnitudes)`` for the heads (dropout on when given an
  ``rng`` and ``cfg.dropout``),
* the optax transformation: ``[mask] -> clip_by_global_norm -> adamw`` (the mask first, so the clipping
  norm is that of the kept gradient), with the mask's ``enabled`` switch injected
  (``optax.inject_hyperparams``) so the first task trains unmasked and later tasks masked without
  recompiling,
* each task's training examples (with the replayed ones),
* the plain parameters evaluation uses (LoRA merged).

=============  ==========================================================================
name           method
=============  ==========================================================================
seqft          sequential fine-tuning, nothing against forgetting
migu           MIGU: keep the gradient of the top ``1 - T`` output magnitudes per layer
migu_strict    MIGU that also masks AdamW's update (masked features do not move at all)
random         the same number of output features, chosen at random each step
replay         mix ``replay_fraction`` of each earlier task's training data into the task
migu_replay    MIGU + replay
lora           LoRA adapters only (rank, alpha, dropout, target modules from the config)
migu_lora      MIGU on the LoRA adapters (``lora_a`` by rank component, ``lora_b`` by output)
grad_mask      the paper's gradient-based ablation: rank output features by ``sum |g|``
weight_mask    the paper's weight-based ablation: rank output features by ``sum |w|``
fisher_mask    rank by a diagonal Fisher estimate (moving average of ``sum g^2``)
=============  ==========================================================================

Every mask uses ``cfg.ratio`` and the threshold rule ``cfg.threshold`` (``cfg.exact_count``: the
paper's exact count); ``cfg.padding_aware`` leaves padded positions out of the magnitudes;
``cfg.mask_targets`` (a name of :data:`LAYER_TYPES` or path patterns) limits the mask to some layers.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import migu_jax as migu
from migu_jax import lora as lora_lib
from migu_jax.cl.data import Task


@dataclasses.dataclass(frozen=True)
class Method:
  """What a continual-learning method changes. See the module docstring for the registered ones."""

  name: str
  description: str
  mask: str | None = None
  replay: bool = False
  lora: bool = False


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("seqft", "sequential fine-tuning"),
    Method("migu", "MIGU magnitude-based gradient mask", mask="magnitude"),
    Method("migu_strict", "MIGU, AdamW update masked too", mask="strict"),
    Method("random", "random gradient mask of MIGU's size", mask="random"),
    Method("replay", "experience replay of earlier tasks", replay=True),
    Method("migu_replay", "MIGU + replay", mask="magnitude", replay=True),
    Method("lora", "LoRA adapters", lora=True),
    Method("migu_lora", "MIGU on LoRA adapters", mask="magnitude", lora=True),
    Method("grad_mask", "gradient-magnitude mask (the paper's ablation)", mask="gradient"),
    Method("weight_mask", "weight-magnitude mask (the paper's ablation)", mask="weight"),
    Method("fisher_mask", "diagonal-Fisher mask", mask="fisher"),
)}


def split_spec(spec: str) -> tuple[str, float | None]:
  """``"migu@3e-4"`` -> ``("migu", 3e-4)``; a plain name has no learning rate of its own.

  Example:
    >>> split_spec("migu@3e-4"), split_spec("seqft")
    (('migu', 0.0003), ('seqft', None))
  """
  name, _, rate = spec.partition("@")
  if not rate:
    return name, None
  try:
    value = float(rate)
  except ValueError:
    value = -1.0
  if not value > 0:
    raise ValueError(f"Method {spec!r}: {rate!r} after '@' is not a positive learning rate; write e.g. "
                     "'migu@3e-4' (config.methods / --methods).")
  return name, value


def get_method(name: str) -> Method:
  """The registered method of ``name`` (a name, or ``"name@rate"``); the error lists the known names."""
  base, _ = split_spec(name)
  if base not in METHODS:
    raise ValueError(f"Unknown method {base!r}. Known methods: {', '.join(METHODS)} "
                     "(config.methods / --methods; add new ones to migu_jax.cl.methods.METHODS).")
  return METHODS[base]


def method_config(cfg, spec: str):
  """The run config of method ``spec``: ``cfg`` with the learning rate of ``"name@rate"``, if given."""
  _, rate = split_spec(spec)
  return cfg if rate is None else cfg.replace(learning_rate=rate)


REFERENCE_EPOCHS: dict[str, dict[str, int]] = {"5": {"wic": 2}, "6": {"mnli": 2}}
"""Per-task epoch counts of the reference's scripts (``scripts/full_tuning/order_{5,6}.sh``): WiC trains 2
epochs in order 5, MNLI 2 epochs in order 6; every other task ``cfg.epochs``."""


def task_epochs(cfg, task_name: str) -> int:
  """Epochs of task ``task_name``: ``cfg.task_epochs[task_name]``, else (``task_epochs`` None) the
  reference's count for a built-in order, else ``cfg.epochs``."""
  table = cfg.task_epochs
  if table is None:
    table = REFERENCE_EPOCHS.get(cfg.order, {}) if isinstance(cfg.order, str) else {}
  return int(table.get(task_name, cfg.epochs))


# --------------------------------------------------------------------------------------------------
# Parameters and forward
# --------------------------------------------------------------------------------------------------


def init_params(method: Method, cfg, model_params, head_params, key) -> dict:
  """The tree the train step updates: ``{"model", "head"}``, plus ``"lora"`` for LoRA methods."""
  params = {"model": model_params, "head": head_params}
  if method.lora:
    params["lora"] = lora_lib.init_lora(key, model_params, rank=cfg.lora_rank,
                                        targets=tuple(cfg.lora_targets) if cfg.lora_targets else None)
  return params


def token_mask(cfg, args):
  """The padding mask of a forward call's ``args`` when ``cfg.padding_aware`` (else None).

  The heads call ``forward(params, ids, mask)`` (encoders, decoders) or ``forward(params, ids, mask,
  dec_ids, dec_mask)`` (encoder-decoders: one mask per stack; the lm head sees decoder positions).
  """
  if not cfg.padding_aware:
    return None
  if len(args) >= 4:  # T5's tied head is the shared embedding's attend, on decoder positions
    return {"encoder": args[1], "decoder": args[3], "lm_head": args[3], "shared": args[3]}
  return args[1]


def make_forward(method: Method, cfg, model) -> Callable:
  """``forward(params, *args, rng=None) -> (outputs, magnitudes)`` keyed like the trainable tree.

  Given an ``rng`` (training) and ``cfg.dropout``, the model runs with its checkpoint's dropout rates
  (``deterministic=False``); without one (evaluation) it is deterministic. LoRA methods keep the frozen
  model deterministic and drop only the adapters' input (``cfg.lora_dropout``).
  """
  if not method.lora:
    def forward(params, *args, rng=None):
      train = {}
      if rng is not None and cfg.dropout:
        train = {"deterministic": False, "rngs": {"dropout": rng}}
      out, mags = migu.apply_with_magnitudes(model, {"params": params["model"]}, *args,
                                             token_mask=token_mask(cfg, args), **train)
      return out, {"model": mags}
    return forward

  if cfg.padding_aware:
    raise ValueError("padding_aware=True is not supported with LoRA methods yet; set padding_aware=False.")

  def forward_lora(params, *args, rng=None):
    frozen = jax.lax.stop_gradient(params["model"])
    out, mags = lora_lib.apply_with_lora(
        model, {"params": frozen}, params["lora"], *args, alpha=cfg.lora_alpha, rank=cfg.lora_rank,
        dropout=cfg.lora_dropout, dropout_rng=rng if cfg.lora_dropout > 0 else None)
    return out, {"lora": mags}
  return forward_lora


def eval_params(method: Method, cfg, params) -> dict:
  """Plain ``{"model", "head"}`` parameters for evaluation (LoRA merged into the kernels)."""
  if not method.lora:
    return {"model": params["model"], "head": params["head"]}
  merged = lora_lib.merge_lora(params["model"], params["lora"], alpha=cfg.lora_alpha, rank=cfg.lora_rank)
  return {"model": merged, "head": params["head"]}


# --------------------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------------------


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


def _injected(factory):
  """``optax.inject_hyperparams(factory)`` with only ``ratio`` and ``enabled`` injected (changeable between
  tasks without recompiling); every other argument (where, seed, optimizer, ...) stays static."""
  static = tuple(p for p in inspect.signature(factory).parameters if p not in ("ratio", "enabled"))
  return optax.inject_hyperparams(factory, static_args=static)


def _threshold(cfg) -> str:
  return migu.masking.resolve_threshold(cfg.exact_count, cfg.threshold)


def _magnitude_mask(cfg, optimizer, where):
  mask = _injected(migu.mask_by_magnitude)(ratio=cfg.ratio, enabled=jnp.asarray(True),
                                           threshold=_threshold(cfg), where=where)
  return optax.chain(mask, optimizer)


def _strict_mask(cfg, optimizer, where):
  return _injected(migu.strict_mask_by_magnitude)(ratio=cfg.ratio, optimizer=optimizer, enabled=jnp.asarray(True),
                                                  threshold=_threshold(cfg), where=where)


def _importance_mask(source: str):
  """A mask ranked by ``migu_jax.importance.IMPORTANCES[source]`` (gradient, weight, Fisher)."""

  def build(cfg, optimizer, where):
    mask = _injected(migu.mask_by_importance)(ratio=cfg.ratio, importance=migu.importance.IMPORTANCES[source](),
                                              enabled=jnp.asarray(True), threshold=_threshold(cfg), where=where)
    return optax.chain(mask, optimizer)

  return build


def _random_mask(cfg, optimizer, where, *, seed):
  mask = _injected(migu.random_mask)(ratio=cfg.ratio, seed=seed, enabled=jnp.asarray(True), where=where)
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


def start_task(method: Method, cfg, tx, params, task_index: int, state=None):
  """The optimizer state a task starts with: fresh (``cfg.reset_optimizer``, as the reference does), or
  the previous task's ``state`` carried on; the mask is off on the first task when
  ``cfg.first_task_unmasked``."""
  if state is None or task_index == 0 or cfg.reset_optimizer:
    state = tx.init(params)
  if method.mask is not None:
    state = set_hyperparam(state, "enabled", not (task_index == 0 and cfg.first_task_unmasked))
  return state


# --------------------------------------------------------------------------------------------------
# Data mix
# --------------------------------------------------------------------------------------------------


def training_examples(method: Method, cfg, tasks: Sequence[Task], task_index: int, seed: int
                      ) -> list[tuple[int, Any]]:
  """Task ``task_index``'s training examples as ``(task index, record)``, with replayed earlier data.

  Replay draws ``ceil(replay_fraction * n_j)`` records of each earlier task ``j``, a pure function of
  ``(seed, task_index, j)``.
  """
  examples = [(task_index, r) for r in tasks[task_index].train]
  if method.replay and cfg.replay_fraction > 0:
    for j in range(task_index):
      pool = tasks[j].train
      n = min(len(pool), math.ceil(cfg.replay_fraction * len(pool)))
      picks = np.random.default_rng([seed, task_index, j, 7]).choice(len(pool), n, replace=False)
      examples.extend((j, pool[i]) for i in sorted(picks))
  return examples


def steps_per_epoch(n_examples: int, batch_size: int) -> int:
  """Full batches per epoch (the last partial batch is dropped; a smaller set fills one batch cyclically)."""
  return max(1, n_examples // batch_size)


def batch_indices(n_examples: int, batch_size: int, seed: int, task_index: int, step: int) -> np.ndarray:
  """Which examples step ``step`` of a task trains on: a pure function of ``(seed, task, epoch, step)``.

  Each epoch is a fresh permutation drawn from ``(seed, task_index, epoch)``, so a run resumed at any
  step replays nothing and skips nothing.
  """
  spe = steps_per_epoch(n_examples, batch_size)
  epoch, i = divmod(step, spe)
  perm = _permutation(n_examples, seed, task_index, epoch)
  return np.resize(perm[i * batch_size:], batch_size) if n_examples < batch_size else (
      perm[i * batch_size:(i + 1) * batch_size])


@functools.lru_cache(maxsize=8)
def _permutation(n: int, seed: int, task_index: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([seed, task_index, epoch]).permutation(n)
