"""T5 encoder-decoder (v1.0, v1.1 and Flan) in Flax linen, laid out like Hugging Face's.

q/k/v/o and the feed-forward projections (``wi`` or gated ``wi_0``/``wi_1``,
then ``wo``) are separate bias-free ``nn.Dense`` layers, so each torch
``Linear`` is one Flax kernel and MIGU sees every projection's output.
Attention uses T5's bucketed relative position bias (computed once per stack,
from the stack's first layer in HF) and no ``1/sqrt(d)`` scaling. The lm head
is tied (``shared.attend``) or a separate ``lm_head``; v1.0 checkpoints scale
the decoder output by ``d_model**-0.5`` before a tied head. Dropout
(``dropout_rate``) sits where Hugging Face's does and runs only with
``deterministic=False`` and a "dropout" rng.

Example:
  >>> import jax, jax.numpy as jnp
  >>> cfg = Config.of_size("tiny")
  >>> model = T5ForConditionalGeneration(cfg)
  >>> enc, dec = jnp.ones((2, 7), jnp.int32), jnp.zeros((2, 3), jnp.int32)
  >>> params = model.init(jax.random.key(0), enc, None, dec)["params"]
  >>> model.apply({"params": params}, enc, None, dec).shape
  (2, 3, 64)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from migu_jax.models import _sizes

_ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class Config(_sizes.DeprecatedPreset):
  """T5 hyper-parameters (field names follow HF's config.json).

  ``feed_forward_proj`` is "relu" (v1.0) or "gated-gelu" (v1.1 / Flan), or
  another "[gated-]act". ``tie_word_embeddings``: the lm head reuses the
  shared embedding. ``scale_decoder_outputs``: multiply the decoder output by
  ``d_model**-0.5`` before the head (v1.0). ``dropout_rate`` drops the
  embeddings, attention weights, the feed-forward hidden units, each
  sublayer's output and each stack's output (training only). ``dtype`` is the
  compute dtype.
  """
  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 2048
  num_layers: int = 6
  num_decoder_layers: int | None = None
  num_heads: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  dropout_rate: float = 0.1
  feed_forward_proj: str = "relu"
  tie_word_embeddings: bool = True
  scale_decoder_outputs: bool = True
  pad_token_id: int = 0
  eos_token_id: int = 1
  decoder_start_token_id: int = 0
  model_type: str = "t5"
  dtype: Any = jnp.float32
  remat: bool = False

  def __post_init__(self):
    if self.num_decoder_layers is None:
      object.__setattr__(self, "num_decoder_layers", self.num_layers)
    if self.activation not in _ACTIVATIONS:
      raise NotImplementedError(
          f"t5.Config: feed_forward_proj={self.feed_forward_proj!r} is not supported; use "
          f"'[gated-]ACT' with ACT in {sorted(_ACTIVATIONS)}.")

  @property
  def is_gated(self) -> bool:
    return self.feed_forward_proj.startswith("gated-")

  @property
  def activation(self) -> str:
    if self.feed_forward_proj == "gated-gelu":  # HF maps this one to the tanh gelu.
      return "gelu_new"
    return self.feed_forward_proj.split("-")[-1]

  @classmethod
  def from_hf(cls, hf: dict, **overrides) -> "Config":
    """Builds a Config from a Hugging Face ``config.json`` dict.

    Older configs mark v1.1 by ``tie_word_embeddings: false`` (untied head, no
    output scaling); transformers >= 5 writes ``scale_decoder_outputs``.
    """
    if hf.get("model_type", "t5") != "t5":
      raise ValueError(f"t5.Config.from_hf: model_type {hf['model_type']!r} is not 't5'.")
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in hf.items() if k in names and v is not None}
    tie = bool(hf.get("tie_word_embeddings", True))
    kwargs["tie_word_embeddings"] = tie
    kwargs["scale_decoder_outputs"] = bool(hf.get("scale_decoder_outputs", tie))
    kwargs.update(overrides)
    return cls(**kwargs)

  def to_hf(self) -> dict:
    """The Hugging Face ``config.json`` dict for this config."""
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
           if f.name not in ("dtype", "remat")}
    out.update(is_encoder_decoder=True, architectures=["T5ForConditionalGeneration"],
               dense_act_fn=self.activation, is_gated_act=self.is_gated)
    if self.tie_word_embeddings and not self.scale_decoder_outputs:
      # transformers reads "tied" as "scaled": save such a head untied (params.to_hf
      # writes lm_head.weight as a copy of shared.weight).
      out["tie_word_embeddings"] = False
    return out

  @classmethod
  def of_size(cls, name: str, **overrides) -> "Config":
    """A named size (random weights' shapes; a pretrained checkpoint is a ``models.PRESETS`` name): "tiny" (tests), "t5-small" (v1.0), "flan-t5-small" (v1.1)."""
    sizes = {
        "tiny": dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4),
        "t5-small": {},
        "flan-t5-small": dict(d_ff=1024, num_layers=8, num_heads=6, feed_forward_proj="gated-gelu",
                              tie_word_embeddings=False, scale_decoder_outputs=False),
    }
    return _sizes.of_size(cls, "T5", sizes, name, overrides)


class LayerNorm(nn.Module):
  """T5's RMS norm: no mean subtraction, no bias, computed in float32."""
  eps: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
    return (scale * h).astype(self.dtype)


def relative_position_buckets(q_len: int, k_len: int, *, bidirectional: bool,
                              num_buckets: int, max_distance: int):
  """``[q_len, k_len]`` bucket ids of ``key - query`` (exact when near, log-spaced when far)."""
  rel = jnp.arange(k_len)[None, :] - jnp.arange(q_len)[:, None]
  buckets = jnp.zeros_like(rel)
  if bidirectional:
    num_buckets //= 2
    buckets += (rel > 0).astype(rel.dtype) * num_buckets
    rel = jnp.abs(rel)
  else:
    rel = -jnp.minimum(rel, 0)
  max_exact = num_buckets // 2
  far = max_exact + (jnp.log(jnp.maximum(rel, 1).astype(jnp.float32) / max_exact)
                     / math.log(max_distance / max_exact)
                     * (num_buckets - max_exact)).astype(rel.dtype)
  far = jnp.minimum(far, num_buckets - 1)
  return buckets + jnp.where(rel < max_exact, rel, far)


def _dropout(cfg: Config, deterministic: bool):
  """``x -> Dropout(cfg.dropout_rate)(x)``: identity when ``deterministic``."""
  return lambda x: nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)


class Attention(nn.Module):
  """T5 multi-head attention: unscaled scores + relative position bias."""
  config: Config

  @nn.compact
  def __call__(self, x, kv, bias, mask, deterministic=True):
    cfg = self.config
    inner = cfg.num_heads * cfg.d_kv
    dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=cfg.dtype, name=name)
    split = lambda t: t.reshape(*t.shape[:-1], cfg.num_heads, cfg.d_kv)
    q, k, v = split(dense(inner, "q")(x)), split(dense(inner, "k")(kv)), split(dense(inner, "v")(kv))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
    if bias is not None:
      scores = scores + bias
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(cfg.dtype)
    probs = _dropout(cfg, deterministic)(probs)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(*x.shape[:-1], inner)
    return dense(cfg.d_model, "o")(out)


class FeedForward(nn.Module):
  """``wo(act(wi(x)))`` or gated ``wo(act(wi_0(x)) * wi_1(x))``, dropout before ``wo``."""
  config: Config

  @nn.compact
  def __call__(self, x, deterministic=True):
    cfg = self.config
    dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=cfg.dtype, name=name)
    act = _ACTIVATIONS[cfg.activation]
    if cfg.is_gated:
      h = act(dense(cfg.d_ff, "wi_0")(x)) * dense(cfg.d_ff, "wi_1")(x)
    else:
      h = act(dense(cfg.d_ff, "wi")(x))
    return dense(cfg.d_model, "wo")(_dropout(cfg, deterministic)(h))


class EncoderLayer(nn.Module):
  """Pre-norm block; each sublayer's output is dropped before the residual add.

  ``deterministic`` is positional so that ``nn.remat`` can keep it static.
  """
  config: Config

  @nn.compact
  def __call__(self, x, bias, mask, deterministic=True):
    cfg = self.config
    norm = lambda name: LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, name=name)
    drop = _dropout(cfg, deterministic)
    h = norm("attention_norm")(x)
    x = x + drop(Attention(cfg, name="attention")(h, h, bias, mask, deterministic))
    return x + drop(FeedForward(cfg, name="mlp")(norm("mlp_norm")(x), deterministic))


class DecoderLayer(nn.Module):
  """Self-attention, cross-attention, feed-forward; dropout as in :class:`EncoderLayer`."""
  config: Config

  @nn.compact
  def __call__(self, x, encoded, bias, self_mask, cross_mask, deterministic=True):
    cfg = self.config
    norm = lambda name: LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, name=name)
    drop = _dropout(cfg, deterministic)
    h = norm("self_attention_norm")(x)
    x = x + drop(Attention(cfg, name="self_attention")(h, h, bias, self_mask, deterministic))
    h = norm("cross_attention_norm")(x)
    x = x + drop(Attention(cfg, name="cross_attention")(h, encoded, None, cross_mask, deterministic))
    return x + drop(FeedForward(cfg, name="mlp")(norm("mlp_norm")(x), deterministic))


class _PositionBias(nn.Module):
  """``[1, heads, q, k]`` learned bias per relative-position bucket."""
  config: Config
  bidirectional: bool

  @nn.compact
  def __call__(self, q_len, k_len):
    cfg = self.config
    buckets = relative_position_buckets(
        q_len, k_len, bidirectional=self.bidirectional,
        num_buckets=cfg.relative_attention_num_buckets,
        max_distance=cfg.relative_attention_max_distance)
    table = nn.Embed(cfg.relative_attention_num_buckets, cfg.num_heads,
                     name="relative_attention_bias")
    return jnp.transpose(table(buckets), (2, 0, 1))[None].astype(jnp.float32)


class Encoder(nn.Module):
  """Embedded tokens ``[B, T, d]`` + mask ``[B, T]`` -> encoded ``[B, T, d]``.

  The embeddings and the final norm's output are dropped (HF's ``T5Stack``).
  """
  config: Config

  @nn.compact
  def __call__(self, x, attention_mask, deterministic=True):
    cfg = self.config
    drop = _dropout(cfg, deterministic)
    t = x.shape[1]
    bias = _PositionBias(cfg, True, name="position_bias")(t, t)
    mask = attention_mask.astype(bool)[:, None, None, :]
    layer_cls = nn.remat(EncoderLayer, static_argnums=(4,)) if cfg.remat else EncoderLayer
    x = drop(x)
    for i in range(cfg.num_layers):
      x = layer_cls(cfg, name=f"layers_{i}")(x, bias, mask, deterministic)
    return drop(LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, name="final_norm")(x))


class Decoder(nn.Module):
  """Embedded decoder tokens + encoder output -> final-norm hidden states (dropout as the encoder)."""
  config: Config

  @nn.compact
  def __call__(self, x, encoded, attention_mask, decoder_attention_mask, deterministic=True):
    cfg = self.config
    drop = _dropout(cfg, deterministic)
    t = x.shape[1]
    bias = _PositionBias(cfg, False, name="position_bias")(t, t)
    causal = jnp.tril(jnp.ones((t, t), bool))[None, None]
    self_mask = causal & decoder_attention_mask.astype(bool)[:, None, None, :]
    cross_mask = attention_mask.astype(bool)[:, None, None, :]
    layer_cls = nn.remat(DecoderLayer, static_argnums=(6,)) if cfg.remat else DecoderLayer
    x = drop(x)
    for i in range(cfg.num_decoder_layers):
      x = layer_cls(cfg, name=f"layers_{i}")(x, encoded, bias, self_mask, cross_mask, deterministic)
    return drop(LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, name="final_norm")(x))


def shift_right(labels, decoder_start_token_id: int = 0, pad_token_id: int = 0):
  """Teacher-forcing decoder inputs: ``[start, labels[:-1]]``, -100 -> pad.

  Example:
    >>> import jax.numpy as jnp
    >>> shift_right(jnp.array([[5, 6, -100]])).tolist()
    [[0, 5, 6]]
  """
  labels = jnp.asarray(labels)
  shifted = jnp.concatenate(
      [jnp.full((labels.shape[0], 1), decoder_start_token_id, labels.dtype), labels[:, :-1]], 1)
  return jnp.where(shifted == -100, pad_token_id, shifted)


class T5ForConditionalGeneration(nn.Module):
  """T5: ``(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask) -> logits``.

  ``encode`` and ``decode`` run the halves separately (for generation):
  ``model.apply(v, ids, mask, method="encode")`` and
  ``model.apply(v, decoder_ids, encoded, mask, method="decode")``.
  ``deterministic=False`` turns dropout on (training); it then needs a
  "dropout" rng: ``model.apply(v, ..., deterministic=False, rngs={"dropout": key})``.
  """
  config: Config

  def setup(self):
    cfg = self.config
    self.shared = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype)
    self.encoder = Encoder(cfg)
    self.decoder = Decoder(cfg)
    if not cfg.tie_word_embeddings:
      self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.dtype)

  def encode(self, input_ids, attention_mask=None, *, deterministic: bool = True):
    """Encoder hidden states ``[B, T, d_model]``."""
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    return self.encoder(self.shared(input_ids), attention_mask, deterministic)

  def decode(self, decoder_input_ids, encoded, attention_mask=None,
             decoder_attention_mask=None, *, deterministic: bool = True):
    """Logits ``[B, S, vocab]`` for decoder inputs given the encoder output."""
    cfg = self.config
    if attention_mask is None:
      attention_mask = jnp.ones(encoded.shape[:2], jnp.int32)
    if decoder_attention_mask is None:
      decoder_attention_mask = jnp.ones(decoder_input_ids.shape, jnp.int32)
    x = self.decoder(self.shared(decoder_input_ids), encoded, attention_mask,
                     decoder_attention_mask, deterministic)
    if cfg.scale_decoder_outputs:
      x = x * (cfg.d_model ** -0.5)
    return self.shared.attend(x) if cfg.tie_word_embeddings else self.lm_head(x)

  def __call__(self, input_ids, attention_mask=None, decoder_input_ids=None,
               decoder_attention_mask=None, *, deterministic: bool = True):
    if decoder_input_ids is None:
      raise ValueError("T5ForConditionalGeneration needs decoder_input_ids; for training "
                       "pass migu_jax.models.t5.shift_right(labels).")
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    encoded = self.encode(input_ids, attention_mask, deterministic=deterministic)
    return self.decode(decoder_input_ids, encoded, attention_mask, decoder_attention_mask,
                       deterministic=deterministic)
