"""How a model answers a benchmark task: batches, loss and evaluation for each model family.

There are no per-task heads and no task id at test time. Every head sees the instruction prompt
(:func:`migu_jax.cl.prompts.build_prompt`) and answers with one of the task's label strings:

* ``encoder`` (BERT / MiniLM): the prompt and every label string are embedded by the same encoder
  (mean pooling over the attention mask); the score of an option is
  ``cos(prompt, label) / temperature`` and the loss is the cross-entropy over the task's options. The
  prediction is the best-scoring option.
* ``causal_lm`` (Llama / SmolLM2): the label text is the continuation of the prompt; the loss covers the
  answer tokens (and end-of-sequence) only.
* ``seq2seq`` (T5): the prompt is the encoder input, the label text the decoder target.

The two language-model heads evaluate either by ``"options"`` (the option with the highest total
log-likelihood) or by ``"generate"`` (greedy decoding, exact match of the decoded text with the label);
results record which (:attr:`Head.eval_mode`).

A head turns examples into padded numpy batches, and provides ``loss(forward, params, batch)`` for
:func:`migu_jax.make_train_step`. ``forward(params, *args, rng=None)`` runs the model and
returns ``(outputs, magnitudes)``; :mod:`migu_jax.cl.methods` builds it (plain fine-tuning or LoRA).
Evaluation takes plain model parameters (LoRA merged) and is separate from training.

Padding: training batches are padded to their longest row, rounded up to a multiple of ``pad_multiple``
(``padding="longest"``, the reference pads to the longest row; the rounding keeps the number of compiled
shapes small), or to the smallest of the fixed ``length_buckets`` (``padding="buckets"``). Evaluation
batches always use the buckets. Padded positions count in MIGU's ``sum |y|`` as in the reference, unless
the run is ``padding_aware``.

Placement (:class:`EvalPlacement`): evaluation runs on one device, or on a mesh with the parameters where
training placed them (sharded under FSDP) and every batch split over the data axis, padded with filler rows
to a multiple of its size (dropped from the results).

Exact match (``eval_mode="generate"``) compares the decoded text and the label after the reference's
normalisation (:func:`normalize_answer`: lower case, no punctuation, single spaces).
"""

from __future__ import annotations

import dataclasses
import math
import string
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from migu_jax.cl.data import Record, Task
from migu_jax.cl.prompts import build_prompt
from migu_jax.models.bert.modeling import mean_pool
from migu_jax.models.generation import (greedy_generate, greedy_generate_seq2seq, option_log_likelihoods,
                                        option_log_likelihoods_seq2seq)
from migu_jax.models.llama.modeling import LlamaForCausalLM

Example = tuple[int, Record]
"""A training or test example: (index of its task in the run's order, the record)."""

_SENTINEL = "\x00"


LENGTH_BUCKETS = (64, 96, 128)
"""The default padded lengths of ``padding="buckets"`` (the runner's :class:`~migu_jax.cl.runner.Config` and
:class:`HeadConfig` share it)."""


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  """What a head needs from the run config.

  Attributes:
    max_length: token budget of an input (prompt, or prompt + answer for causal LMs); the sentence is
      truncated first so the instruction, options and ``Answer:`` survive.
    padding: training batches: ``"longest"`` (the longest row rounded up to ``pad_multiple``) or
      ``"buckets"`` (``length_buckets``).
    pad_multiple: the rounding of ``padding="longest"``.
    length_buckets: padded lengths; a batch is padded to the smallest bucket that holds its longest row
      (``max_length`` is always a bucket). Evaluation always pads to buckets.
    copa_prompt: ``"reference"`` or ``"instruction"`` (see :func:`migu_jax.cl.prompts.build_prompt`).
    temperature: encoder head: initial temperature of the cosine scores.
    learn_temperature: encoder head: whether the temperature is trained.
    eval_mode: language-model heads: ``"options"`` or ``"generate"``.
    eval_batch_size: rows per evaluation batch.
    max_new_tokens: greedy decoding length (default: the longest label + 1).
  """

  max_length: int = 128
  padding: str = "longest"
  pad_multiple: int = 8
  length_buckets: tuple[int, ...] = LENGTH_BUCKETS
  copa_prompt: str = "reference"
  temperature: float = 0.05
  learn_temperature: bool = True
  eval_mode: str = "options"
  eval_batch_size: int = 32
  max_new_tokens: int | None = None


PADDINGS = ("longest", "buckets")


def _host(tree):
  return jax.tree.map(np.asarray, tree)


@dataclasses.dataclass(frozen=True)
class EvalPlacement:
  """Where a head's evaluation batches run (the parameters stay where the caller placed them).

  The default is one device: host batches go in as they are, results come back as numpy arrays. On a mesh
  (:func:`migu_jax.cl.runner.eval_placement`) ``rows`` is the data axis' size, ``put`` splits a host batch
  over it (:func:`migu_jax.sharding.shard_rows`) and ``get`` brings results back to every process
  (:func:`migu_jax.train_step.fetch_global`), so the jitted evaluation functions are partitioned by XLA
  like the train step.

  Attributes:
    rows: every evaluation batch has a multiple of this many rows (filler rows, dropped from the results).
    put: host batch (a pytree of arrays with rows first) -> device arrays.
    get: device results -> host numpy values.
  """

  rows: int = 1
  put: Callable[[Any], Any] = lambda tree: tree
  get: Callable[[Any], Any] = _host

  def padded(self, n: int) -> int:
    """``n`` rows rounded up to a multiple of :attr:`rows`.

    Example:
      >>> EvalPlacement(rows=4).padded(6)
      8
    """
    return -(-n // self.rows) * self.rows


def _bucket(n: int, cfg: HeadConfig) -> int:
  for b in sorted(set(cfg.length_buckets) | {cfg.max_length}):
    if n <= b:
      return b
  return cfg.max_length


def _train_length(n: int, cfg: HeadConfig) -> int:
  """Padded length of a training batch whose longest row has ``n`` tokens (see ``HeadConfig.padding``)."""
  if cfg.padding == "buckets":
    return _bucket(n, cfg)
  rounded = -(-n // cfg.pad_multiple) * cfg.pad_multiple
  return max(n, min(rounded, cfg.max_length))


def normalize_answer(text: str) -> str:
  """The reference's exact-match normalisation (SQuAD's, articles kept): lower case, punctuation removed,
  whitespace collapsed.

  Example:
    >>> normalize_answer("  Science or  Technology.")
    'science or technology'
  """
  text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
  return " ".join(text.split())


def _pad(rows: Sequence[Sequence[int]], length: int, pad_id: int, *, left: bool = False):
  ids = np.full((len(rows), length), pad_id, np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for i, r in enumerate(rows):
    r = list(r)[:length]
    if left:
      ids[i, length - len(r):], mask[i, length - len(r):] = r, 1
    else:
      ids[i, :len(r)], mask[i, :len(r)] = r, 1
  return ids, mask


def _tokens(tokenizer, text: str) -> list[int]:
  return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
  """The special tokens the tokenizer puts before and after a text (BERT: [CLS] / [SEP]; T5: - / </s>;
  Llama: <s> / -), read from how it encodes an empty string."""
  empty = list(tokenizer("", add_special_tokens=True)["input_ids"])
  starts = {getattr(tokenizer, a, None) for a in ("cls_token_id", "bos_token_id")} - {None}
  n = 0
  while n < len(empty) and empty[n] in starts:
    n += 1
  return empty[:n], empty[n:]


class PromptCache:
  """Token ids of each task's prompt, the sentence truncated so the prompt fits a budget."""

  def __init__(self, tokenizer, tasks: Sequence[Task], copa: str = "reference"):
    self.tokenizer = tokenizer
    self.parts = []
    for task in tasks:
      prefix, suffix = build_prompt(task, _SENTINEL, copa=copa).split(_SENTINEL)
      self.parts.append((_tokens(tokenizer, prefix), _tokens(tokenizer, suffix)))
    self._cache: dict[tuple[int, str], list[int]] = {}

  def prompt(self, task_index: int, sentence: str, budget: int) -> list[int]:
    """Prefix + sentence (cut to fit ``budget`` tokens) + suffix."""
    key = (task_index, sentence)
    if key not in self._cache:
      self._cache[key] = _tokens(self.tokenizer, sentence)
    prefix, suffix = self.parts[task_index]
    room = budget - len(prefix) - len(suffix)
    if room < 0:  # instruction and options alone overflow: keep the start and "Answer:".
      return prefix[:max(budget - len(suffix), 0)] + suffix
    return prefix + self._cache[key][:room] + suffix


def _pad_id(tokenizer) -> int:
  for attr in ("pad_token_id", "eos_token_id"):
    value = getattr(tokenizer, attr, None)
    if value is not None:
      return int(value)
  return 0


class Head:
  """Base class: the interface the runner uses. See the module docstring."""

  name = "head"
  eval_mode = "options"

  def __init__(self, model, tokenizer, tasks: Sequence[Task], cfg: HeadConfig,
               placement: EvalPlacement = EvalPlacement()):
    if tokenizer is None:
      raise ValueError(f"{type(self).__name__}: the model came without a tokenizer. Put the tokenizer files "
                       "(tokenizer.json / vocab.txt ...) in the model folder, or use a preset such as 'minilm'.")
    if cfg.padding not in PADDINGS or cfg.pad_multiple < 1:
      raise ValueError(f"padding={cfg.padding!r}, pad_multiple={cfg.pad_multiple}: choose padding from "
                       f"{PADDINGS} and pad_multiple >= 1 (config.padding / config.pad_multiple).")
    self.model, self.tokenizer, self.tasks, self.cfg = model, tokenizer, list(tasks), cfg
    self.placement = placement
    self.prompts = PromptCache(tokenizer, tasks, cfg.copa_prompt)
    self.pad_id = _pad_id(tokenizer)
    self.special_prefix, self.special_suffix = special_tokens(tokenizer)
    self.n_special = len(self.special_prefix) + len(self.special_suffix)

  def with_special(self, ids: list[int]) -> list[int]:
    return self.special_prefix + list(ids) + self.special_suffix

  def init(self, key) -> dict:
    """Trainable parameters of the head itself (besides the model's)."""
    del key
    return {}

  def train_batch(self, examples: Sequence[Example]) -> dict[str, np.ndarray]:
    raise NotImplementedError

  def loss(self, forward, params, batch):
    raise NotImplementedError

  def correct(self, params, task_index: int, records: Sequence[Record], progress=None, mode=None) -> int:
    """How many of ``records`` (of task ``task_index``) the model answers correctly, evaluated by ``mode``
    (default :attr:`eval_mode`; language-model heads also take the other of ``"options"``/``"generate"``)."""
    raise NotImplementedError

  def predict(self, params, task_index: int, records: Sequence[Record], progress=None) -> np.ndarray:
    """The index (in the task's labels) of the option the model chooses for each record (option scoring)."""
    raise NotImplementedError


# --------------------------------------------------------------------------------------------------
# Encoder: cosine similarity between the prompt and each option's embedding
# --------------------------------------------------------------------------------------------------


def _normalize(x):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


ENCODER_SAFE_RATE = 1e-4
"""The highest learning rate at which a constant-rate AdamW run of the encoder head was seen to learn."""


def rate_warning(head: Head, schedule: str, learning_rate: float) -> str | None:
  """A warning when the encoder head trains at a constant rate above :data:`ENCODER_SAFE_RATE`, else None.

  Measured (all-MiniLM-L6-v2, SST-2 then IMDB, 128 records per label, batch 16): at a constant 3e-4 the
  encoder collapses within the first task (every prompt embeds alike, the loss sits at ln 2, accuracy at
  chance), with the temperature learned or fixed alike; the fresh AdamW state's first updates move every
  weight by about the learning rate at once. The same run with 8 warm-up steps
  (``schedule="warmup_constant"``) learns (81% on SST-2), as do constant rates of 1e-4 and 3e-5.
  """
  if head.name != "encoder" or schedule != "constant" or learning_rate <= ENCODER_SAFE_RATE:
    return None
  return (f"The encoder head at a constant learning rate of {learning_rate:g} (above {ENCODER_SAFE_RATE:g}) "
          "can collapse: all-MiniLM-L6-v2 did at 3e-4 (loss ln(#options), chance accuracy). Use "
          "schedule='warmup_constant' with warmup_steps >= 8, or a rate <= 1e-4 (or tune_rates to choose one "
          "on a dev split).")


class EncoderOptionHead(Head):
  """Scores each option by ``cos(embed(prompt), embed(label)) / temperature``.

  The label strings of every task of the run form one table (distinct strings, fixed shape), embedded
  in every step; an example's candidates are its own task's labels (``candidates``), so one compiled
  step serves every task, replayed examples included. MIGU's magnitudes are those of the prompt pass
  (the task's inputs); the shared label table would add the same strings' activations to every task.
  """

  name = "encoder"
  eval_mode = "options"

  def __init__(self, model, tokenizer, tasks, cfg, placement=EvalPlacement()):
    super().__init__(model, tokenizer, tasks, cfg, placement)
    self.labels = list(dict.fromkeys(label for t in tasks for label in t.labels))
    index = {label: i for i, label in enumerate(self.labels)}
    self.options = [np.array([index[label] for label in t.labels]) for t in tasks]
    label_rows = [self.with_special(_tokens(tokenizer, s)[:cfg.max_length - self.n_special]) for s in self.labels]
    # Label strings are short: their table is padded to its own longest row, not to a prompt bucket.
    self.label_ids, self.label_mask = _pad(label_rows, max(map(len, label_rows)), self.pad_id)
    self._index = index
    model_ = model

    def embed(model_params, ids, mask):
      hidden = model_.apply({"params": model_params}, ids, mask)
      return _normalize(mean_pool(hidden, mask))

    self._embed = jax.jit(embed)

  def init(self, key):
    del key
    return {"log_scale": jnp.asarray(math.log(1.0 / self.cfg.temperature), jnp.float32)}

  def _prompt_rows(self, examples):
    budget = self.cfg.max_length - self.n_special
    return [self.with_special(self.prompts.prompt(t, r.sentence, budget)) for t, r in examples]

  def _candidates(self, examples):
    cand = np.zeros((len(examples), len(self.labels)), bool)
    for i, (t, _) in enumerate(examples):
      cand[i, self.options[t]] = True
    return cand

  def train_batch(self, examples):
    rows = self._prompt_rows(examples)
    ids, mask = _pad(rows, _train_length(max(map(len, rows)), self.cfg), self.pad_id)
    target = np.array([self._index[r.label] for _, r in examples], np.int32)
    return {"ids": ids, "mask": mask, "candidates": self._candidates(examples), "target": target}

  def _scale(self, head_params):
    log_scale = head_params["log_scale"]
    return jnp.exp(log_scale if self.cfg.learn_temperature else jax.lax.stop_gradient(log_scale))

  def loss(self, forward, params, batch, rng=None):
    hidden, mags = forward(params, batch["ids"], batch["mask"], rng=rng)
    prompts = _normalize(mean_pool(hidden, batch["mask"]))
    # The label table is a constant of the head (not a batch row: micro-batches and devices split rows).
    label_rng = None if rng is None else jax.random.fold_in(rng, 1)  # other dropout units than the prompts'
    label_hidden, _ = forward(params, self.label_ids, self.label_mask, rng=label_rng)
    labels = _normalize(mean_pool(label_hidden, self.label_mask))
    logits = self._scale(params["head"]) * prompts @ labels.T
    logits = jnp.where(batch["candidates"], logits, -1e9)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["target"]).mean(), mags

  def correct(self, params, task_index, records, progress=None, mode=None):
    if mode not in (None, "options"):
      raise ValueError(f"The encoder head evaluates by 'options' only, not {mode!r} (config.also_eval).")
    labels = self.tasks[task_index].labels
    pred = self.predict(params, task_index, records, progress)
    return int(sum(labels[p] == r.label for p, r in zip(pred, records)))

  def predict(self, params, task_index, records, progress=None):
    put, get = self.placement.put, self.placement.get
    labels = self._embed(params["model"], *put((self.label_ids, self.label_mask)))
    options = self.options[task_index]
    examples = [(task_index, r) for r in records]
    rows = self._prompt_rows(examples)
    order = np.argsort([len(r) for r in rows], kind="stable")  # similar lengths share a bucket
    pred = np.zeros(len(records), np.int64)
    bs, filled = self.cfg.eval_batch_size, self.placement.padded(self.cfg.eval_batch_size)
    for start in range(0, len(rows), bs):
      chunk = order[start:start + bs]
      batch_rows = [rows[i] for i in chunk] + [rows[chunk[0]]] * (filled - len(chunk))  # fixed batch shape
      ids, mask = _pad(batch_rows, _bucket(max(map(len, batch_rows)), self.cfg), self.pad_id)
      emb = self._embed(params["model"], *put((ids, mask)))
      scores = get(emb @ labels[options].T)[:len(chunk)]
      pred[chunk] = np.argmax(scores, axis=1)
      if progress is not None:
        progress(len(chunk))
    return pred


# --------------------------------------------------------------------------------------------------
# Language models: the label text is the target
# --------------------------------------------------------------------------------------------------


class _LanguageModelHead(Head):
  """Shared parts of the causal-LM and seq2seq heads: answers, option scoring and greedy decoding."""

  def __init__(self, model, tokenizer, tasks, cfg, placement=EvalPlacement()):
    super().__init__(model, tokenizer, tasks, cfg, placement)
    if cfg.eval_mode not in self.EVAL_MODES:
      raise ValueError(f"eval_mode={cfg.eval_mode!r} is not one of {sorted(self.EVAL_MODES)} "
                       f"({type(self).__name__}); set --eval-mode / config.eval_mode.")
    self.eval_mode = cfg.eval_mode
    eos = getattr(tokenizer, "eos_token_id", None)
    self.eos_id = None if eos is None else int(eos)
    self._answers: dict[str, list[int]] = {}

  EVAL_MODES = ("options", "generate")

  def answer(self, label: str) -> list[int]:
    """The target tokens of a label: its text (after a space) and end-of-sequence."""
    if label not in self._answers:
      eos = [] if self.eos_id is None else [self.eos_id]
      self._answers[label] = self._label_tokens(label) + eos
    return self._answers[label]

  def _label_tokens(self, label):
    return _tokens(self.tokenizer, " " + label)

  def _max_answer(self, task_index=None):
    tasks = self.tasks if task_index is None else [self.tasks[task_index]]
    return max(len(self.answer(label)) for t in tasks for label in t.labels)

  def correct(self, params, task_index, records, progress=None, mode=None):
    mode = mode or self.eval_mode
    if mode not in self.EVAL_MODES:
      raise ValueError(f"eval mode {mode!r} is not one of {sorted(self.EVAL_MODES)} ({type(self).__name__}).")
    correct = {"options": self._correct_by_options, "generate": self._correct_by_generation}[mode]
    return correct(params, task_index, records, progress)

  def _correct_by_options(self, params, task_index, records, progress):
    """Option scoring: the option whose tokens (without end-of-sequence) have the highest total log-likelihood.

    Each prompt runs once and all of the task's options are scored from it (:meth:`_option_scores`).
    """
    labels = self.tasks[task_index].labels
    pred = self.predict(params, task_index, records, progress)
    return int(sum(labels[p] == r.label for p, r in zip(pred, records)))

  def predict(self, params, task_index, records, progress=None):
    labels = self.tasks[task_index].labels
    scores = np.zeros((len(records), len(labels)))
    order = np.argsort([len(r.sentence) for r in records], kind="stable")  # similar lengths share a bucket
    bs, filled = self.cfg.eval_batch_size, self.placement.padded(self.cfg.eval_batch_size)
    for start in range(0, len(records), bs):
      idx = order[start:start + bs]
      chunk = [records[i] for i in idx] + [records[idx[0]]] * (filled - len(idx))  # fixed batch shape
      scores[idx] = self._option_scores(params["model"], task_index, chunk)[:len(idx)]
      if progress is not None:
        progress(len(idx))
    return np.argmax(scores, axis=1)

  def _option_scores(self, model_params, task_index, records):
    """``[len(records), n_options]`` total log-likelihoods (numpy); subclasses score from one prompt pass."""
    return self._pairwise_option_scores(model_params, task_index, records)

  def _pairwise_option_scores(self, model_params, task_index, records):
    """The same scores with one full forward pass per (record, option) pair (models without a cache)."""
    labels = self.tasks[task_index].labels
    pairs = [(i, k) for i in range(len(records)) for k in range(len(labels))]
    scores = np.zeros((len(records), len(labels)))
    bs, filled = self.cfg.eval_batch_size, self.placement.padded(self.cfg.eval_batch_size)
    for start in range(0, len(pairs), bs):
      n = min(bs, len(pairs) - start)
      chunk = pairs[start:start + n] + [pairs[start]] * (filled - n)  # fixed batch shape
      batch = self._scoring_batch(task_index, [(records[i], labels[k]) for i, k in chunk])
      logp = self.placement.get(self._score(model_params, self.placement.put(batch)))
      for (i, k), s in zip(chunk[:n], logp[:n]):
        scores[i, k] = s
    return scores

  def _option_rows(self, task_index):
    """The task's options as ``[K, L]`` right-padded token ids and mask, and ``L``."""
    options = [self._label_tokens(label) for label in self.tasks[task_index].labels]
    longest = max(map(len, options))
    return _pad(options, longest, self.pad_id), longest

  def _correct_by_generation(self, params, task_index, records, progress):
    """Greedy decoding; exact match of the decoded text with the label (:func:`normalize_answer`)."""
    n_new = self.cfg.max_new_tokens or self._max_answer(task_index)
    bs, filled = self.cfg.eval_batch_size, self.placement.padded(self.cfg.eval_batch_size)
    n_correct = 0
    for start in range(0, len(records), bs):
      chunk = list(records[start:start + bs])
      n = len(chunk)
      chunk = chunk + [chunk[0]] * (filled - n)
      tokens = self.placement.get(self._generate(params["model"], task_index, chunk, n_new))
      for r, row in zip(chunk[:n], tokens[:n]):
        row = list(row)
        if self.eos_id is not None and self.eos_id in row:
          row = row[:row.index(self.eos_id)]
        text = self.tokenizer.decode(row, skip_special_tokens=True)
        n_correct += int(normalize_answer(text) == normalize_answer(r.label))
      if progress is not None:
        progress(n)
    return n_correct


def _token_logp(logits, targets):
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


class CausalLMHead(_LanguageModelHead):
  """Decoder-only LM: ``prompt + " " + label + eos``, loss on the answer tokens only (right-padded)."""

  name = "causal_lm"

  def __init__(self, model, tokenizer, tasks, cfg, placement=EvalPlacement()):
    super().__init__(model, tokenizer, tasks, cfg, placement)
    model_ = model

    def score(model_params, batch):
      logits = model_.apply({"params": model_params}, batch["ids"], batch["mask"])
      lp = _token_logp(logits[:, :-1], batch["ids"][:, 1:])
      return (lp * batch["loss_mask"][:, 1:]).sum(-1)

    def generate(model_params, ids, mask, n_new):
      return greedy_generate(model_, model_params, ids, mask, max_new_tokens=n_new,
                             eos_token_id=self.eos_id, pad_token_id=self.pad_id)

    self._score = jax.jit(score)
    self._generate_fn = generate

  def _rows(self, pairs, task_index=None, *, with_eos=True):
    """(ids, loss_mask) rows for (task, record, answer tokens) triples."""
    rows, masks = [], []
    for t, sentence, answer in pairs:
      budget = self.cfg.max_length - len(answer) - self.n_special
      prompt = self.with_special(self.prompts.prompt(t, sentence, budget))
      rows.append(prompt + answer)
      masks.append([0] * len(prompt) + [1] * len(answer))
    return rows, masks

  def _batch(self, rows, masks, length_fn=_bucket):
    length = length_fn(max(map(len, rows)), self.cfg)
    ids, mask = _pad(rows, length, self.pad_id)
    loss_mask, _ = _pad(masks, length, 0)
    return {"ids": ids, "mask": mask, "loss_mask": loss_mask}

  def train_batch(self, examples):
    rows, masks = self._rows([(t, r.sentence, self.answer(r.label)) for t, r in examples])
    return self._batch(rows, masks, _train_length)

  def loss(self, forward, params, batch, rng=None):
    logits, mags = forward(params, batch["ids"], batch["mask"], rng=rng)
    lp = _token_logp(logits[:, :-1], batch["ids"][:, 1:])
    weights = batch["loss_mask"][:, 1:].astype(jnp.float32)
    return -(lp * weights).sum() / jnp.maximum(weights.sum(), 1.0), mags

  def _scoring_batch(self, task_index, pairs):
    rows, masks = self._rows([(task_index, r.sentence, self._label_tokens(label)) for r, label in pairs])
    return self._batch(rows, masks)

  def _option_scores(self, model_params, task_index, records):
    """Llama: one pass per prompt fills a key/value cache, each option is scored from it.

    Every option sees the same prompt, truncated so that the longest option fits ``max_length``.
    """
    if not isinstance(self.model, LlamaForCausalLM):
      return self._pairwise_option_scores(model_params, task_index, records)
    (option_ids, option_mask), longest = self._option_rows(task_index)
    budget = self.cfg.max_length - longest - self.n_special
    rows = [self.with_special(self.prompts.prompt(task_index, r.sentence, budget)) for r in records]
    ids, mask = _pad(rows, _bucket(max(map(len, rows)), self.cfg), self.pad_id, left=True)
    ids, mask = self.placement.put((ids, mask))
    return self.placement.get(option_log_likelihoods(self.model, model_params, ids, mask, option_ids, option_mask))

  def _generate(self, model_params, task_index, records, n_new):
    budget = self.cfg.max_length - self.n_special
    rows = [self.with_special(self.prompts.prompt(task_index, r.sentence, budget)) for r in records]
    ids, mask = _pad(rows, _bucket(max(map(len, rows)), self.cfg), self.pad_id, left=True)
    return self._generate_fn(model_params, *self.placement.put((ids, mask)), n_new)


class Seq2SeqHead(_LanguageModelHead):
  """Encoder-decoder (T5): the prompt is the encoder input, ``label + eos`` the decoder target."""

  name = "seq2seq"

  def __init__(self, model, tokenizer, tasks, cfg, placement=EvalPlacement()):
    super().__init__(model, tokenizer, tasks, cfg, placement)
    model_ = model
    self.start_id = int(getattr(model.config, "decoder_start_token_id", 0) or 0)

    def score(model_params, batch):
      logits = model_.apply({"params": model_params}, batch["ids"], batch["mask"], batch["dec_ids"],
                            batch["dec_mask"])
      return (_token_logp(logits, batch["targets"]) * batch["loss_mask"]).sum(-1)

    def generate(model_params, ids, mask, n_new):
      return greedy_generate_seq2seq(model_, model_params, ids, mask, max_new_tokens=n_new,
                                     eos_token_id=self.eos_id, pad_token_id=self.pad_id,
                                     decoder_start_token_id=self.start_id)

    self._score = jax.jit(score)
    self._generate_fn = generate

  def _label_tokens(self, label):
    return _tokens(self.tokenizer, label)

  def _encoder_ids(self, task_index, sentence):
    budget = self.cfg.max_length - self.n_special
    return self.with_special(self.prompts.prompt(task_index, sentence, budget))

  def _batch(self, pairs, length_fn=_bucket):
    rows = [self._encoder_ids(t, s) for t, s, _ in pairs]
    ids, mask = _pad(rows, length_fn(max(map(len, rows)), self.cfg), self.pad_id)
    answers = [a for _, _, a in pairs]
    length = length_fn(max(map(len, answers)), self.cfg)
    targets, loss_mask = _pad(answers, length, self.pad_id)
    dec = [[self.start_id] + a[:-1] for a in answers]
    dec_ids, dec_mask = _pad(dec, length, self.pad_id)
    return {"ids": ids, "mask": mask, "dec_ids": dec_ids, "dec_mask": dec_mask, "targets": targets,
            "loss_mask": loss_mask}

  def train_batch(self, examples):
    return self._batch([(t, r.sentence, self.answer(r.label)) for t, r in examples], _train_length)

  def loss(self, forward, params, batch, rng=None):
    logits, mags = forward(params, batch["ids"], batch["mask"], batch["dec_ids"], batch["dec_mask"], rng=rng)
    weights = batch["loss_mask"].astype(jnp.float32)
    lp = _token_logp(logits, batch["targets"])
    return -(lp * weights).sum() / jnp.maximum(weights.sum(), 1.0), mags

  def _scoring_batch(self, task_index, pairs):
    return self._batch([(task_index, r.sentence, self._label_tokens(label)) for r, label in pairs])

  def _option_scores(self, model_params, task_index, records):
    """T5: the encoder runs once per prompt, the decoder once per option."""
    (option_ids, option_mask), _ = self._option_rows(task_index)
    rows = [self._encoder_ids(task_index, r.sentence) for r in records]
    ids, mask = self.placement.put(_pad(rows, _bucket(max(map(len, rows)), self.cfg), self.pad_id))
    return self.placement.get(option_log_likelihoods_seq2seq(self.model, model_params, ids, mask, option_ids,
                                                             option_mask, self.start_id))

  def _generate(self, model_params, task_index, records, n_new):
    rows = [self._encoder_ids(task_index, r.sentence) for r in records]
    ids, mask = _pad(rows, _bucket(max(map(len, rows)), self.cfg), self.pad_id)
    return self._generate_fn(model_params, *self.placement.put((ids, mask)), n_new)


HEADS: dict[str, type[Head]] = {
    "encoder": EncoderOptionHead,
    "causal_lm": CausalLMHead,
    "seq2seq": Seq2SeqHead,
}
"""Head name -> class."""

DEFAULT_HEADS: dict[str, str] = {"bert": "encoder", "roberta": "encoder", "llama": "causal_lm", "t5": "seq2seq"}
"""A model's ``config.model_type`` -> the head used unless the config names one."""


def make_head(name: str | None, model, tokenizer, tasks: Sequence[Task], cfg: HeadConfig,
              placement: EvalPlacement = EvalPlacement()) -> Head:
  """The head ``name`` (default: by the model's family) for ``tasks``, evaluating by ``placement``.

  Raises:
    ValueError: an unknown head name or model family; the message lists the known ones.
  """
  if name is None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_HEADS:
      raise ValueError(f"No default head for model_type {model_type!r}; known: {sorted(DEFAULT_HEADS)}. "
                       f"Set config.head to one of {sorted(HEADS)}.")
    name = DEFAULT_HEADS[model_type]
  if name not in HEADS:
    raise ValueError(f"Unknown head {name!r}; choose one of {sorted(HEADS)} (config.head / --head).")
  return HEADS[name](model, tokenizer, tasks, cfg, placement)
