"""BERT and RoBERTa encoders in Flax linen, laid out like Hugging Face's.

Every Hugging Face ``nn.Linear`` is one ``nn.Dense`` here (query, key, value,
attention output, intermediate, output, pooler), so MIGU can read each
projection's output through ``flax.linen.intercept_methods``. Parameters stay
float32; ``Config.dtype`` sets the compute dtype. Dropout sits where Hugging
Face's does and runs only with ``deterministic=False`` and a "dropout" rng.

Example:
  >>> import jax, jax.numpy as jnp
  >>> cfg = Config.of_size("tiny")
  >>> model = BertModel(cfg)
  >>> ids = jnp.ones((2, 5), jnp.int32)
  >>> params = model.init(jax.random.key(0), ids)["params"]
  >>> model.apply({"params": params}, ids, jnp.ones((2, 5))).shape
  (2, 5, 32)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from migu_jax.models import _sizes

_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class Config(_sizes.DeprecatedPreset):
  """BERT / RoBERTa hyper-parameters (field names follow HF's config.json).

  ``model_type`` is "bert" or "roberta"; RoBERTa counts positions from
  ``pad_token_id + 1`` and skips padding tokens when numbering them.
  ``add_pooler`` adds the tanh pooler over the first token (then the model
  returns ``(hidden_states, pooled)``). ``hidden_dropout_prob`` drops the
  embeddings and each sublayer's output, ``attention_probs_dropout_prob`` the
  attention weights (training only). ``dtype`` is the compute dtype;
  ``remat`` recomputes each layer in the backward pass to save memory.
  """
  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  pad_token_id: int = 0
  model_type: str = "bert"
  add_pooler: bool = False
  dtype: Any = jnp.float32
  remat: bool = False

  @classmethod
  def from_hf(cls, hf: dict, **overrides) -> "Config":
    """Builds a Config from a Hugging Face ``config.json`` dict."""
    model_type = hf.get("model_type", "bert")
    if model_type not in ("bert", "roberta"):
      raise ValueError(f"bert.Config.from_hf: model_type {model_type!r} is not "
                       "'bert' or 'roberta'.")
    if hf.get("position_embedding_type", "absolute") != "absolute":
      raise NotImplementedError(
          f"position_embedding_type={hf['position_embedding_type']!r} is not "
          "supported; only 'absolute' BERT/RoBERTa checkpoints load.")
    if hf.get("hidden_act", "gelu") not in _ACTIVATIONS:
      raise NotImplementedError(f"hidden_act={hf['hidden_act']!r} is not one of "
                                f"{sorted(_ACTIVATIONS)}.")
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in hf.items() if k in names and v is not None}
    kwargs["model_type"] = model_type
    kwargs.setdefault("pad_token_id", 1 if model_type == "roberta" else 0)
    kwargs.update(overrides)
    return cls(**kwargs)

  def to_hf(self) -> dict:
    """The Hugging Face ``config.json`` dict for this config."""
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
           if f.name not in ("add_pooler", "dtype", "remat")}
    out["architectures"] = ["RobertaModel" if self.model_type == "roberta" else "BertModel"]
    out["position_embedding_type"] = "absolute"
    return out

  @classmethod
  def of_size(cls, name: str, **overrides) -> "Config":
    """A named size (random weights' shapes; a pretrained checkpoint is a ``models.PRESETS`` name): "tiny" (tests), "minilm-l6" (all-MiniLM-L6-v2), "base"."""
    sizes = {
        "tiny": dict(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=37,
                     max_position_embeddings=64),
        "minilm-l6": dict(hidden_size=384, num_hidden_layers=6,
                          num_attention_heads=12, intermediate_size=1536),
        "base": {},
    }
    return _sizes.of_size(cls, "BERT", sizes, name, overrides)


class Embeddings(nn.Module):
  """Word + position + token-type embeddings, then LayerNorm and dropout."""
  config: Config

  @nn.compact
  def __call__(self, input_ids, token_type_ids, position_ids, deterministic=True):
    cfg = self.config
    embed = lambda n, name: nn.Embed(n, cfg.hidden_size, name=name)
    x = (embed(cfg.vocab_size, "word_embeddings")(input_ids)
         + embed(cfg.max_position_embeddings, "position_embeddings")(position_ids)
         + embed(cfg.type_vocab_size, "token_type_embeddings")(token_type_ids))
    x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="layer_norm")(x)
    return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic).astype(cfg.dtype)


class SelfAttention(nn.Module):
  """Multi-head self-attention with separate query/key/value/out projections."""
  config: Config

  @nn.compact
  def __call__(self, x, mask, deterministic=True):
    cfg = self.config
    heads = cfg.num_attention_heads
    head_dim = cfg.hidden_size // heads
    dense = lambda name: nn.Dense(cfg.hidden_size, dtype=cfg.dtype, name=name)
    split = lambda t: t.reshape(*t.shape[:-1], heads, head_dim)
    q, k, v = split(dense("query")(x)), split(dense("key")(x)), split(dense("value")(x))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(head_dim)
    scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(cfg.dtype)
    probs = nn.Dropout(cfg.attention_probs_dropout_prob)(probs, deterministic=deterministic)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(x.shape)
    return dense("out")(out)


class Layer(nn.Module):
  """Post-LayerNorm transformer layer: attention, then feed-forward.

  Each sublayer's output is dropped before the residual add and LayerNorm.
  ``deterministic`` is positional so that ``nn.remat`` can keep it static.
  """
  config: Config

  @nn.compact
  def __call__(self, x, mask, deterministic=True):
    cfg = self.config
    norm = lambda name: nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, name=name)
    drop = lambda h: nn.Dropout(cfg.hidden_dropout_prob)(h, deterministic=deterministic)
    h = SelfAttention(cfg, name="attention")(x, mask, deterministic)
    x = norm("attention_norm")(x + drop(h))
    h = nn.Dense(cfg.intermediate_size, dtype=cfg.dtype, name="intermediate")(x)
    h = _ACTIVATIONS[cfg.hidden_act](h)
    h = nn.Dense(cfg.hidden_size, dtype=cfg.dtype, name="output")(h)
    return norm("output_norm")(x + drop(h))


def roberta_position_ids(input_ids, pad_token_id: int):
  """RoBERTa numbering: pad tokens get ``pad_token_id``, others count from it + 1."""
  not_pad = (input_ids != pad_token_id).astype(jnp.int32)
  return jnp.cumsum(not_pad, axis=1) * not_pad + pad_token_id


def default_inputs(cfg: Config, input_ids, attention_mask=None, token_type_ids=None, position_ids=None):
  """``(attention_mask, token_type_ids, position_ids)`` with Hugging Face's defaults for those not given:
  all ones, all zeros, and ``0..T-1`` (RoBERTa: counted from ``pad_token_id + 1`` over real tokens)."""
  if attention_mask is None:
    attention_mask = jnp.ones(input_ids.shape, jnp.int32)
  if token_type_ids is None:
    token_type_ids = jnp.zeros_like(input_ids)
  if position_ids is None:
    if cfg.model_type == "roberta":
      position_ids = roberta_position_ids(input_ids, cfg.pad_token_id)
    else:
      position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
  return attention_mask, token_type_ids, position_ids


class BertModel(nn.Module):
  """BERT / RoBERTa encoder: returns the last hidden states ``[B, T, H]``.

  With ``config.add_pooler`` it returns ``(hidden_states, pooled)`` where
  ``pooled = tanh(Dense(hidden_states[:, 0]))`` as in Hugging Face.
  ``deterministic=False`` turns dropout on (training); it then needs a
  "dropout" rng: ``model.apply(v, ids, mask, deterministic=False,
  rngs={"dropout": key})``.
  """
  config: Config

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None,
               position_ids=None, *, deterministic: bool = True):
    cfg = self.config
    attention_mask, token_type_ids, position_ids = default_inputs(cfg, input_ids, attention_mask, token_type_ids,
                                                                  position_ids)
    x = Embeddings(cfg, name="embeddings")(input_ids, token_type_ids, position_ids,
                                           deterministic)
    mask = attention_mask.astype(bool)
    layer_cls = nn.remat(Layer, static_argnums=(3,)) if cfg.remat else Layer
    for i in range(cfg.num_hidden_layers):
      x = layer_cls(cfg, name=f"layers_{i}")(x, mask, deterministic)
    if not cfg.add_pooler:
      return x
    pooled = jnp.tanh(nn.Dense(cfg.hidden_size, dtype=cfg.dtype, name="pooler")(x[:, 0]))
    return x, pooled


def mean_pool(hidden_states, attention_mask):
  """Mask-weighted mean over tokens (sentence-transformers' mean pooling).

  Example:
    >>> import jax.numpy as jnp
    >>> mean_pool(jnp.ones((1, 3, 2)), jnp.array([[1, 1, 0]])).shape
    (1, 2)
  """
  mask = attention_mask.astype(hidden_states.dtype)[..., None]
  return (hidden_states * mask).sum(1) / jnp.maximum(mask.sum(1), 1e-9)
