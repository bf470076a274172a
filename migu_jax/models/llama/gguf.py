"""Llama weights, config and tokenizer from a llama.cpp GGUF file.

Read with the ``gguf`` package (``GGUFReader``; ``gguf.quants.dequantize``
turns quantized blocks into float32). Three things differ from a Hugging Face
checkpoint and are undone here, so the result is a plain HF-layout state dict
that :mod:`migu_jax.models.llama.params` maps as usual:

* tensor names (``blk.0.attn_q.weight`` -> ``model.layers.0.self_attn.q_proj.weight``);
* llama.cpp's converter permutes the rows of Q and K for interleaved RoPE;
  :func:`unpermute_qk` restores HF's rotate-half order;
* the config lives in ``llama.*`` metadata and the tokenizer in
  ``tokenizer.ggml.*`` (rebuilt as a byte-level BPE ``tokenizers`` object).

GGUFReader's numpy arrays already have ggml's dimensions reversed
(``ne = [in, out]`` -> array ``[out, in]``), which is HF's Linear layout.

Example (``from_gguf(path)`` returns ``(model, params, tokenizer)``; here the config and the tokenizer
alone, which read no weights):
  >>> from gguf import GGUFReader
  >>> from migu_jax.models.presets import smollm2_gguf_path
  >>> reader = GGUFReader(smollm2_gguf_path())
  >>> hf_config(reader)["num_key_value_heads"], tokenizer(reader).eos_token
  (3, '<|im_end|>')
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from migu_jax.models._checkpoint import CheckpointError
from migu_jax.models.llama import modeling, params as llama_params

# GGUF tensor name -> HF name ({i}: layer number).
_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
_NAME_RES = [(re.compile(re.escape(g).replace(r"\{i\}", r"(\d+)") + r"\Z"), h)
             for g, h in _NAMES.items()]

# Types we dequantize: float, legacy block quants and k-quants.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def unpermute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's Q/K row permutation (interleaved -> rotate-half RoPE).

  llama.cpp's converter reshapes rows as ``[heads, 2, head_dim/2]`` and swaps
  the last two axes; this swaps them back.
  """
  out_dim = weight.shape[0]
  head_dim = out_dim // n_heads
  return (weight.reshape(n_heads, head_dim // 2, 2, *weight.shape[1:])
          .swapaxes(1, 2).reshape(weight.shape))


def _field(reader, key: str, default: Any = None):
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def hf_config(reader) -> dict:
  """A Hugging Face Llama ``config.json`` dict from GGUF ``llama.*`` metadata."""
  arch = _field(reader, "general.architecture")
  if arch != "llama":
    raise ValueError(f"GGUF general.architecture is {arch!r}; only 'llama' GGUF files load.")
  g = lambda k, d=None: _field(reader, f"llama.{k}", d)
  heads = int(g("attention.head_count"))
  hidden = int(g("embedding_length"))
  tokens = _field(reader, "tokenizer.ggml.tokens")
  names = {t.name for t in reader.tensors}
  head_dim = int(g("attention.key_length", hidden // heads))
  if int(g("rope.dimension_count", head_dim)) != head_dim or "rope_freqs.weight" in names:
    raise NotImplementedError("GGUF uses partial or scaled RoPE (llama.rope.dimension_count "
                              "!= head_dim, or rope_freqs); only plain RoPE Llama files load.")
  return {
      "model_type": "llama",
      "vocab_size": int(g("vocab_size") or len(tokens)),
      "hidden_size": hidden,
      "intermediate_size": int(g("feed_forward_length")),
      "num_hidden_layers": int(g("block_count")),
      "num_attention_heads": heads,
      "num_key_value_heads": int(g("attention.head_count_kv", heads)),
      "head_dim": head_dim,
      "max_position_embeddings": int(g("context_length", 2048)),
      "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-5)),
      "rope_theta": float(g("rope.freq_base", 10000.0)),
      "tie_word_embeddings": "output.weight" not in names,
      "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
      "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
      "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
  }


def state_dict(reader, config: dict, source: str = "GGUF") -> dict[str, np.ndarray]:
  """Dequantized float32 tensors under HF names, Q/K rows back in HF order."""
  from gguf import quants
  out, unsupported, unknown = {}, [], []
  for tensor in reader.tensors:
    kind = tensor.tensor_type.name
    if kind not in SUPPORTED_TYPES:
      unsupported.append(f"{tensor.name} ({kind})")
      continue
    for regex, hf in _NAME_RES:
      m = regex.match(tensor.name)
      if m:
        name = hf.replace("{i}", m.group(1)) if m.groups() else hf
        break
    else:
      unknown.append(tensor.name)
      continue
    value = np.asarray(quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
    if name.endswith("q_proj.weight"):
      value = unpermute_qk(value, config["num_attention_heads"])
    elif name.endswith("k_proj.weight"):
      value = unpermute_qk(value, config["num_key_value_heads"])
    out[name] = value
  if unsupported:
    raise NotImplementedError(
        f"{source}: unsupported GGUF tensor type for {', '.join(unsupported)}; "
        f"supported: {', '.join(SUPPORTED_TYPES)}. Re-quantize the model with "
        "llama.cpp to one of these (e.g. Q8_0).")
  if unknown:
    raise CheckpointError(f"{source}: GGUF tensors with no Llama meaning: {', '.join(unknown)}.")
  return out


def tokenizer(reader):
  """Rebuilds the GGUF's byte-level BPE tokenizer as a transformers tokenizer.

  Uses ``tokenizer.ggml.tokens``/``merges``/``token_type`` and the special
  ids; SmolLM's pre-tokenizer (llama.cpp "smollm": single digits, then GPT-2
  byte-level splitting). The chat template is attached when present.
  """
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  kind = _field(reader, "tokenizer.ggml.model")
  if kind != "gpt2":
    raise NotImplementedError(f"GGUF tokenizer.ggml.model={kind!r}: only byte-level BPE "
                              "('gpt2') tokenizers are rebuilt.")
  tokens = list(_field(reader, "tokenizer.ggml.tokens"))
  types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
  merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
  tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                             fuse_unk=False, byte_fallback=False))
  digits = [pre_tokenizers.Digits(individual_digits=True)] \
      if _field(reader, "tokenizer.ggml.pre") in ("smollm", "starcoder", "refact") else []
  tok.pre_tokenizer = pre_tokenizers.Sequence(
      digits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  tok.decoder = decoders.ByteLevel()
  # token_type 3 = control, 4 = user-defined: never split, skipped when decoding controls.
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                          for t, ty in zip(tokens, types) if ty == 3])
  tok.add_tokens([AddedToken(t, special=False, normalized=False)
                  for t, ty in zip(tokens, types) if ty == 4])
  special = {}
  for role in ("bos", "eos", "unknown", "padding"):
    idx = _field(reader, f"tokenizer.ggml.{role}_token_id")
    if idx is not None:
      name = {"unknown": "unk", "padding": "pad"}.get(role, role)
      special[f"{name}_token"] = tokens[int(idx)]
  wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, **special)
  template = _field(reader, "tokenizer.chat_template")
  if template:
    wrapped.chat_template = template
  return wrapped


def from_gguf(path: str, *, dtype: Any = jnp.float32, **config_overrides):
  """Loads ``(LlamaForCausalLM, params, tokenizer)`` from a Llama GGUF file.

  Args:
    path: the ``.gguf`` file.
    dtype: compute dtype (params are float32, dequantized).
    **config_overrides: fields of :class:`modeling.Config` (e.g. ``remat=True``).
  """
  from gguf import GGUFReader
  if not os.path.isfile(path):
    raise FileNotFoundError(f"GGUF file {path!r} does not exist.")
  reader = GGUFReader(path)
  hf = hf_config(reader)
  cfg = modeling.Config.from_hf(hf, dtype=dtype, **config_overrides)
  tensors = state_dict(reader, hf, source=path)
  params = llama_params.from_hf(tensors, cfg, source=path)
  return (modeling.LlamaForCausalLM(cfg), jax.tree.map(jnp.asarray, params),
          tokenizer(reader))
