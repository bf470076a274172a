"""Greedy decoding for the causal (Llama) and encoder-decoder (T5) models.

One jitted ``lax.fori_loop`` over a fixed-size token buffer. Llama decodes
with a key/value cache (one pass over the prompt, then one token per step);
other causal models and T5's decoder re-run over the whole buffer at each
step (simple, and fast enough for short answers). Finished rows (after
``eos_token_id``) keep emitting ``pad_token_id``.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from migu_jax.models import llama
  >>> cfg = llama.Config.of_size("tiny")
  >>> model, params = llama.LlamaForCausalLM(cfg), llama.params.init_params(cfg)
  >>> out = greedy_generate(model, params, jnp.array([[5, 6, 7]]), max_new_tokens=4)
  >>> out.shape
  (1, 4)
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def _eos_ids(eos_token_id):
  if eos_token_id is None:
    return jnp.zeros((0,), jnp.int32)
  ids = eos_token_id if isinstance(eos_token_id, (tuple, list)) else (eos_token_id,)
  return jnp.asarray(ids, jnp.int32)


def _pick(logits, done, eos, pad):
  nxt = jnp.argmax(logits.astype(jnp.float32), -1).astype(jnp.int32)
  nxt = jnp.where(done, pad, nxt)
  return nxt, done | jnp.isin(nxt, eos)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens"))
def _causal_loop(model, params, input_ids, attention_mask, eos, pad, max_new_tokens):
  """Any causal LM: re-runs the model over the whole buffer at every step."""
  b, t = input_ids.shape
  tokens = jnp.concatenate([input_ids, jnp.full((b, max_new_tokens), pad, input_ids.dtype)], 1)
  mask = jnp.concatenate([attention_mask, jnp.zeros((b, max_new_tokens), attention_mask.dtype)], 1)

  def step(i, state):
    tokens, mask, done = state
    # Positions count real tokens only, so left padding is harmless.
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    logits = model.apply({"params": params}, tokens, mask, positions)
    nxt, done = _pick(logits[:, t + i - 1], done, eos, pad)
    tokens = jax.lax.dynamic_update_slice(tokens, nxt[:, None], (0, t + i))
    mask = jax.lax.dynamic_update_slice(mask, jnp.ones((b, 1), mask.dtype), (0, t + i))
    return tokens, mask, done

  tokens, _, _ = jax.lax.fori_loop(0, max_new_tokens, step,
                                   (tokens, mask, jnp.zeros((b,), bool)))
  return tokens[:, t:]


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens"))
def _cached_loop(model, params, input_ids, attention_mask, eos, pad, max_new_tokens):
  """Llama: one pass over the prompt fills a key/value cache, then one token per step."""
  from migu_jax.models.llama.modeling import init_cache
  b, t = input_ids.shape
  mask = jnp.concatenate([attention_mask, jnp.zeros((b, max_new_tokens), attention_mask.dtype)], 1)
  positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)
  cache = init_cache(model.config, b, t + max_new_tokens)
  logits, cache = model.apply({"params": params}, input_ids, mask, positions, cache, 0)
  nxt, done = _pick(logits[:, -1], jnp.zeros((b,), bool), eos, pad)
  out = jnp.full((b, max_new_tokens), pad, jnp.int32).at[:, 0].set(nxt)
  next_position = positions[:, -1] + 1

  def step(i, state):
    out, cache, mask, nxt, done = state
    mask = jax.lax.dynamic_update_slice(mask, jnp.ones((b, 1), mask.dtype), (0, t + i))
    logits, cache = model.apply({"params": params}, nxt[:, None].astype(input_ids.dtype), mask,
                                (next_position + i)[:, None], cache, t + i)
    nxt, done = _pick(logits[:, 0], done, eos, pad)
    return out.at[:, i + 1].set(nxt), cache, mask, nxt, done

  out, *_ = jax.lax.fori_loop(0, max_new_tokens - 1, step, (out, cache, mask, nxt, done))
  return out


def greedy_generate(model, params, input_ids, attention_mask=None, *, max_new_tokens: int,
                    eos_token_id=None, pad_token_id=None, use_cache: bool = True):
  """Greedy continuation of (left-padded) prompts with a causal LM.

  Args:
    model: a :class:`migu_jax.models.llama.LlamaForCausalLM`.
    params: its ``params``.
    input_ids: ``[B, T]`` prompts, left-padded when of different lengths.
    attention_mask: ``[B, T]``, 0 on padding (default: all ones).
    max_new_tokens: number of tokens to generate.
    eos_token_id: id (or ids) that end a row; default ``model.config.eos_token_id``.
    pad_token_id: filler after a row ended; default the config's pad or eos id.
    use_cache: decode Llama with a key/value cache (other models, or False:
      re-run the model over the whole sequence at every step).

  Returns:
    ``[B, max_new_tokens]`` generated ids.
  """
  cfg = model.config
  eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
  pad = pad_token_id if pad_token_id is not None else (
      cfg.pad_token_id if cfg.pad_token_id is not None else (_eos_ids(eos).tolist() or [0])[0])
  input_ids = jnp.asarray(input_ids, jnp.int32)
  if attention_mask is None:
    attention_mask = jnp.ones_like(input_ids)
  from migu_jax.models.llama.modeling import LlamaForCausalLM
  loop = _cached_loop if isinstance(model, LlamaForCausalLM) and use_cache else _causal_loop
  return loop(model, params, input_ids, jnp.asarray(attention_mask, jnp.int32),
              _eos_ids(eos), jnp.int32(pad), max_new_tokens)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens"))
def _seq2seq_loop(model, params, input_ids, attention_mask, start, eos, pad, max_new_tokens):
  b = input_ids.shape[0]
  encoded = model.apply({"params": params}, input_ids, attention_mask, method="encode")
  tokens = jnp.full((b, max_new_tokens + 1), pad, jnp.int32).at[:, 0].set(start)

  def step(i, state):
    tokens, done = state
    logits = model.apply({"params": params}, tokens, encoded, attention_mask, method="decode")
    nxt = jnp.argmax(logits[:, i].astype(jnp.float32), -1).astype(jnp.int32)
    nxt = jnp.where(done, pad, nxt)
    done = done | jnp.isin(nxt, eos)
    return jax.lax.dynamic_update_slice(tokens, nxt[:, None], (0, i + 1)), done

  tokens, _ = jax.lax.fori_loop(0, max_new_tokens, step, (tokens, jnp.zeros((b,), bool)))
  return tokens[:, 1:]


def greedy_generate_seq2seq(model, params, input_ids, attention_mask=None, *,
                            max_new_tokens: int, eos_token_id=None, pad_token_id=None,
                            decoder_start_token_id=None):
  """Greedy decoding with an encoder-decoder (T5): encode once, then decode.

  Defaults come from ``model.config`` (T5: start = pad = 0, eos = 1).

  Returns:
    ``[B, max_new_tokens]`` generated ids (without the start token).
  """
  cfg = model.config
  eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
  pad = cfg.pad_token_id if pad_token_id is None else pad_token_id
  start = cfg.decoder_start_token_id if decoder_start_token_id is None else decoder_start_token_id
  input_ids = jnp.asarray(input_ids, jnp.int32)
  if attention_mask is None:
    attention_mask = jnp.ones_like(input_ids)
  return _seq2seq_loop(model, params, input_ids, jnp.asarray(attention_mask, jnp.int32),
                       jnp.int32(start), _eos_ids(eos), jnp.int32(pad), max_new_tokens)


def _token_logp(logits, targets):
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


class OptionTree(NamedTuple):
  """A task's options as a prefix tree, for scoring them all in one pass (numpy arrays).

  Node 0 is the root (the prompt's last token); nodes ``1..N`` are the
  distinct option prefixes, each ending in one token.

  Attributes:
    tokens: ``[N]`` the token of each node ``1..N``.
    depth: ``[N + 1]`` tokens after the root (root 0).
    visible: ``[N + 1, N + 1]`` node ``i`` attends to node ``j``: ``j`` is
      ``i`` or one of its ancestors.
    predictors: ``[M]`` the nodes with children, whose logits are needed.
    at: ``[K, L]`` for option ``k``'s token ``l``: the index into
      ``predictors`` of the node whose logits predict it (its parent).
    targets: ``[K, L]`` the options' tokens (right-padded).
    keep: ``[K, L]`` 1.0 on real tokens.
  """

  tokens: np.ndarray
  depth: np.ndarray
  visible: np.ndarray
  predictors: np.ndarray
  at: np.ndarray
  targets: np.ndarray
  keep: np.ndarray


def option_tree(options) -> OptionTree:
  """The prefix tree of ``options`` (token-id lists): options that share a prefix share its nodes.

  Example:
    >>> t = option_tree([[5, 6], [5, 7], [8]])
    >>> t.tokens.tolist(), t.depth.tolist(), t.predictors.tolist()
    ([5, 6, 7, 8], [0, 1, 2, 2, 1], [0, 1])
    >>> t.at.tolist(), t.keep.tolist()
    ([[0, 1], [0, 1], [0, 0]], [[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
  """
  options = [list(map(int, o)) for o in options]
  if not options or not all(options):
    raise ValueError("option_tree: every option needs at least one token; got an empty option list or option.")
  node_of: dict[tuple, int] = {(): 0}
  parent, tokens = [0], []
  for option in options:
    for l in range(1, len(option) + 1):
      if tuple(option[:l]) not in node_of:
        node_of[tuple(option[:l])] = len(parent)
        parent.append(node_of[tuple(option[:l - 1])])
        tokens.append(option[l - 1])
  n = len(parent)
  depth = np.zeros(n, np.int32)
  visible = np.eye(n, dtype=bool)
  for i in range(1, n):
    depth[i] = depth[parent[i]] + 1
    visible[i] |= visible[parent[i]]
  predictors = np.array(sorted(set(parent[1:])), np.int32)
  slot = {int(node): m for m, node in enumerate(predictors)}
  width = max(map(len, options))
  at, targets = np.zeros((len(options), width), np.int32), np.zeros((len(options), width), np.int32)
  keep = np.zeros((len(options), width), np.float32)
  for k, option in enumerate(options):
    for l, token in enumerate(option):
      at[k, l], targets[k, l], keep[k, l] = slot[node_of[tuple(option[:l])]], token, 1.0
  return OptionTree(np.array(tokens, np.int32), depth, visible, predictors, at, targets, keep)


def option_log_likelihoods(model, params, prompt_ids, prompt_mask, option_ids, option_mask):
  """Total log-likelihood of each option after each prompt; each prompt runs once.

  Llama: one pass over the prompts (all but their last token) fills a
  key/value cache; then one pass over the options' prefix tree
  (:func:`option_tree`: the prompt's last token, then every distinct option
  prefix once, each attending to the prompt and to its own ancestors) gives
  every option token's log-probability. So options that share a prefix share
  its computation, padding adds nothing, and the weights are read once for
  all options, not once per option.

  Args:
    model: a :class:`migu_jax.models.llama.LlamaForCausalLM`.
    params: its ``params``.
    prompt_ids, prompt_mask: ``[B, T]`` prompts, left-padded (``T >= 2``).
    option_ids, option_mask: ``[K, L]`` the options' tokens, right-padded
      (concrete arrays: the tree is built on the host); the same options for
      every prompt.

  Returns:
    ``[B, K]``: ``sum_j log p(option_j | prompt, option_<j)`` over each
    option's real tokens, in float32.
  """
  ids, keep = np.asarray(option_ids), np.asarray(option_mask).astype(bool)
  tree = option_tree([row[m] for row, m in zip(ids, keep)])
  return _tree_log_likelihoods(model, params, prompt_ids, prompt_mask, *map(jnp.asarray, tree))


@functools.partial(jax.jit, static_argnames=("model",))
def _tree_log_likelihoods(model, params, prompt_ids, prompt_mask, tokens, depth, visible, predictors, at, targets,
                          keep):
  from migu_jax.models.llama.modeling import init_cache
  b, t = prompt_ids.shape
  n = depth.shape[0]
  positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0)
  buffer_mask = jnp.concatenate([prompt_mask[:, :-1], jnp.ones((b, n), prompt_mask.dtype)], 1)
  cache = init_cache(model.config, b, t - 1 + n)
  _, cache = model.apply({"params": params}, prompt_ids[:, :-1], buffer_mask, positions[:, :-1], cache, 0,
                         method="hidden_states")
  inputs = jnp.concatenate([prompt_ids[:, -1:], jnp.broadcast_to(tokens[None], (b, n - 1))], 1)
  # Each tree node sees the prompt (not its padding) and its own ancestors.
  sees_prompt = jnp.broadcast_to(prompt_mask[:, None, :-1].astype(bool), (b, n, t - 1))
  mask = jnp.concatenate([sees_prompt, jnp.broadcast_to(visible[None], (b, n, n))], 2)
  hidden, _ = model.apply({"params": params}, inputs, mask, positions[:, -1:] + depth[None], cache, t - 1,
                          method="hidden_states")
  logits = model.apply({"params": params}, hidden[:, predictors], method="logits")
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, M, V]
  picked = logp[:, at, targets]  # [B, K, L]
  return (picked * keep).sum(-1)


@functools.partial(jax.jit, static_argnames=("model",))
def option_log_likelihoods_seq2seq(model, params, input_ids, attention_mask, option_ids, option_mask,
                                   decoder_start_token_id):
  """T5: :func:`option_log_likelihoods` with the encoder run once and the decoder once per option.

  ``input_ids``/``attention_mask``: ``[B, T]`` encoder inputs; ``option_ids``/``option_mask``:
  ``[K, L]`` decoder targets, right-padded. Returns ``[B, K]``.
  """
  b = input_ids.shape[0]
  length = option_ids.shape[1]
  encoded = model.apply({"params": params}, input_ids, attention_mask, method="encode")

  def score(option):
    ids, keep = option
    start = jnp.full((1,), decoder_start_token_id, ids.dtype)
    dec = jnp.broadcast_to(jnp.concatenate([start, ids[:-1]])[None], (b, length))
    logits = model.apply({"params": params}, dec, encoded, attention_mask,
                         jnp.broadcast_to(keep[None], (b, length)).astype(jnp.int32), method="decode")
    return (_token_logp(logits, jnp.broadcast_to(ids, (b, length))) * keep).sum(-1)

  return jax.lax.map(score, (option_ids, option_mask.astype(jnp.float32))).T
