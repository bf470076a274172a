"""Hugging Face BERT / RoBERTa checkpoints <-> :class:`modeling.BertModel` params.

The table below is the whole mapping; ``{i}`` is the layer number. Keys of
``BertFor*`` / ``RobertaFor*`` checkpoints carry a ``bert.`` / ``roberta.``
prefix, which is stripped; their task heads (``cls.*``, ``lm_head.*``) are
ignored, as are the ``position_ids`` buffers. The pooler's weights load only
with ``Config.add_pooler=True`` (``from_pretrained(path, add_pooler=True)``);
otherwise they are skipped, and a folder saved from such params has no pooler
(transformers then initialises a fresh one, which leaves the hidden states
unchanged).

Example:
  >>> from migu_jax.models.bert import modeling
  >>> cfg = modeling.Config.of_size("tiny")
  >>> params = init_params(cfg)
  >>> state = to_hf(params, cfg)
  >>> state["encoder.layer.0.attention.self.query.weight"].shape
  (32, 32)
  >>> back = from_hf(state, cfg)
  >>> bool((back["layers_1"]["output"]["kernel"] == params["layers_1"]["output"]["kernel"]).all())
  True
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from migu_jax.models._checkpoint import (IDENTITY, TRANSPOSE, Rule,
                                         params_to_state_dict, shapes_of, state_dict_to_params)
from migu_jax.models.bert import modeling


def _dense(hf: str, flax: str) -> tuple[Rule, Rule]:
  return (Rule(f"{hf}.weight", f"{flax}/kernel", TRANSPOSE),
          Rule(f"{hf}.bias", f"{flax}/bias", IDENTITY))


def _norm(hf: str, flax: str) -> tuple[Rule, Rule]:
  return (Rule(f"{hf}.weight", f"{flax}/scale", IDENTITY),
          Rule(f"{hf}.bias", f"{flax}/bias", IDENTITY))


_L = "encoder.layer.{i}."
RULES: tuple[Rule, ...] = (
    Rule("embeddings.word_embeddings.weight", "embeddings/word_embeddings/embedding"),
    Rule("embeddings.position_embeddings.weight", "embeddings/position_embeddings/embedding"),
    Rule("embeddings.token_type_embeddings.weight", "embeddings/token_type_embeddings/embedding"),
    *_norm("embeddings.LayerNorm", "embeddings/layer_norm"),
    *_dense(_L + "attention.self.query", "layers_{i}/attention/query"),
    *_dense(_L + "attention.self.key", "layers_{i}/attention/key"),
    *_dense(_L + "attention.self.value", "layers_{i}/attention/value"),
    *_dense(_L + "attention.output.dense", "layers_{i}/attention/out"),
    *_norm(_L + "attention.output.LayerNorm", "layers_{i}/attention_norm"),
    *_dense(_L + "intermediate.dense", "layers_{i}/intermediate"),
    *_dense(_L + "output.dense", "layers_{i}/output"),
    *_norm(_L + "output.LayerNorm", "layers_{i}/output_norm"),
    *_dense("pooler.dense", "pooler"),
)

# Known-unused keys: buffers and pre-training / task heads we do not model.
IGNORED: tuple[str, ...] = (
    r"embeddings\.position_ids", r"cls\..*", r"lm_head\..*",
)


def _strip_prefix(state_dict: dict) -> dict:
  return {re.sub(r"^(bert|roberta)\.", "", k): v for k, v in state_dict.items()}


def _init(cfg: modeling.Config, seed: int):
  ids = jnp.ones((1, 2), jnp.int32)
  return modeling.BertModel(cfg).init(jax.random.key(seed), ids)


def expected_shapes(cfg: modeling.Config) -> dict[str, tuple[int, ...]]:
  """Flax path -> shape of every parameter of ``BertModel(cfg)``, from ``jax.eval_shape`` (no compute)."""
  return shapes_of(lambda seed: _init(cfg, seed))


def init_params(cfg: modeling.Config, seed: int = 0) -> dict:
  """Randomly initialised params of ``BertModel(cfg)`` (for tests and demos)."""
  return _init(cfg, seed)["params"]


def from_hf(state_dict: dict, cfg: modeling.Config, source: str = "checkpoint") -> dict:
  """HF state dict (numpy) -> nested ``params``; raises CheckpointError listing all problems."""
  ignore = IGNORED if cfg.add_pooler else IGNORED + (r"pooler\..*",)
  return state_dict_to_params(_strip_prefix(state_dict), RULES,
                              expected=expected_shapes(cfg), ignore=ignore, source=source)


def to_hf(params: dict, cfg: modeling.Config) -> dict[str, np.ndarray]:
  """Nested ``params`` -> HF ``BertModel`` / ``RobertaModel`` state dict (numpy)."""
  del cfg
  return params_to_state_dict(params, RULES)
