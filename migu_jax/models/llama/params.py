"""Hugging Face ``LlamaForCausalLM`` checkpoints <-> :class:`modeling.LlamaForCausalLM` params.

The table is the whole mapping (``{i}`` is the layer number); every Linear
weight is transposed into a Dense kernel. ``rotary_emb.inv_freq`` buffers are
ignored, and so is ``lm_head.weight`` when embeddings are tied.

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
  return state_dict_to_params(state_dict, RULES, expected=expected_shapes(cfg),
                              ignore=ignore, source=source)


def to_hf(params: dict, cfg: modeling.Config) -> dict[str, np.ndarray]:
  """Nested ``params`` -> HF ``LlamaForCausalLM`` state dict (numpy)."""
  del cfg
  return params_to_state_dict(params, RULES)
