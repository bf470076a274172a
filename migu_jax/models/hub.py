"""Hugging Face folders in and out: ``from_pretrained`` and ``save_pretrained``.

A folder is what ``transformers``' ``save_pretrained`` writes: ``config.json``,
``*.safetensors`` (sharded with ``model.safetensors.index.json`` or not) and
tokenizer files. Weights are read with safetensors' numpy API; torch is not
needed. ``config.json``'s ``model_type`` picks the family:

* ``bert``    -> :class:`migu_jax.models.bert.BertModel` (saved as ``BertModel``)
* ``roberta`` -> :class:`migu_jax.models.bert.BertModel` (saved as ``RobertaModel``)
* ``llama``   -> :class:`migu_jax.models.llama.LlamaForCausalLM`
* ``t5``      -> :class:`migu_jax.models.t5.T5ForConditionalGeneration`

Example:
  >>> import jax.numpy as jnp, tempfile
  >>> from migu_jax.models import bert
  >>> cfg = bert.Config.of_size("tiny")
  >>> params = bert.params.init_params(cfg)
  >>> folder = tempfile.mkdtemp()
  >>> save_pretrained(bert.BertModel(cfg), params, folder)
  >>> model, loaded, tokenizer = from_pretrained(folder)
  >>> model.config.hidden_size, tokenizer is None
  (32, True)
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from migu_jax.models import presets
from migu_jax.models._checkpoint import read_config, read_safetensors
from migu_jax.models.llama.gguf import from_gguf

# model_type -> (family package, model class name)
FAMILIES: dict[str, tuple[str, str]] = {
    "bert": ("migu_jax.models.bert", "BertModel"),
    "roberta": ("migu_jax.models.bert", "BertModel"),
    "llama": ("migu_jax.models.llama", "LlamaForCausalLM"),
    "t5": ("migu_jax.models.t5", "T5ForConditionalGeneration"),
}

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                    "spiece.model", "tokenizer.model", "vocab.json")


def family(model_type: str):
  """The family package (``Config``, model class, ``params``) for a model_type."""
  if model_type not in FAMILIES:
    raise ValueError(
        f"model_type {model_type!r} is not supported by migu_jax.models; supported: "
        f"{sorted(FAMILIES)}. Add a family folder under migu_jax/models/ and an "
        "entry in migu_jax.models.hub.FAMILIES.")
  package, model_name = FAMILIES[model_type]
  module = importlib.import_module(package)
  return module, getattr(module, model_name)


def param_axes(model_type: str):
  """The sharding rules of a family (``PARAM_AXES`` next to its modeling; see :mod:`migu_jax.sharding`).

  Example:
    >>> param_axes("llama")[0]
    ('(^|/)embed/embedding$', ('vocab', 'embed'))
  """
  return family(model_type)[0].PARAM_AXES


def _resolve_folder(path_or_id: str) -> str:
  if os.path.isdir(path_or_id):
    return path_or_id
  if os.path.exists(path_or_id) or path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") != 1:
    raise FileNotFoundError(
        f"{path_or_id!r} is not a model folder, a Hugging Face hub id ('owner/name') "
        "or a preset (see migu_jax.models.PRESETS).")
  from huggingface_hub import snapshot_download
  try:
    return snapshot_download(path_or_id, allow_patterns=[
        "*.json", "*.safetensors", "*.txt", "*.model"])
  except Exception as e:  # noqa: BLE001 - re-raised with the fix named.
    raise OSError(f"could not download {path_or_id!r} from the Hugging Face hub ({e}). "
                  "Without a network, pass a local folder or a preset name.") from e


def load_tokenizer(folder: str):
  """``transformers.AutoTokenizer`` from ``folder``, or None if it has no tokenizer files."""
  if not any(os.path.exists(os.path.join(folder, n)) for n in _TOKENIZER_FILES):
    return None
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(folder)


def from_pretrained(path_or_id: str, *, dtype: Any = jnp.float32, **config_overrides):
  """Loads ``(model, params, tokenizer)`` from a HF folder, hub id or preset.

  Args:
    path_or_id: a local Hugging Face model folder; a hub id such as
      "HuggingFaceTB/SmolLM2-135M" (downloaded when a network exists); or a
      preset: "minilm" (all-MiniLM-L6-v2) or "smollm2-135m" (from its GGUF);
      or a Llama ``.gguf`` file.
    dtype: compute dtype (params are always float32).
    **config_overrides: fields of the family's ``Config`` (e.g. ``remat=True``,
      ``add_pooler=True`` for BERT).

  Returns:
    ``(model, params, tokenizer)``: a linen module, its ``params`` (nested
    dict of float32 ``jax.Array``) and a transformers tokenizer (or None).

  Raises:
    FileNotFoundError: no folder, no config.json or no safetensors weights.
    ValueError: unsupported model_type.
    CheckpointError: weights that do not fit the config (all listed at once).
  """
  if path_or_id in presets.PRESETS:
    path_or_id = presets.PRESETS[path_or_id]()
  if path_or_id.endswith(".gguf") and os.path.isfile(path_or_id):
    return from_gguf(path_or_id, dtype=dtype, **config_overrides)
  folder = _resolve_folder(path_or_id)
  hf_config = read_config(folder)
  if "model_type" not in hf_config:
    raise ValueError(f"{folder}/config.json has no 'model_type'; supported: {sorted(FAMILIES)}.")
  fam, model_cls = family(hf_config["model_type"])
  cfg = fam.Config.from_hf(hf_config, dtype=dtype, **config_overrides)
  params = fam.params.from_hf(read_safetensors(folder), cfg, source=folder)
  params = jax.tree.map(jnp.asarray, params)
  return model_cls(cfg), params, load_tokenizer(folder)


def save_pretrained(model, params, folder: str, tokenizer=None) -> None:
  """Writes ``model``/``params`` as a Hugging Face folder that transformers loads.

  Writes ``config.json`` (with ``architectures`` and ``model_type``),
  ``model.safetensors`` (HF key names and layouts, float32) and, if given, the
  tokenizer's files.
  """
  cfg = model.config
  fam, _ = family(cfg.model_type)
  os.makedirs(folder, exist_ok=True)
  hf_config = {**cfg.to_hf(), "model_type": cfg.model_type, "torch_dtype": "float32"}
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)
  host = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), params)
  from safetensors.numpy import save_file
  save_file(fam.params.to_hf(host, cfg), os.path.join(folder, "model.safetensors"),
            metadata={"format": "pt"})
  if tokenizer is not None:
    tokenizer.save_pretrained(folder)

