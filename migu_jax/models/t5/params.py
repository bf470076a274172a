"""Hugging Face ``T5ForConditionalGeneration`` checkpoints <-> :class:`modeling.T5ForConditionalGeneration`.

The table is the whole mapping (``{i}`` is the block number). HF keeps the
relative position bias in block 0 of each stack; here it belongs to the stack
(``encoder/position_bias``). ``encoder.embed_tokens`` / ``decoder.embed_tokens``
are copies of ``shared`` and are ignored, as is ``lm_head.weight`` when the
head is tied.

Example:
  >>> from migu_jax.models.t5 import modeling
  >>> cfg = modeling.Config.of_size("tiny", feed_forward_proj="gated-gelu")
  >>> state = to_hf(init_params(cfg), cfg)
  >>> state["decoder.block.1.layer.2.DenseReluDense.wi_1.weight"].shape
  (48, 32)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from migu_jax.models._checkpoint import (TRANSPOSE, Rule,
                                         params_to_state_dict, shapes_of, state_dict_to_params)
from migu_jax.models.t5 import modeling


def _attention(hf: str, flax: str) -> tuple[Rule, ...]:
  return tuple(Rule(f"{hf}.{n}.weight", f"{flax}/{n}/kernel", TRANSPOSE) for n in "qkvo")


def _mlp(hf: str, flax: str) -> tuple[Rule, ...]:
  return tuple(Rule(f"{hf}.{n}.weight", f"{flax}/{n}/kernel", TRANSPOSE)
               for n in ("wi", "wi_0", "wi_1", "wo"))


_E, _D = "encoder.block.{i}.layer.", "decoder.block.{i}.layer."
_BIAS = "SelfAttention.relative_attention_bias.weight"
RULES: tuple[Rule, ...] = (
    Rule("shared.weight", "shared/embedding"),
    Rule("lm_head.weight", "lm_head/kernel", TRANSPOSE),
    Rule("encoder.block.0.layer.0." + _BIAS, "encoder/position_bias/relative_attention_bias/embedding"),
    Rule("decoder.block.0.layer.0." + _BIAS, "decoder/position_bias/relative_attention_bias/embedding"),
    *_attention(_E + "0.SelfAttention", "encoder/layers_{i}/attention"),
    Rule(_E + "0.layer_norm.weight", "encoder/layers_{i}/attention_norm/scale"),
    *_mlp(_E + "1.DenseReluDense", "encoder/layers_{i}/mlp"),
    Rule(_E + "1.layer_norm.weight", "encoder/layers_{i}/mlp_norm/scale"),
    Rule("encoder.final_layer_norm.weight", "encoder/final_norm/scale"),
    *_attention(_D + "0.SelfAttention", "decoder/layers_{i}/self_attention"),
    Rule(_D + "0.layer_norm.weight", "decoder/layers_{i}/self_attention_norm/scale"),
    *_attention(_D + "1.EncDecAttention", "decoder/layers_{i}/cross_attention"),
    Rule(_D + "1.layer_norm.weight", "decoder/layers_{i}/cross_attention_norm/scale"),
    *_mlp(_D + "2.DenseReluDense", "decoder/layers_{i}/mlp"),
    Rule(_D + "2.layer_norm.weight", "decoder/layers_{i}/mlp_norm/scale"),
    Rule("decoder.final_layer_norm.weight", "decoder/final_norm/scale"),
)

IGNORED: tuple[str, ...] = (
    r"(encoder|decoder)\.embed_tokens\.weight",
    r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight",
)


def _init(cfg: modeling.Config, seed: int):
  ids = jnp.ones((1, 2), jnp.int32)
  return modeling.T5ForConditionalGeneration(cfg).init(jax.random.key(seed), ids, None, ids)


def expected_shapes(cfg: modeling.Config) -> dict[str, tuple[int, ...]]:
  """Flax path -> shape of every parameter, from ``jax.eval_shape`` (no compute)."""
  return shapes_of(lambda seed: _init(cfg, seed))


def init_params(cfg: modeling.Config, seed: int = 0) -> dict:
  """Randomly initialised params (for tests and demos)."""
  return _init(cfg, seed)["params"]


def from_hf(state_dict: dict, cfg: modeling.Config, source: str = "checkpoint") -> dict:
  """HF state dict (numpy) -> nested ``params``; raises CheckpointError listing all problems."""
  ignore = IGNORED + ((r"lm_head\.weight",) if cfg.tie_word_embeddings else ())
  return state_dict_to_params(state_dict, RULES, expected=expected_shapes(cfg),
                              ignore=ignore, source=source)


def to_hf(params: dict, cfg: modeling.Config) -> dict[str, np.ndarray]:
  """Nested ``params`` -> HF ``T5ForConditionalGeneration`` state dict (numpy).

  A tied head without output scaling (v1.1 configs written by transformers 5)
  is saved untied, with ``lm_head.weight`` a copy of ``shared.weight``, because
  transformers takes ``tie_word_embeddings`` to mean "scale the decoder output".
  """
  state = params_to_state_dict(params, RULES)
  if cfg.tie_word_embeddings and not cfg.scale_decoder_outputs:
    state["lm_head.weight"] = state["shared.weight"].copy()
  return state
