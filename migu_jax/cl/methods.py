"""Continual-learning methods: a registry from a name to what the method changes in the one train loop.

A method is a small declarative record (:class:`Method`): which gradient mask it uses (a key of
:data:`migu_jax.cl.optimizers.MASKS`), whether it replays earlier tasks' data, whether it trains LoRA
adapters instead of the model. From it and the run config, the functions below build

* the trainable tree: ``{"model": ..., "head": ...}`` (+ ``"lora"``; then ``"model"`` is frozen),
* ``forward(params, *args, rng=None)`` -> ``(outputs, magnitudes)`` for the heads (dropout on when given an
  ``rng`` and ``cfg.dropout``),
* the plain parameters evaluation uses (LoRA merged).

The optimizer is :mod:`migu_jax.cl.optimizers`; each task's examples and batches, :mod:`migu_jax.cl.batching`.

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
``cfg.mask_targets`` (a name of :data:`migu_jax.cl.optimizers.LAYER_TYPES` or path patterns) limits the mask to some layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax

import migu_jax as migu
from migu_jax import lora as lora_lib


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

  With ``cfg.scan_layers`` the magnitudes of the scanned layers come one per layer (``stacked=True``);
  the optimizer thresholds them per layer (:func:`migu_jax.cl.optimizers.stacked_axes`).

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
                                             token_mask=token_mask(cfg, args), stacked=cfg.scan_layers, **train)
      return out, {"model": mags}
    return forward

  if cfg.padding_aware:
    raise ValueError("padding_aware=True is not supported with LoRA methods yet; set padding_aware=False.")
  if cfg.scan_layers:
    raise ValueError(f"{method.name}: LoRA methods do not support scanned layers yet; set scan_layers=False "
                     "(drop --scan-layers).")

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
