"""The model's own objective on text domains (``Config.objective="lm"``): batches, loss and perplexity.

Two objectives, chosen by the model (:func:`make_objective`):

* ``masked_lm`` (BERT / RoBERTa, :class:`migu_jax.models.bert.mlm.BertForMaskedLM`): 15% of the real,
  non-special tokens of each block are chosen (``mlm_probability``); 80% of those become the mask token,
  10% a random token, 10% stay (:func:`mlm_corrupt`, as transformers' ``DataCollatorForLanguageModeling``);
  the loss is the cross-entropy on the chosen tokens.
* ``causal_lm`` (Llama / SmolLM2): next-token cross-entropy on every real token after the first of a block.

Perplexity is ``exp(total NLL / predicted tokens)`` over a domain's test blocks. For the masked LM it is
taken on a fixed corruption of the test blocks (one key, each block folded in by its index), the same for
every model and stage, so the numbers of a matrix compare.

Training corruption is a pure function of the step's key (the runner's ``(seed, task, step)``) and each
row's index in the batch: it is the same however the batch is split into micro-batches or over devices,
and the same again when a run resumes.

An objective has the interface of :class:`migu_jax.cl.heads.Head` the runner uses (``init``,
``train_batch``, ``loss``) and :meth:`LanguageModelObjective.perplexity` for evaluation (``metric =
"perplexity"``).

Example:
  >>> import jax, jax.numpy as jnp
  >>> ids = jnp.arange(2, 402).reshape(2, 200)
  >>> new, chosen = mlm_corrupt(jax.random.key(0), ids, jnp.ones_like(ids, bool), jnp.arange(2),
  ...                           mask_id=1, vocab_size=500)
  >>> 0.05 < float(chosen.mean()) < 0.25, bool((new[~chosen] == ids[~chosen]).all())
  (True, True)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from migu_jax.cl import text as text_lib
from migu_jax.cl.heads import special_tokens

OBJECTIVES = ("task", "lm")
"""``Config.objective``: the labeled-task heads (:mod:`migu_jax.cl.heads`) or the model's own LM objective."""

_EVAL_KEY = 20240625  # the fixed corruption of masked-LM evaluation


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """``max_length`` (block size), ``eval_batch_size``, ``mlm_probability`` (masked LM)."""

  max_length: int = 128
  eval_batch_size: int = 32
  mlm_probability: float = 0.15


def mlm_corrupt(key, ids, maskable, rows, *, mask_id: int, vocab_size: int, probability: float = 0.15):
  """BERT's corruption: ``(corrupted ids, chosen)``, both ``[B, T]``.

  Each ``maskable`` position is chosen with ``probability``; a chosen token becomes ``mask_id`` (80%), a
  uniformly random token (10%) or stays (10%). Row ``b`` draws from ``fold_in(key, rows[b])``.
  """
  def one(row, ids_row, maskable_row):
    k_choose, k_kind, k_token = jax.random.split(jax.random.fold_in(key, row), 3)
    chosen = jax.random.bernoulli(k_choose, probability, ids_row.shape) & maskable_row
    u = jax.random.uniform(k_kind, ids_row.shape)
    random_ids = jax.random.randint(k_token, ids_row.shape, 0, vocab_size, ids_row.dtype)
    new = jnp.where(chosen & (u < 0.8), mask_id, jnp.where(chosen & (u >= 0.8) & (u < 0.9), random_ids, ids_row))
    return new, chosen

  return jax.vmap(one)(rows, ids, maskable)


def token_nll(logits, targets):
  """``-log p(target)`` per position, float32."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def _weighted(nll, weights):
  """``(sum of weighted NLL, sum of weights)``; positions of weight 0 add nothing, not even a NaN."""
  return jnp.where(weights > 0, nll * weights, 0.0).sum(), weights.sum()


class LanguageModelObjective:
  """Base: tokenizing, packing and padding blocks; subclasses define the loss terms (:meth:`_terms`)."""

  name = "lm"
  metric = "perplexity"
  eval_mode = "perplexity"

  def __init__(self, model, tokenizer, cfg: ObjectiveConfig):
    if tokenizer is None:
      raise ValueError(f"{type(self).__name__}: the model came without a tokenizer; put its files in the model "
                       "folder or use a preset such as 'minilm'.")
    self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = getattr(tokenizer, "eos_token_id", None) if pad is None else pad
    self.pad_id = int(pad or 0)
    self.prefix, self.suffix = special_tokens(tokenizer)
    self.special_ids = set(self.prefix) | set(self.suffix) | {
        int(i) for i in getattr(tokenizer, "all_special_ids", [])}
    model_ = model

    def nll(model_params, batch):
      total, count = self._terms(lambda ids: model_.apply({"params": model_params}, ids, batch["mask"]),
                                 batch, jax.random.key(_EVAL_KEY))
      return total, count

    self._nll = jax.jit(nll)

  # Packing ------------------------------------------------------------------------------------------

  def separator(self) -> list[int]:
    raise NotImplementedError

  def encode(self, texts: list[str]) -> list[list[int]]:
    if not texts:
      return []
    return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]]

  def pack(self, domain: text_lib.TextDomain) -> text_lib.TextDomain:
    """The domain's documents as token blocks of ``max_length`` (see :func:`migu_jax.cl.text.pack`)."""
    return text_lib.pack_domain(domain, self.encode, self.cfg.max_length, prefix=self.prefix, suffix=self.suffix,
                                separator=self.separator())

  # Training -----------------------------------------------------------------------------------------

  def init(self, key) -> dict:
    del key
    return {}

  def train_batch(self, examples: Sequence[tuple[int, tuple[int, ...]]]) -> dict[str, np.ndarray]:
    """``examples`` are ``(domain index, block)``; every batch is padded to ``max_length`` (one shape)."""
    return self._batch([block for _, block in examples])

  def _batch(self, blocks, rows=None) -> dict[str, np.ndarray]:
    n, length = len(blocks), self.cfg.max_length
    ids = np.full((n, length), self.pad_id, np.int32)
    mask = np.zeros((n, length), np.int32)
    for i, block in enumerate(blocks):
      ids[i, :len(block)], mask[i, :len(block)] = block, 1
    special = np.isin(ids, np.fromiter(self.special_ids, np.int32, len(self.special_ids)))
    row = np.arange(n, dtype=np.int32) if rows is None else np.asarray(rows, np.int32)
    return {"ids": ids, "mask": mask, "maskable": (mask == 1) & ~special, "row": row,
            "live": np.ones(n, np.float32)}

  def loss(self, forward, params, batch, rng=None):
    """Mean NLL of the predicted tokens, and the forward pass' magnitudes."""
    key = jax.random.fold_in(jax.random.key(0) if rng is None else rng, 0x4d4c4d)  # not the dropout stream
    out = {}

    def run(ids):
      logits, out["mags"] = forward(params, ids, batch["mask"], rng=rng)
      return logits

    total, count = self._terms(run, batch, key)
    return total / jnp.maximum(count, 1.0), out["mags"]

  def _terms(self, run, batch, key):
    """``(sum of NLL, number of predicted tokens)`` of a batch; ``run(ids)`` gives the logits."""
    raise NotImplementedError

  # Evaluation ---------------------------------------------------------------------------------------

  def perplexity(self, params, task_index: int | None, blocks, progress=None) -> float:
    """``exp(NLL / tokens)`` over ``blocks`` with plain ``{"model", ...}`` params (fixed batch shape)."""
    del task_index
    total, count, bs = 0.0, 0.0, self.cfg.eval_batch_size
    for start in range(0, len(blocks), bs):
      chunk = list(blocks[start:start + bs])
      n = len(chunk)
      batch = self._batch(chunk + [chunk[0]] * (bs - n), rows=np.arange(start, start + bs))
      batch["live"][n:] = 0  # the filler rows predict nothing
      t, c = self._nll(params["model"], batch)
      total, count = total + float(t), count + float(c)
      if progress is not None:
        progress(n)
    if count == 0:
      raise ValueError("perplexity: the blocks hold no token to predict; use longer documents or max_length.")
    return math.exp(total / count)

  def correct(self, *args, **kwargs):
    raise ValueError("The language-model objective is evaluated by perplexity, not accuracy (config.also_eval "
                     "and eval_mode do not apply with objective='lm').")


class MaskedLMObjective(LanguageModelObjective):
  """BERT / RoBERTa: predict the corrupted tokens (:func:`mlm_corrupt`)."""

  name = "masked_lm"

  def __init__(self, model, tokenizer, cfg):
    mask_id = getattr(tokenizer, "mask_token_id", None)
    if mask_id is None:
      raise ValueError("MaskedLMObjective: the tokenizer has no mask token ([MASK] / <mask>); a masked LM needs "
                       "one (set tokenizer.mask_token).")
    self.mask_id = int(mask_id)
    super().__init__(model, tokenizer, cfg)

  def separator(self):
    return list(self.suffix[-1:])  # [SEP] (BERT) or </s> (RoBERTa) between documents

  def _terms(self, run, batch, key):
    ids = batch["ids"]
    corrupted, chosen = mlm_corrupt(key, ids, batch["maskable"], batch["row"], mask_id=self.mask_id,
                                    vocab_size=self.model.config.vocab_size, probability=self.cfg.mlm_probability)
    return _weighted(token_nll(run(corrupted), ids), chosen.astype(jnp.float32) * batch["live"][:, None])


class CausalLMObjective(LanguageModelObjective):
  """Decoder-only LM: predict each next token."""

  name = "causal_lm"

  def separator(self):
    eos = getattr(self.tokenizer, "eos_token_id", None)
    return [] if eos is None else [int(eos)]

  def _terms(self, run, batch, key):
    del key
    logits = run(batch["ids"])
    weights = batch["mask"][:, 1:].astype(jnp.float32) * batch["live"][:, None]
    return _weighted(token_nll(logits[:, :-1], batch["ids"][:, 1:]), weights)


def load_language_model(spec: str):
  """``(model, params, tokenizer)`` for the LM objective: BERT/RoBERTa with the MLM head
  (:func:`migu_jax.models.bert.mlm.from_pretrained`), Llama as it is; T5 is not supported yet."""
  from migu_jax.models import PRESETS, from_pretrained, hub
  from migu_jax.models._checkpoint import read_config
  from migu_jax.models.bert import mlm

  if spec == "minilm":
    return mlm.from_pretrained(spec)[:3]
  if spec in PRESETS or spec.endswith(".gguf"):
    return from_pretrained(spec)
  folder = hub._resolve_folder(spec)
  model_type = read_config(folder).get("model_type")
  if model_type in ("bert", "roberta"):
    return mlm.from_pretrained(folder)[:3]
  if model_type == "t5":
    raise ValueError(f"{spec!r}: T5 span corruption is not implemented yet; with objective='lm' use a BERT/RoBERTa "
                     "(masked LM) or Llama (causal LM) model.")
  return from_pretrained(folder)


def make_objective(model, tokenizer, cfg: ObjectiveConfig) -> LanguageModelObjective:
  """The objective of ``model``'s family: masked LM for BERT/RoBERTa, causal LM for Llama."""
  from migu_jax.models.bert.mlm import BertForMaskedLM
  from migu_jax.models.llama.modeling import LlamaForCausalLM

  if isinstance(model, BertForMaskedLM):
    return MaskedLMObjective(model, tokenizer, cfg)
  if isinstance(model, LlamaForCausalLM):
    return CausalLMObjective(model, tokenizer, cfg)
  raise ValueError(f"No language-model objective for {type(model).__name__}; objective='lm' supports BERT/RoBERTa "
                   "(masked LM) and Llama (causal LM).")


__all__ = ["CausalLMObjective", "LanguageModelObjective", "MaskedLMObjective", "OBJECTIVES", "ObjectiveConfig",
           "load_language_model", "make_objective", "mlm_corrupt", "token_nll"]
