"""Mapping between Hugging Face state dicts and Flax parameter trees.

Each model family describes its checkpoint layout as a table of :class:`Rule`
rows: a Hugging Face key template, a Flax parameter path template and a named
:class:`Transform`. ``{i}`` in a template stands for a layer number and
matches in both directions, so one table serves loading and saving.

Loading collects every missing, unexpected and mis-shaped tensor and raises
them together in one :class:`CheckpointError`, so a wrong checkpoint is
diagnosed in one run.

Example:
  >>> import numpy as np
  >>> rules = (Rule("dense.weight", "dense/kernel", TRANSPOSE),)
  >>> params = state_dict_to_params(
  ...     {"dense.weight": np.zeros((3, 2), np.float32)}, rules,
  ...     expected={"dense/kernel": (2, 3)}, source="demo")
  >>> params["dense"]["kernel"].shape
  (2, 3)
  >>> params_to_state_dict(params, rules)["dense.weight"].shape
  (3, 2)
"""

from __future__ import annotations

import json
import os
import re
from typing import Callable, Iterable, Mapping, NamedTuple

import jax
import numpy as np


class CheckpointError(ValueError):
  """A checkpoint does not fit the model: lists every problem at once."""


class Transform(NamedTuple):
  """A named pair of array maps: Hugging Face layout <-> Flax layout."""
  name: str
  to_flax: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


IDENTITY = Transform("identity", lambda x: x, lambda x: x)
# torch.nn.Linear stores weight [out, in]; nn.Dense stores kernel [in, out].
TRANSPOSE = Transform("transpose", lambda x: x.T, lambda x: x.T)


class Rule(NamedTuple):
  """One row of a checkpoint table: HF key <-> Flax path, with a transform."""
  hf_key: str
  flax_path: str
  transform: Transform = IDENTITY


def _template_regex(template: str) -> re.Pattern:
  parts = re.split(r"(\{i\})", template)
  body = "".join(r"(?P<i>\d+)" if p == "{i}" else re.escape(p) for p in parts)
  return re.compile(body + r"\Z")


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
  flat = {}
  for key, value in tree.items():
    path = f"{prefix}/{key}" if prefix else str(key)
    if isinstance(value, Mapping):
      flat.update(_flatten(value, path))
    else:
      flat[path] = value
  return flat


def _unflatten(flat: Mapping[str, np.ndarray]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = value
  return tree


def flatten_params(params: Mapping) -> dict[str, np.ndarray]:
  """Nested parameter dict -> ``{"a/b/kernel": array}``."""
  return _flatten(params)


def shapes_of(init: Callable[[int], Mapping]) -> dict[str, tuple[int, ...]]:
  """Flax path -> shape of every parameter ``init(seed)["params"]`` makes, from ``jax.eval_shape`` (no
  compute): what :func:`state_dict_to_params` expects."""
  shapes = jax.eval_shape(lambda: init(0))
  return {k: v.shape for k, v in flatten_params(shapes["params"]).items()}


def state_dict_to_params(
    state_dict: Mapping[str, np.ndarray],
    rules: Iterable[Rule],
    *,
    expected: Mapping[str, tuple[int, ...]],
    ignore: Iterable[str] = (),
    source: str = "checkpoint",
) -> dict:
  """Maps a Hugging Face state dict onto a nested Flax ``params`` dict.

  Args:
    state_dict: HF key -> numpy array (HF layout).
    rules: the family's checkpoint table.
    expected: Flax path ("a/b/kernel") -> shape, from ``jax.eval_shape`` of
      the model's init; every path must be filled exactly once.
    ignore: regexes of HF keys known to be unused (buffers, tied copies).
    source: where the tensors came from, named in the error.

  Returns:
    The nested ``params`` dict (float32 numpy arrays).

  Raises:
    CheckpointError: listing all missing, unexpected and mis-shaped tensors.
  """
  compiled = [(_template_regex(r.hf_key), r) for r in rules]
  ignored = [re.compile(p + r"\Z") for p in ignore]
  flat: dict[str, np.ndarray] = {}
  unexpected, misshaped, misshaped_paths = [], [], set()
  for key in sorted(state_dict):
    if any(p.match(key) for p in ignored):
      continue
    for regex, rule in compiled:
      match = regex.match(key)
      if match:
        path = rule.flax_path.replace("{i}", match.groupdict().get("i") or "")
        break
    else:
      unexpected.append(key)
      continue
    if path not in expected:
      unexpected.append(f"{key} (-> {path}, not in this model's config)")
      continue
    value = np.asarray(rule.transform.to_flax(np.asarray(state_dict[key])))
    if tuple(value.shape) != tuple(expected[path]):
      misshaped.append(f"{key} -> {path}: checkpoint {tuple(value.shape)} "
                       f"(after {rule.transform.name}), model {tuple(expected[path])}")
      misshaped_paths.add(path)
      continue
    flat[path] = value.astype(np.float32)
  missing = sorted(set(expected) - set(flat) - misshaped_paths)
  problems = []
  if missing:
    problems.append(f"missing ({len(missing)}): " + ", ".join(missing))
  if unexpected:
    problems.append(f"unexpected ({len(unexpected)}): " + ", ".join(unexpected))
  if misshaped:
    problems.append(f"mis-shaped ({len(misshaped)}): " + "; ".join(misshaped))
  if problems:
    raise CheckpointError(
        f"{source} does not match the model config:\n  " + "\n  ".join(problems)
        + "\nCheck that config.json belongs to these weights (sizes, number of "
        "layers, tied embeddings).")
  return _unflatten(flat)


def params_to_state_dict(params: Mapping, rules: Iterable[Rule]) -> dict[str, np.ndarray]:
  """Inverse of :func:`state_dict_to_params`: Flax params -> HF state dict."""
  compiled = [(_template_regex(r.flax_path), r) for r in rules]
  out = {}
  for path, value in _flatten(params).items():
    for regex, rule in compiled:
      match = regex.match(path)
      if match:
        key = rule.hf_key.replace("{i}", match.groupdict().get("i") or "")
        out[key] = np.ascontiguousarray(rule.transform.to_hf(np.asarray(value, np.float32)))
        break
    else:
      raise CheckpointError(f"parameter {path!r} has no Hugging Face name in the "
                            "checkpoint table; add a Rule for it in params.py.")
  return out


def read_config(folder: str) -> dict:
  """Reads ``folder/config.json``; errors name the folder and the fix."""
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"{folder!r} has no config.json: from_pretrained needs a Hugging Face "
        "model folder (config.json plus *.safetensors), e.g. one written by "
        "save_pretrained.")
  with open(path) as f:
    return json.load(f)


def read_safetensors(folder: str) -> dict[str, np.ndarray]:
  """Reads all safetensors weights of a HF folder (sharded or not) as numpy."""
  index = os.path.join(folder, "model.safetensors.index.json")
  if os.path.isfile(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  else:
    files = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
  if not files:
    present = sorted(os.listdir(folder))
    hint = (" (found PyTorch .bin weights: convert them to safetensors, e.g. load with "
            "transformers and call save_pretrained(..., safe_serialization=True))"
            if any(n.endswith(".bin") for n in present) else "")
    raise FileNotFoundError(
        f"{folder!r} has no *.safetensors weights{hint}; files there: {present}")
  tensors: dict[str, np.ndarray] = {}
  for name in files:
    tensors.update(_read_safetensors_file(os.path.join(folder, name)))
  return tensors


def _read_safetensors_file(path: str) -> dict[str, np.ndarray]:
  from safetensors import safe_open
  out = {}
  with safe_open(path, framework="np") as f:
    for key in f.keys():
      try:
        out[key] = f.get_tensor(key)
      except TypeError:  # bfloat16 has no numpy dtype: read it through jax.
        with safe_open(path, framework="flax") as g:
          out[key] = np.asarray(g.get_tensor(key), np.float32)
  return out
