"""The model's own objective on text domains (``Config.objective="lm"``): batches, loss and perplexity.

Two objectives, chosen by the model (:func:`make_objective`):

* ``masked_lm`` (BERT / RoBERTa, :class:`migu_jax.models.bert.mlm.BertForMaskedLM`): 15% of the real,
  non-special tokens of each block are chosen (``mlm_probability``); 80% of those become the mask token,
  10% a random token, 10% stay (:func:`mlm_corrupt`, as transformers' ``DataCollatorForLanguageModeling``);
  the loss is the cross-entropy on the chosen tokens.
* ``causal_lm`` (Llama / SmolLM2): next-token cross-entropy on every real token after the first of a block.
* ``span_corruption`` (T5, :class:`migu_jax.models.t5.T5ForConditionalGeneration`): T5's pre-training
  objective (:func:`span_corrupt`): 15% of each block's tokens in spans of mean length 3, each span
  replaced in the encoder input by one sentinel (``<extra_id_0>``, ``<extra_id_1>``, ...); the decoder
  predicts ``<extra_id_0> span_0 <extra_id_1> span_1 ... </s>``, cross-entropy on those tokens.

Perplexity is ``exp(total NLL / predicted tokens)`` over a domain's test blocks. For the masked LM it is
and the span corruption it is taken on a fixed corruption of the test blocks (one key, each block folded in by its index), the same for
every model and stage, so the numbers of a matrix compare.

Training corruption is a pure function of the step's key (the runner's ``(seed, task, step)``) and each
row's index in the batch: it is the same however the batch is split into micro-batches or over devices,
and the same again when a run resumes.

An objective has the interface of :class:`migu_jax.cl.heads.Head` the runner uses (``init``,
``train_batch``, ``loss``) and :meth:`LanguageModelObjective.perplexity` for evaluation (``metric =
"perplexity"``), run by an :class:`~migu_jax.cl.heads.EvalPlacement` (one device, or split over a mesh's data
axis) as the heads' evaluation.

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
from migu_jax.cl.heads import EvalPlacement, special_tokens

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


def _random_segmentation(key, n_items, n_segments, size: int):
  """Lengths ``[size]`` of ``n_segments`` non-empty segments of ``n_items`` items (the rest 0), the cut points
  drawn uniformly without replacement (T5's ``_random_segmentation``, at a fixed shape)."""
  i = jnp.arange(size)
  valid = (i >= 1) & (i < n_items)
  scores = jnp.where(valid, jax.random.uniform(key, (size,)), 2.0)
  cut = valid & (jnp.argsort(jnp.argsort(scores)) < n_segments - 1)
  segment = jnp.cumsum(cut)
  return jnp.zeros(size, jnp.int32).at[segment].add((i < n_items).astype(jnp.int32))


def _compact(values, keep, fill):
  """``values[keep]`` moved to the front of an array of the same length, the rest ``fill``."""
  target = jnp.where(keep, jnp.cumsum(keep) - 1, values.shape[0])
  return jnp.full_like(values, fill).at[target].set(values, mode="drop"), keep.sum()


def span_corrupt(key, ids, lengths, rows, *, sentinels, eos_id: int, pad_id: int, noise_density: float = 0.15,
                 mean_span: float = 3.0):
  """T5's span corruption at a fixed shape: ``(inputs, input_mask, targets, target_mask)``, each ``[B, T]``.

  Row ``b``'s first ``lengths[b]`` tokens of ``ids`` are corrupted (the rest of its real tokens, e.g. the
  final ``</s>``, stay): ``round(density * n)`` of them, in ``round(noise / mean_span)`` spans, the layout
  ``kept, noise, kept, noise, ...`` drawn from ``fold_in(key, rows[b])``. The input replaces each noise span
  by the next sentinel (``sentinels[0]``, ``sentinels[1]``, ...); the target is each span after its
  sentinel, then the sentinel of the kept tokens after the last span (if any), then ``eos_id``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> x, xm, y, ym = span_corrupt(jax.random.key(0), jnp.arange(100, 130)[None], jnp.array([30]), jnp.arange(1),
    ...                             sentinels=jnp.array([9, 8, 7]), eos_id=1, pad_id=0, noise_density=0.3)
    >>> print(x[0, :int(xm.sum())].tolist())
    [100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 9, 115, 116, 117, 118, 119, 120, 8, 122, 123, 124, 125, 126, 7]
    >>> print(y[0, :int(ym.sum())].tolist())
    [9, 110, 111, 112, 113, 114, 8, 121, 7, 127, 128, 129, 1]
  """
  size = ids.shape[1]
  sentinels = jnp.asarray(sentinels, ids.dtype)

  def one(row, ids_row, n):
    k_noise, k_kept = jax.random.split(jax.random.fold_in(key, row))
    noise_n = jnp.clip(jnp.round(n * noise_density).astype(jnp.int32), 1, jnp.maximum(n - 1, 1))
    spans = jnp.clip(jnp.round(noise_n / mean_span).astype(jnp.int32), 1, jnp.minimum(noise_n, n - noise_n))
    spans = jnp.minimum(jnp.maximum(spans, 1), sentinels.shape[0])
    noise_len = _random_segmentation(k_noise, noise_n, spans, size)
    kept_len = _random_segmentation(k_kept, n - noise_n, spans, size)
    starts = jnp.cumsum(kept_len) + jnp.cumsum(noise_len) - noise_len  # noise span j after kept_0..kept_j
    live = jnp.arange(size) < spans
    marks = (jnp.zeros(size + 1, jnp.int32).at[jnp.where(live, starts, size)].add(1)
             .at[jnp.where(live, starts + noise_len, size)].add(-1))
    i = jnp.arange(size)
    noise = (jnp.cumsum(marks)[:size] > 0) & (i < n)
    real = ids_row != pad_id
    first = noise & ~jnp.concatenate([jnp.zeros(1, bool), noise[:-1]])
    inputs = jnp.where(first, sentinels[jnp.clip(jnp.cumsum(first) - 1, 0, sentinels.shape[0] - 1)], ids_row)
    inputs, n_in = _compact(inputs, (~noise & real) | first, pad_id)
    kept = ~noise & (i < n)
    kept_first = kept & ~jnp.concatenate([jnp.zeros(1, bool), kept[:-1]])
    targets = jnp.where(kept_first, sentinels[jnp.clip(jnp.cumsum(kept_first) - 1, 0, sentinels.shape[0] - 1)],
                        ids_row)
    targets, n_out = _compact(targets, noise | kept_first, pad_id)
    targets = targets.at[n_out].set(eos_id, mode="drop")
    return inputs, (i < n_in).astype(jnp.int32), targets, (i < n_out + 1).astype(jnp.int32)

  return jax.vmap(one)(rows, ids, lengths)


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

  def __init__(self, model, tokenizer, cfg: ObjectiveConfig, placement: EvalPlacement = EvalPlacement()):
    if tokenizer is None:
      raise ValueError(f"{type(self).__name__}: the model came without a tokenizer; put its files in the model "
                       "folder or use a preset such as 'minilm'.")
    self.model, self.tokenizer, self.cfg, self.placement = model, tokenizer, cfg, placement
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = getattr(tokenizer, "eos_token_id", None) if pad is None else pad
    self.pad_id = int(pad or 0)
    self.prefix, self.suffix = special_tokens(tokenizer)
    self.special_ids = set(self.prefix) | set(self.suffix) | {
        int(i) for i in getattr(tokenizer, "all_special_ids", [])}
    model_ = model

    def nll(model_params, batch):
      total, count = self._terms(lambda *args: model_.apply({"params": model_params}, *args),
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

    def run(*args):
      logits, out["mags"] = forward(params, *args, rng=rng)
      return logits

    total, count = self._terms(run, batch, key)
    return total / jnp.maximum(count, 1.0), out["mags"]

  def _terms(self, run, batch, key):
    """``(sum of NLL, number of predicted tokens)`` of a batch; ``run(*model_inputs)`` gives the logits."""
    raise NotImplementedError

  # Evaluation ---------------------------------------------------------------------------------------

  def perplexity(self, params, task_index: int | None, blocks, progress=None) -> float:
    """``exp(NLL / tokens)`` over ``blocks`` with plain ``{"model", ...}`` params (fixed batch shape, a
    multiple of the placement's rows)."""
    del task_index
    total, count, bs = 0.0, 0.0, self.cfg.eval_batch_size
    filled = self.placement.padded(bs)
    for start in range(0, len(blocks), bs):
      chunk = list(blocks[start:start + bs])
      n = len(chunk)
      batch = self._batch(chunk + [chunk[0]] * (filled - n), rows=np.arange(start, start + filled))
      batch["live"][n:] = 0  # the filler rows predict nothing
      t, c = self.placement.get(self._nll(params["model"], self.placement.put(batch)))
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

  def __init__(self, model, tokenizer, cfg, placement=EvalPlacement()):
    mask_id = getattr(tokenizer, "mask_token_id", None)
    if mask_id is None:
      raise ValueError("MaskedLMObjective: the tokenizer has no mask token ([MASK] / <mask>); a masked LM needs "
                       "one (set tokenizer.mask_token).")
    self.mask_id = int(mask_id)
    super().__init__(model, tokenizer, cfg, placement)

  def separator(self):
    return list(self.suffix[-1:])  # [SEP] (BERT) or </s> (RoBERTa) between documents

  def _terms(self, run, batch, key):
    ids = batch["ids"]
    corrupted, chosen = mlm_corrupt(key, ids, batch["maskable"], batch["row"], mask_id=self.mask_id,
                                    vocab_size=self.model.config.vocab_size, probability=self.cfg.mlm_probability)
    return _weighted(token_nll(run(corrupted, batch["mask"]), ids), chosen.astype(jnp.float32) * batch["live"][:, None])


class CausalLMObjective(LanguageModelObjective):
  """Decoder-only LM: predict each next token."""

  name = "causal_lm"

  def separator(self):
    eos = getattr(self.tokenizer, "eos_token_id", None)
    return [] if eos is None else [int(eos)]

  def _terms(self, run, batch, key):
    del key
    logits = run(batch["ids"], batch["mask"])
    weights = batch["mask"][:, 1:].astype(jnp.float32) * batch["live"][:, None]
    return _weighted(token_nll(logits[:, :-1], batch["ids"][:, 1:]), weights)


class SpanCorruptionObjective(LanguageModelObjective):
  """T5: the encoder reads the block with noise spans replaced by sentinels, the decoder predicts the spans
  (:func:`span_corrupt`). Sentinels are the tokenizer's ``<extra_id_0>``, ``<extra_id_1>``, ...; a tokenizer
  without them uses the last ids of the vocabulary, where T5's are."""

  name = "span_corruption"

  def __init__(self, model, tokenizer, cfg, placement=EvalPlacement()):
    super().__init__(model, tokenizer, cfg, placement)
    count = max(1, cfg.max_length // 2)
    lookup = getattr(tokenizer, "convert_tokens_to_ids", None)
    unknown = getattr(tokenizer, "unk_token_id", None)
    found = [lookup(f"<extra_id_{i}>") if lookup else None for i in range(count)]
    if all(t is not None and t != unknown for t in found):
      self.sentinels = np.asarray(found, np.int32)
    else:
      self.sentinels = np.arange(model.config.vocab_size - 1, model.config.vocab_size - 1 - count, -1, dtype=np.int32)
    eos = getattr(tokenizer, "eos_token_id", None)
    self.eos_id = int(model.config.eos_token_id if eos is None else eos)
    self.start_id = int(getattr(model.config, "decoder_start_token_id", 0) or 0)

  def separator(self):
    return [self.eos_id]

  def _terms(self, run, batch, key):
    lengths = batch["mask"].sum(-1) - len(self.suffix)  # the block's text, not its final </s>
    x, x_mask, y, y_mask = span_corrupt(key, batch["ids"], lengths, batch["row"], sentinels=self.sentinels,
                                        eos_id=self.eos_id, pad_id=self.pad_id)
    dec = jnp.concatenate([jnp.full_like(y[:, :1], self.start_id), y[:, :-1]], 1)
    logits = run(x, x_mask, dec, y_mask)
    return _weighted(token_nll(logits, y), y_mask.astype(jnp.float32) * batch["live"][:, None])


def load_language_model(spec: str, dtype=jnp.float32, remat: bool = False):
  """``(model, params, tokenizer)`` for the LM objective: BERT/RoBERTa with the MLM head
  (:func:`migu_jax.models.bert.mlm.from_pretrained`), Llama and T5 as they are; computing in ``dtype``
  (parameters float32), with ``remat`` recomputing each layer in the backward pass."""
  from migu_jax.models import PRESETS, from_pretrained, hub
  from migu_jax.models._checkpoint import read_config
  from migu_jax.models.bert import mlm

  run = dict(dtype=dtype, remat=remat)
  if spec == "minilm":
    return mlm.from_pretrained(spec, **run)[:3]
  if spec in PRESETS or spec.endswith(".gguf"):
    return from_pretrained(spec, **run)
  folder = hub._resolve_folder(spec)
  if read_config(folder).get("model_type") in ("bert", "roberta"):
    return mlm.from_pretrained(folder, **run)[:3]
  return from_pretrained(folder, **run)


def make_objective(model, tokenizer, cfg: ObjectiveConfig,
                   placement: EvalPlacement = EvalPlacement()) -> LanguageModelObjective:
  """The objective of ``model``'s family: masked LM for BERT/RoBERTa, causal LM for Llama, span corruption
  for T5; its perplexity evaluated by ``placement``."""
  from migu_jax.models.bert.mlm import BertForMaskedLM
  from migu_jax.models.llama.modeling import LlamaForCausalLM
  from migu_jax.models.t5.modeling import T5ForConditionalGeneration

  if isinstance(model, BertForMaskedLM):
    return MaskedLMObjective(model, tokenizer, cfg, placement)
  if isinstance(model, LlamaForCausalLM):
    return CausalLMObjective(model, tokenizer, cfg, placement)
  if isinstance(model, T5ForConditionalGeneration):
    return SpanCorruptionObjective(model, tokenizer, cfg, placement)
  raise ValueError(f"No language-model objective for {type(model).__name__}; objective='lm' supports BERT/RoBERTa "
                   "(masked LM), Llama (causal LM) and T5 (span corruption).")


__all__ = ["CausalLMObjective", "LanguageModelObjective", "MaskedLMObjective", "OBJECTIVES", "ObjectiveConfig",
           "SpanCorruptionObjective", "load_language_model", "make_objective", "mlm_corrupt", "span_corrupt",
           "token_nll"]
