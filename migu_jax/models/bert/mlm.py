"""BERT / RoBERTa with the masked-language-model head, laid out like Hugging Face's ``*ForMaskedLM``.

:class:`BertForMaskedLM` is the encoder of :mod:`migu_jax.models.bert.modeling` (the same parameter names
at the same paths, so ``bert.params.from_hf`` loads its encoder) plus an ``mlm_head``: a dense transform,
the activation, LayerNorm, and the decoder to the vocabulary with its own bias. The decoder is tied to the
word embedding (``embeddings/word_embeddings.attend``, which MIGU captures as the embedding's per-row
statistic) unless ``tie_word_embeddings=False`` (then an ``nn.Dense`` kernel, masked like any other).

Checkpoints: BERT's ``cls.predictions.*`` and RoBERTa's ``lm_head.*`` map to ``mlm_head`` by
:data:`HEAD_RULES`. A checkpoint without them (a sentence encoder such as all-MiniLM-L6-v2) gets a fresh
head initialised as transformers does (normal(0.02) transform, unit LayerNorm, zero bias) with the decoder
tied to the embedding; :func:`from_pretrained` says which happened.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from migu_jax.models.bert import modeling
  >>> cfg = modeling.Config.of_size("tiny")
  >>> model = BertForMaskedLM(cfg)
  >>> ids = jnp.ones((2, 5), jnp.int32)
  >>> params = model.init(jax.random.key(0), ids)["params"]
  >>> model.apply({"params": params}, ids).shape
  (2, 5, 99)
  >>> sorted(params["mlm_head"])
  ['bias', 'layer_norm', 'transform']
"""

from __future__ import annotations

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from migu_jax.models._checkpoint import IDENTITY, TRANSPOSE, Rule, flatten_params, state_dict_to_params
from migu_jax.models.bert import modeling


class Embeddings(nn.Module):
  """:class:`modeling.Embeddings` (same parameters) whose word embedding can also :meth:`attend`."""
  config: modeling.Config

  def setup(self):
    cfg = self.config
    self.word_embeddings = nn.Embed(cfg.vocab_size, cfg.hidden_size)
    self.position_embeddings = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size)
    self.token_type_embeddings = nn.Embed(cfg.type_vocab_size, cfg.hidden_size)
    self.layer_norm = nn.LayerNorm(epsilon=cfg.layer_norm_eps)
    self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

  def __call__(self, input_ids, token_type_ids, position_ids, deterministic=True):
    x = (self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
         + self.token_type_embeddings(token_type_ids))
    return self.dropout(self.layer_norm(x), deterministic=deterministic).astype(self.config.dtype)

  def attend(self, x):
    """Logits through the word embedding (the tied decoder)."""
    return self.word_embeddings.attend(x.astype(jnp.float32))


class MaskedLMHead(nn.Module):
  """HF's ``BertLMPredictionHead``: dense, activation, LayerNorm, decoder (tied or not) plus a bias."""
  config: modeling.Config
  tie_word_embeddings: bool = True

  @nn.compact
  def __call__(self, hidden, embeddings: Embeddings):
    cfg = self.config
    init = nn.initializers.normal(0.02)
    h = nn.Dense(cfg.hidden_size, dtype=cfg.dtype, kernel_init=init, name="transform")(hidden)
    act = "gelu" if cfg.model_type == "roberta" else cfg.hidden_act  # RoBERTa's head is always gelu
    h = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, name="layer_norm")(modeling._ACTIVATIONS[act](h))
    if self.tie_word_embeddings:
      logits = embeddings.attend(h)
    else:
      logits = nn.Dense(cfg.vocab_size, use_bias=False, kernel_init=init, name="decoder")(h.astype(jnp.float32))
    bias = self.param("bias", nn.initializers.zeros, (cfg.vocab_size,))
    return logits.astype(jnp.float32) + bias


class BertForMaskedLM(nn.Module):
  """The BERT / RoBERTa encoder and its MLM head: returns logits ``[B, T, vocab_size]`` (float32).

  Arguments as :class:`modeling.BertModel` (``deterministic=False`` and a "dropout" rng train with dropout).
  """
  config: modeling.Config
  tie_word_embeddings: bool = True

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *,
               deterministic: bool = True):
    cfg = self.config
    attention_mask, token_type_ids, position_ids = modeling.default_inputs(cfg, input_ids, attention_mask,
                                                                           token_type_ids, position_ids)
    embeddings = Embeddings(cfg, name="embeddings")
    x = embeddings(input_ids, token_type_ids, position_ids, deterministic)
    mask = attention_mask.astype(bool)
    layer_cls = nn.remat(modeling.Layer, static_argnums=(3,)) if cfg.remat else modeling.Layer
    for i in range(cfg.num_hidden_layers):
      x = layer_cls(cfg, name=f"layers_{i}")(x, mask, deterministic)
    return MaskedLMHead(cfg, self.tie_word_embeddings, name="mlm_head")(x, embeddings)


def _dense(hf: str, flax: str) -> tuple[Rule, Rule]:
  return Rule(f"{hf}.weight", f"{flax}/kernel", TRANSPOSE), Rule(f"{hf}.bias", f"{flax}/bias", IDENTITY)


def _norm(hf: str, flax: str) -> tuple[Rule, Rule]:
  return Rule(f"{hf}.weight", f"{flax}/scale", IDENTITY), Rule(f"{hf}.bias", f"{flax}/bias", IDENTITY)


HEAD_RULES: dict[str, tuple[Rule, ...]] = {
    "bert": (*_dense("cls.predictions.transform.dense", "transform"),
             *_norm("cls.predictions.transform.LayerNorm", "layer_norm"),
             Rule("cls.predictions.bias", "bias", IDENTITY),
             Rule("cls.predictions.decoder.weight", "decoder/kernel", TRANSPOSE)),
    "roberta": (*_dense("lm_head.dense", "transform"), *_norm("lm_head.layer_norm", "layer_norm"),
                Rule("lm_head.bias", "bias", IDENTITY), Rule("lm_head.decoder.weight", "decoder/kernel", TRANSPOSE)),
}
"""Hugging Face MLM-head key -> path under ``mlm_head``, per ``model_type``."""

_HEAD_PREFIX = {"bert": "cls.predictions.", "roberta": "lm_head."}


def head_from_hf(state_dict: dict, cfg: modeling.Config, *, tie_word_embeddings: bool = True,
                 source: str = "checkpoint") -> dict | None:
  """The ``mlm_head`` params from a HF state dict, or None when it holds no MLM head.

  A tied checkpoint's decoder weight (a copy of the word embedding, if saved) is skipped; the decoder's
  own bias, when saved, is the one its logits add (transformers' forward), else the head's ``bias``.
  Raises ``CheckpointError`` listing every missing or mis-shaped tensor.
  """
  prefix = _HEAD_PREFIX[cfg.model_type]
  head = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
  if not head:
    return None
  if prefix + "decoder.bias" in head:  # the bias the decoder adds (transformers 5 unties it from ``bias``)
    head[prefix + "bias"] = head.pop(prefix + "decoder.bias")
  ignore = []
  if tie_word_embeddings:
    ignore.append(re.escape(prefix) + r"decoder\.weight")
  like = jax.eval_shape(lambda: init_head(cfg, tie_word_embeddings=tie_word_embeddings))
  expected = {k: v.shape for k, v in flatten_params(like).items()}
  return state_dict_to_params(head, HEAD_RULES[cfg.model_type], expected=expected, ignore=tuple(ignore),
                              source=f"{source} (MLM head)")


def init_head(cfg: modeling.Config, *, tie_word_embeddings: bool = True, seed: int = 0) -> dict:
  """A fresh ``mlm_head`` as transformers initialises one (normal(0.02) kernels, zero biases)."""
  model = BertForMaskedLM(dataclasses.replace(cfg, num_hidden_layers=0), tie_word_embeddings)
  return model.init(jax.random.key(seed), jnp.ones((1, 2), jnp.int32))["params"]["mlm_head"]


def from_pretrained(path_or_id: str, *, seed: int = 0, **config_overrides):
  """``(BertForMaskedLM, params, tokenizer, head_loaded)`` from a BERT/RoBERTa folder, hub id or preset.

  The encoder loads as in :func:`migu_jax.models.from_pretrained`; the MLM head from the same weights when
  present (``head_loaded`` True), else :func:`init_head` with ``seed``. ``tie_word_embeddings`` follows the
  checkpoint's config.json (default True).

  Raises:
    ValueError: the model is not BERT or RoBERTa.
  """
  from migu_jax.models import hub, presets
  from migu_jax.models._checkpoint import read_config, read_safetensors

  folder = presets.minilm_folder() if path_or_id == "minilm" else hub._resolve_folder(path_or_id)
  hf = read_config(folder)
  if hf.get("model_type") not in ("bert", "roberta"):
    raise ValueError(f"{path_or_id!r}: a masked-LM objective needs a BERT or RoBERTa model, not model_type "
                     f"{hf.get('model_type')!r}; use a causal LM (Llama) or the labeled-task objective.")
  cfg = modeling.Config.from_hf(hf, **config_overrides)
  tied = bool(hf.get("tie_word_embeddings", True))
  state = read_safetensors(folder)
  from migu_jax.models.bert import params as bert_params
  encoder = bert_params.from_hf(state, cfg, source=folder)
  head = head_from_hf(state, cfg, tie_word_embeddings=tied, source=folder)
  loaded = head is not None
  if head is None:
    head = init_head(cfg, tie_word_embeddings=tied, seed=seed)
  params = jax.tree.map(jnp.asarray, {**encoder, "mlm_head": head})
  return BertForMaskedLM(cfg, tied), params, hub.load_tokenizer(folder), loaded


__all__ = ["BertForMaskedLM", "Embeddings", "HEAD_RULES", "MaskedLMHead", "from_pretrained", "head_from_hf",
           "init_head"]
