"""Will a MIGU train step fit? Compile it for a mesh from abstract shapes and read XLA's memory analysis.

As MaxText's ``train_compile.py``: the parameters and optimizer state are ``jax.ShapeDtypeStruct``s
(``jax.eval_shape``: no weight is allocated), the step is the library's own
(:func:`migu_jax.make_train_step` with :func:`migu_jax.mask_by_magnitude` and AdamW) lowered for a mesh of
the given devices, and XLA compiles it and reports what each device holds: its shards of the arguments
(parameters, optimizer state, batch), the outputs, and the temporaries (activations, gradients, MIGU's
statistics). On a CPU host the devices are virtual (``--xla_force_host_platform_device_count``); the
partitioning is that of the target's mesh, the temporaries are XLA:CPU's estimate (a TPU's fusion and
layouts differ, so keep a margin: the verdict uses 90% of the chip's memory).

Example:
  >>> import jax
  >>> from migu_jax.models import llama
  >>> mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  >>> report = plan_train_step(llama.Config.of_size("tiny"), mesh, batch_size=8, seq_len=16)
  >>> report["argument_bytes"] > 0 and report["flops"] > 0
  True
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from migu_jax import masking, sharding
from migu_jax.magnitudes import apply_with_magnitudes
from migu_jax.models import llama
from migu_jax.train_step import make_train_step

CHIP_MEMORY_GB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32, "h100": 80, "h200": 141}
"""High-bandwidth memory per chip (GB, 1e9 bytes) of the accelerators a plan is checked against."""

FIT_FRACTION = 0.9
"""The share of a chip's memory a plan may use (XLA:CPU's estimate is not the TPU compiler's)."""

LLAMA_SIZES = {
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                      rms_norm_eps=1e-5),
    "llama2-13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096,
                       rms_norm_eps=1e-5),
}
"""Shapes of the Llama-2 checkpoints (their Hugging Face config.json), for plans without the files."""


def llama_config(spec: str, **overrides) -> llama.Config:
  """A Llama config: a name of :data:`LLAMA_SIZES`, a size of ``llama.Config.of_size`` ("tiny"), or a
  Hugging Face ``config.json`` (the file or its folder)."""
  if spec in LLAMA_SIZES:
    return llama.Config(**{**LLAMA_SIZES[spec], **overrides})
  path = Path(spec)
  if path.is_dir():
    path = path / "config.json"
  if path.is_file():
    return llama.Config.from_hf(json.loads(path.read_text()), **overrides)
  try:
    return llama.Config.of_size(spec, **overrides)
  except ValueError:
    raise ValueError(f"plan: model {spec!r} is not one of {sorted(LLAMA_SIZES)}, a Llama size ('tiny') or a "
                     "config.json; pass the checkpoint folder's config.json.") from None


def _loss_fn(model):
  def loss_fn(params, batch):
    logits, mags = apply_with_magnitudes(model, {"params": params}, batch)
    logits = logits[:, :-1].astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean(), mags
  return loss_fn


def _abstract(tree, mesh, specs):
  leaves, treedef = jax.tree.flatten(tree)
  spec_leaves = treedef.flatten_up_to(specs)
  return treedef.unflatten([jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, s))
                            for x, s in zip(leaves, spec_leaves)])


def _per_device_bytes(tree, mesh, specs) -> int:
  leaves, treedef = jax.tree.flatten(tree)
  total = 0
  for x, spec in zip(leaves, treedef.flatten_up_to(specs)):
    shard = NamedSharding(mesh, spec).shard_shape(x.shape)
    total += int(np.prod(shard, dtype=np.int64)) * jnp.dtype(x.dtype).itemsize
  return total


def plan_train_step(model_cfg: llama.Config, mesh: jax.sharding.Mesh, *, strategy: str = "fsdp",
                    batch_size: int = 8, seq_len: int = 512, micro_batches: int = 1, ratio: float = 0.7,
                    param_dtype: Any = jnp.float32, data_axis: str = "data",
                    model_axis: str = "model") -> dict:
  """Compiles MIGU's train step (mask + AdamW) of a Llama for ``mesh`` from shapes; returns per-device bytes.

  Args:
    model_cfg: the Llama config (its ``dtype`` is the compute dtype, ``remat`` recomputes layers).
    mesh: the target mesh (axes ``data_axis`` and optionally ``model_axis``).
    strategy: a :data:`migu_jax.sharding.STRATEGIES` name (``"replicated"``: every device holds all).
    batch_size, seq_len: the global batch of token rows.
    micro_batches: gradient accumulation pieces per step.
    ratio: MIGU's T.
    param_dtype: the stored parameters' dtype (AdamW's moments follow it).

  Returns:
    ``{"parameters", "argument_bytes", "output_bytes", "temp_bytes", "alias_bytes", "peak_bytes",
    "state_bytes", "flops", "specs"}``: the per-device memory of XLA's analysis (``peak_bytes`` =
    arguments + outputs + temporaries - donated aliases), the per-device parameter + optimizer-state bytes
    by the specs, XLA's FLOPs per step per device, and the spec of each distinct parameter kind.
  """
  model = llama.LlamaForCausalLM(model_cfg)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones((1, 2), jnp.int32))["params"])
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, param_dtype), params)
  tx = optax.chain(masking.mask_by_magnitude(ratio), optax.adamw(1e-4))
  opt_state = jax.eval_shape(tx.init, params)
  specs = sharding.specs_by_rules(llama.PARAM_AXES, mesh, strategy, data_axis=data_axis, model_axis=model_axis)
  step = make_train_step(_loss_fn(model), tx, micro_batches=micro_batches, mode="mesh", mesh=mesh,
                         data_axis=data_axis, state_specs=specs)
  batch = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=NamedSharding(mesh, P(data_axis)))
  compiled = step.compiled.lower(_abstract(params, mesh, specs(params)), _abstract(opt_state, mesh, specs(opt_state)),
                                 batch).compile()
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  report = {
      "parameters": int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(params))),
      "argument_bytes": int(memory.argument_size_in_bytes),
      "output_bytes": int(memory.output_size_in_bytes),
      "temp_bytes": int(memory.temp_size_in_bytes),
      "alias_bytes": int(memory.alias_size_in_bytes),
      "state_bytes": _per_device_bytes(params, mesh, specs(params))
      + _per_device_bytes(opt_state, mesh, specs(opt_state)),
      "flops": float(cost.get("flops", 0.0)),
  }
  report["peak_bytes"] = (report["argument_bytes"] + report["output_bytes"] + report["temp_bytes"]
                          - report["alias_bytes"])
  kinds = {}
  for path, spec in jax.tree_util.tree_flatten_with_path(specs(params))[0]:
    names = sharding.path_names(path)
    kind = "/".join(n for n in names if not n.startswith("layers_"))
    kinds.setdefault(kind, str(spec))
  report["specs"] = kinds
  return report


def fits(report: dict, chip: str) -> tuple[bool, float]:
  """``(fits, share)``: whether the plan's peak stays under :data:`FIT_FRACTION` of the chip's memory, and
  the share of the chip's memory it uses."""
  if chip not in CHIP_MEMORY_GB:
    raise ValueError(f"plan: chip {chip!r}; known: {sorted(CHIP_MEMORY_GB)}.")
  share = report["peak_bytes"] / (CHIP_MEMORY_GB[chip] * 1e9)
  return share <= FIT_FRACTION, share


__all__ = ["CHIP_MEMORY_GB", "FIT_FRACTION", "LLAMA_SIZES", "fits", "llama_config", "plan_train_step"]
