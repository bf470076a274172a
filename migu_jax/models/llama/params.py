"""Hugging Face ``LlamaForCausalLM`` checkpoints <-> :class:`modeling.LlamaForCausalLM` params.

The table is the whole mapping (``{i}`` is the layer number); every Linear
weight is transposed into a Dense kernel. ``rotary_emb.inv_freq`` buffers are
ignored, and so is ``lm_head.weight`` when embeddings are tied. For a
layer-scanned model (``Config.scan_layers``) the per-layer tensors are stacked
on load and unstacked on save (:func:`stack_layers`, :func:`unstack_layers`),
so every loader (Hugging Face folders, GGUF) gives either layout.

Example:
  >>> from migu_jax.models.llama import modeling
  >>> cfg = modeling.Config.of_size("tiny")
  >>> state = to_hf(init_params(cfg), cfg)
  >>> state["model.layers.0.self_attn.k_proj.weight"].shape
  (16, 32)
  >>> from_hf(state, cfg)["layers_0"]["attention"]["k_proj"]["kernel"].shape
  (32, 16)
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np

from migu_jax.models._checkpoint import (IDENTITY, TRANSPOSE, Rule,
                                         params_to_state_dict, shapes_of, state_dict_to_params)
from migu_jax.models.llama import modeling

_L = "model.layers.{i}."
_P = "layers_{i}/"
RULES: tuple[Rule, ...] = (
    Rule("model.embed_tokens.weight", "embed/embedding"),
    Rule("model.norm.weight", "norm/scale"),
    Rule("lm_head.weight", "lm_head/kernel", TRANSPOSE),
    Rule(_L + "input_layernorm.weight", _P + "input_norm/scale"),
    Rule(_L + "post_attention_layernorm.weight", _P + "post_attention_norm/scale"),
    *(Rule(f"{_L}self_attn.{n}.weight", f"{_P}attention/{n}/kernel", TRANSPOSE)
      for n in ("q_proj", "k_proj", "v_proj", "o_proj")),
    *(Rule(f"{_L}self_attn.{n}.bias", f"{_P}attention/{n}/bias", IDENTITY)
      for n in ("q_proj", "k_proj", "v_proj", "o_proj")),
    *(Rule(f"{_L}mlp.{n}.weight", f"{_P}mlp/{n}/kernel", TRANSPOSE)
      for n in ("gate_proj", "up_proj", "down_proj")),
    *(Rule(f"{_L}mlp.{n}.bias", f"{_P}mlp/{n}/bias", IDENTITY)
      for n in ("gate_proj", "up_proj", "down_proj")),
)

IGNORED: tuple[str, ...] = (r".*rotary_emb\.inv_freq",)


_LAYER = re.compile(r"layers_(\d+)\Z")


def stack_layers(params: dict) -> dict:
  """Unrolled params (``layers_0`` ... ``layers_{L-1}``) -> scanned params: one ``layers`` subtree whose
  leaves have a leading layer axis of size L (numpy leaves stay numpy). Other entries are kept.

  Example:
    >>> from migu_jax.models.llama import modeling
    >>> params = init_params(modeling.Config.of_size("tiny"))
    >>> stack_layers(params)["layers"]["mlp"]["up_proj"]["kernel"].shape
    (2, 32, 64)
  """
  numbers = sorted(int(m.group(1)) for m in map(_LAYER.match, params) if m)
  if numbers != list(range(len(numbers))) or not numbers:
    raise ValueError(f"stack_layers: expected layers_0 ... layers_N in the params, got {sorted(params)}.")
  layers = [params[f"layers_{i}"] for i in numbers]
  stack = lambda *xs: (np.stack if all(isinstance(x, np.ndarray) for x in xs) else jnp.stack)(xs)
  rest = {k: v for k, v in params.items() if not _LAYER.match(k)}
  return {**rest, "layers": jax.tree.map(stack, *layers)}


def unstack_layers(params: dict) -> dict:
  """Scanned params (one stacked ``layers`` subtree) -> unrolled ``layers_0`` ... ``layers_{L-1}``;
  the inverse of :func:`stack_layers`.

  Example:
    >>> from migu_jax.models.llama import modeling
    >>> params = init_params(modeling.Config.of_size("tiny"))
    >>> sorted(unstack_layers(stack_layers(params))) == sorted(params)
    True
  """
  if "layers" not in params:
    raise ValueError(f"unstack_layers: no stacked 'layers' in the params (keys {sorted(params)}).")
  count = jax.tree.leaves(params["layers"])[0].shape[0]
  rest = {k: v for k, v in params.items() if k != "layers"}
  return {**rest, **{f"layers_{i}": jax.tree.map(lambda x: x[i], params["layers"]) for i in range(count)}}


def _unrolled(cfg: modeling.Config) -> modeling.Config:
  return dataclasses.replace(cfg, scan_layers=False)


def _init(cfg: modeling.Config, seed: int):
  ids = jnp.ones((1, 2), jnp.int32)
  return modeling.LlamaForCausalLM(cfg).init(jax.random.key(seed), ids)


def expected_shapes(cfg: modeling.Config) -> dict[str, tuple[int, ...]]:
  """Flax path -> shape of every parameter of ``LlamaForCausalLM(cfg)``, from ``jax.eval_shape`` (no compute)."""
  return shapes_of(lambda seed: _init(cfg, seed))


def init_params(cfg: modeling.Config, seed: int = 0) -> dict:
  """Randomly initialised params of ``LlamaForCausalLM(cfg)`` (for tests and demos)."""
  return _init(cfg, seed)["params"]


def from_hf(state_dict: dict, cfg: modeling.Config, source: str = "checkpoint") -> dict:
  """HF state dict (numpy) -> nested ``params``; raises CheckpointError listing all problems."""
  ignore = IGNORED + ((r"lm_head\.weight",) if cfg.tie_word_embeddings else ())
  params = state_dict_to_params(state_dict, RULES, expected=expected_shapes(_unrolled(cfg)),
                                ignore=ignore, source=source)
  return stack_layers(params) if cfg.scan_layers else params


def to_hf(params: dict, cfg: modeling.Config) -> dict[str, np.ndarray]:
  """Nested ``params`` (stacked when ``cfg.scan_layers``) -> HF ``LlamaForCausalLM`` state dict (numpy)."""
  return params_to_state_dict(unstack_layers(params) if cfg.scan_layers else params, RULES)
