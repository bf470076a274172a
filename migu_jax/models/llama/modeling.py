"""Llama decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU) in Flax linen.

Laid out like Hugging Face's ``LlamaForCausalLM``: q/k/v/o and gate/up/down
projections are separate ``nn.Dense`` layers, so each torch ``Linear`` is one
Flax kernel and MIGU sees every projection's output. RoPE is Hugging Face's
rotate-half form. A tied lm head reads the embedding through ``embed.attend``.
Parameters stay float32; ``Config.dtype`` is the compute dtype. As in Hugging
Face, the only dropout is on the attention weights (``attention_dropout``),
run only with ``deterministic=False`` and a "dropout" rng.

Example:
  >>> import jax, jax.numpy as jnp
  >>> cfg = Config.of_size("tiny")
  >>> model = LlamaForCausalLM(cfg)
  >>> ids = jnp.ones((2, 6), jnp.int32)
  >>> params = model.init(jax.random.key(0), ids)["params"]
  >>> model.apply({"params": params}, ids).shape
  (2, 6, 128)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from migu_jax.models import _sizes

_ACTIVATIONS = {"silu": jax.nn.silu, "gelu": lambda x: jax.nn.gelu(x, approximate=False),
                "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


def _as_tuple(x):
  return tuple(x) if isinstance(x, list) else x


RUN_SETTINGS = ("dtype", "remat", "scan_layers")
"""Config fields that say how the model runs, not what it is: not part of a checkpoint's config.json."""


@dataclasses.dataclass(frozen=True)
class Config(_sizes.DeprecatedPreset):
  """Llama hyper-parameters (field names follow HF's config.json).

  ``head_dim`` defaults to ``hidden_size // num_attention_heads``;
  ``num_key_value_heads < num_attention_heads`` gives grouped-query attention.
  ``attention_dropout`` drops attention weights in training (HF's only Llama
  dropout). ``dtype`` is the compute dtype; ``remat`` recomputes layers in the
  backward; ``scan_layers`` runs the decoder layers as one ``nn.scan`` (their
  parameters stacked at ``params["layers"]`` with a leading layer axis, see
  :func:`migu_jax.models.llama.params.stack_layers`): one compiled layer for
  any depth. These three are run settings, not written by :meth:`to_hf`.
  """
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int | None = None
  head_dim: int | None = None
  hidden_act: str = "silu"
  max_position_embeddings: int = 2048
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  attention_dropout: float = 0.0
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False
  bos_token_id: Any = 1
  eos_token_id: Any = 2
  pad_token_id: Any = None
  model_type: str = "llama"
  dtype: Any = jnp.float32
  remat: bool = False
  scan_layers: bool = False

  def __post_init__(self):
    if self.num_key_value_heads is None:
      object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
    if self.head_dim is None:
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"llama.Config: num_attention_heads={self.num_attention_heads} is not "
                       f"a multiple of num_key_value_heads={self.num_key_value_heads}.")
    object.__setattr__(self, "eos_token_id", _as_tuple(self.eos_token_id))

  @classmethod
  def from_hf(cls, hf: dict, **overrides) -> "Config":
    """Builds a Config from a Hugging Face ``config.json`` dict."""
    if hf.get("model_type", "llama") != "llama":
      raise ValueError(f"llama.Config.from_hf: model_type {hf['model_type']!r} is not 'llama'.")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
      raise NotImplementedError(
          f"rope_type {rope_type!r} (rope scaling) is not supported; only plain RoPE "
          "(Llama 1/2, SmolLM) checkpoints load.")
    if hf.get("hidden_act", "silu") not in _ACTIVATIONS:
      raise NotImplementedError(f"hidden_act={hf['hidden_act']!r} is not one of {sorted(_ACTIVATIONS)}.")
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in hf.items() if k in names and v is not None}
    kwargs["rope_theta"] = float(hf.get("rope_theta") or rope.get("rope_theta") or 10000.0)
    kwargs.update(overrides)
    return cls(**kwargs)

  def to_hf(self) -> dict:
    """The Hugging Face ``config.json`` dict for this config."""
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
           if f.name not in RUN_SETTINGS}
    out["eos_token_id"] = list(out["eos_token_id"]) if isinstance(out["eos_token_id"], tuple) \
        else out["eos_token_id"]
    out["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
    out["architectures"] = ["LlamaForCausalLM"]
    return out

  @classmethod
  def of_size(cls, name: str, **overrides) -> "Config":
    """A named size (random weights' shapes; a pretrained checkpoint is a ``models.PRESETS`` name): "tiny" (tests) and "smollm2-135m" (SmolLM2-135M-Instruct)."""
    sizes = {
        "tiny": dict(vocab_size=128, hidden_size=32, intermediate_size=64,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     tie_word_embeddings=True),
        "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                             num_hidden_layers=30, num_attention_heads=9,
                             num_key_value_heads=3, max_position_embeddings=8192,
                             rms_norm_eps=1e-5, rope_theta=100000.0,
                             tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                             pad_token_id=2),
    }
    return _sizes.of_size(cls, "Llama", sizes, name, overrides)


class RMSNorm(nn.Module):
  """``x / rms(x) * scale``, computed in float32 as in Hugging Face."""
  eps: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
    return (scale * h.astype(self.dtype)).astype(self.dtype)


def rope_tables(position_ids, head_dim: int, theta: float):
  """cos/sin ``[B, T, head_dim]`` for rotate-half RoPE at ``position_ids``."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = position_ids.astype(jnp.float32)[..., None] * inv_freq
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
  """Rotates ``x [B, T, heads, head_dim]`` by the RoPE angles (rotate-half form)."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


class Attention(nn.Module):
  """Grouped-query causal self-attention with RoPE.

  With ``cache=(k, v)`` (``[B, S, kv_heads, head_dim]`` buffers), this call's
  keys and values are written at ``cache_index`` and attention runs over the
  whole buffer; the updated ``(k, v)`` is returned (else ``None``).
  """
  config: Config

  @nn.compact
  def __call__(self, x, mask, cos, sin, cache=None, cache_index=None, deterministic=True):
    cfg = self.config
    hd, nq, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    dense = lambda n, name: nn.Dense(n, use_bias=cfg.attention_bias, dtype=cfg.dtype, name=name)
    b, t, _ = x.shape
    q = dense(nq * hd, "q_proj")(x).reshape(b, t, nq, hd)
    k = dense(nkv * hd, "k_proj")(x).reshape(b, t, nkv, hd)
    v = dense(nkv * hd, "v_proj")(x).reshape(b, t, nkv, hd)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if cache is not None:
      at = (0, cache_index, 0, 0)
      k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), at)
      v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), at)
      cache = (k, v)
    # Query heads in group g share key/value head g (HF's repeat_kv order).
    q = q.reshape(b, t, nkv, nq // nkv, hd)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k).astype(jnp.float32) / jnp.sqrt(hd)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(cfg.dtype)
    probs = nn.Dropout(cfg.attention_dropout)(probs, deterministic=deterministic)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v.astype(cfg.dtype)).reshape(b, t, nq * hd)
    return dense(cfg.hidden_size, "o_proj")(out), cache


class MLP(nn.Module):
  """SwiGLU feed-forward: ``down(act(gate(x)) * up(x))``."""
  config: Config

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    dense = lambda n, name: nn.Dense(n, use_bias=cfg.mlp_bias, dtype=cfg.dtype, name=name)
    h = _ACTIVATIONS[cfg.hidden_act](dense(cfg.intermediate_size, "gate_proj")(x))
    h = h * dense(cfg.intermediate_size, "up_proj")(x)
    return dense(cfg.hidden_size, "down_proj")(h)


class DecoderLayer(nn.Module):
  """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``.

  ``deterministic`` is positional so that ``nn.remat`` can keep it static.
  """
  config: Config

  @nn.compact
  def __call__(self, x, mask, cos, sin, cache=None, cache_index=None, deterministic=True):
    cfg = self.config
    norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.dtype, name=name)
    h, cache = Attention(cfg, name="attention")(norm("input_norm")(x), mask, cos, sin,
                                                cache, cache_index, deterministic)
    x = x + h
    return x + MLP(cfg, name="mlp")(norm("post_attention_norm")(x)), cache


def causal_mask(attention_mask, q_len=None, offset=0):
  """``[B, q_len, S]`` boolean: query q (at ``offset + q``) sees key k <= it, k not padding."""
  s = attention_mask.shape[-1]
  q_len = s if q_len is None else q_len
  causal = jnp.arange(s)[None, :] <= (offset + jnp.arange(q_len))[:, None]
  return causal[None] & attention_mask.astype(bool)[:, None, :]


def init_cache(config: Config, batch: int, max_length: int):
  """Empty key/value buffers in the compute dtype: one ``(k, v)`` pair per layer, each
  ``[batch, max_length, kv_heads, head_dim]``; with ``config.scan_layers`` one stacked pair
  ``[layers, batch, ...]``, scanned alongside the layers.

  Example:
    >>> cache = init_cache(Config.of_size("tiny", scan_layers=True), batch=2, max_length=5)
    >>> cache[0].shape
    (2, 2, 5, 2, 8)
  """
  shape = (batch, max_length, config.num_key_value_heads, config.head_dim)
  if config.scan_layers:
    shape = (config.num_hidden_layers,) + shape
    return jnp.zeros(shape, config.dtype), jnp.zeros(shape, config.dtype)
  return tuple((jnp.zeros(shape, config.dtype), jnp.zeros(shape, config.dtype))
               for _ in range(config.num_hidden_layers))


def scanned_layers(config: Config, name: str = "layers") -> nn.Module:
  """The decoder layers as one ``nn.scan`` over :class:`DecoderLayer` (``nn.remat`` inside when
  ``config.remat``).

  Called like one layer, ``(x, mask, cos, sin, cache, cache_index, deterministic) -> (x, cache)``, with
  ``x`` carried from layer to layer and ``cache`` (a stacked ``(k, v)``, or None) scanned over its
  leading layer axis. Parameters and MIGU's statistics (the ``"magnitudes"`` collection) get a leading
  layer axis; each layer draws its own "params" and "dropout" rngs.
  """
  layer = DecoderLayer
  if config.remat:
    layer = nn.remat(DecoderLayer, static_argnums=(7,), prevent_cse=False)
  scan = nn.scan(layer, variable_axes={"params": 0, "magnitudes": 0},
                 split_rngs={"params": True, "dropout": True},
                 in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast, nn.broadcast),
                 length=config.num_hidden_layers)
  return scan(config, name=name)


class LlamaForCausalLM(nn.Module):
  """Llama language model: ``(input_ids, attention_mask, position_ids) -> logits``.

  ``position_ids`` default to ``0..T-1`` as in Hugging Face's forward; for
  left-padded batches pass ``cumsum(mask) - 1`` (the generation helper does).

  Incremental decoding: pass ``cache=init_cache(config, B, S)`` and
  ``cache_index`` (where ``input_ids`` start in the buffer); then
  ``attention_mask`` is ``[B, S]`` over the whole buffer and the call returns
  ``(logits, new_cache)``. A ``[B, T, S]`` ``attention_mask`` is taken as
  the attention pattern itself (query t sees key s where true), for layouts
  that are not causal, such as a prefix tree of answer options.

  ``deterministic=False`` turns attention dropout on (training); it then needs
  a "dropout" rng: ``model.apply(v, ids, deterministic=False, rngs={"dropout": key})``.

  With ``config.scan_layers`` the layers run as one scan (:func:`scanned_layers`), the cache is
  ``init_cache``'s stacked pair, and MIGU's statistics come one per layer with
  ``apply_with_magnitudes(..., stacked=True)``.
  """
  config: Config

  def setup(self):
    cfg = self.config
    self.embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, name="embed")
    if cfg.scan_layers:
      self.layers = scanned_layers(cfg)
    else:
      layer_cls = nn.remat(DecoderLayer, static_argnums=(7,)) if cfg.remat else DecoderLayer
      self.layers = [layer_cls(cfg, name=f"layers_{i}") for i in range(cfg.num_hidden_layers)]
    self.norm = RMSNorm(cfg.rms_norm_eps, cfg.dtype, name="norm")
    if not cfg.tie_word_embeddings:
      self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.dtype, name="lm_head")

  def hidden_states(self, input_ids, attention_mask=None, position_ids=None, cache=None,
                    cache_index=0, *, deterministic: bool = True):
    """The final-norm hidden states ``[B, T, hidden_size]`` (and the cache, if given)."""
    cfg = self.config
    t = input_ids.shape[1]
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    if position_ids is None:
      position_ids = jnp.broadcast_to(cache_index + jnp.arange(t), input_ids.shape)
    cos, sin = rope_tables(position_ids, cfg.head_dim, cfg.rope_theta)
    if attention_mask.ndim == 3:  # an explicit [B, T, S] mask (e.g. a prefix tree of options)
      mask = attention_mask.astype(bool)
    else:
      mask = causal_mask(attention_mask, t, cache_index if cache is not None else 0)
    x = self.embed(input_ids)
    if cfg.scan_layers:
      x, new_cache = self.layers(x, mask, cos, sin, cache, cache_index, deterministic)
    else:
      new_cache = []
      for i, layer in enumerate(self.layers):
        x, layer_cache = layer(x, mask, cos, sin, None if cache is None else cache[i], cache_index,
                               deterministic)
        new_cache.append(layer_cache)
      new_cache = tuple(new_cache)
    x = self.norm(x)
    return x if cache is None else (x, new_cache)

  def __call__(self, input_ids, attention_mask=None, position_ids=None, cache=None,
               cache_index=0, *, deterministic: bool = True):
    out = self.hidden_states(input_ids, attention_mask, position_ids, cache, cache_index,
                             deterministic=deterministic)
    x, cache = (out, None) if cache is None else out
    logits = self.logits(x)
    return logits if cache is None else (logits, cache)

  def logits(self, hidden):
    """The language-model head over final hidden states (the tied embedding or ``lm_head``)."""
    return self.embed.attend(hidden) if self.config.tie_word_embeddings else self.lm_head(hidden)
