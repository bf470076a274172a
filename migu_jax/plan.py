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

import argparse
import dataclasses
import json
import os
import sys
import time
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
    logits, mags = apply_with_magnitudes(model, {"params": params}, batch, stacked=model.config.scan_layers)
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
    model_cfg: the Llama config (its ``dtype`` is the compute dtype, ``remat`` recomputes layers,
      ``scan_layers`` scans them: the mask then thresholds each layer of the stack on its own).
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
    by the specs, XLA's FLOPs per step per device (for scanned layers extrapolated from unrolled 1- and
    2-layer compiles: XLA counts a loop's body once), and the spec of each distinct parameter kind.
  """
  settings = dict(strategy=strategy, batch_size=batch_size, seq_len=seq_len, micro_batches=micro_batches,
                  ratio=ratio, param_dtype=param_dtype, data_axis=data_axis, model_axis=model_axis)
  compiled, params, opt_state, specs = _compile(model_cfg, mesh, **settings)
  memory = compiled.memory_analysis()
  report = {
      "parameters": int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(params))),
      "argument_bytes": int(memory.argument_size_in_bytes),
      "output_bytes": int(memory.output_size_in_bytes),
      "temp_bytes": int(memory.temp_size_in_bytes),
      "alias_bytes": int(memory.alias_size_in_bytes),
      "state_bytes": _per_device_bytes(params, mesh, specs(params))
      + _per_device_bytes(opt_state, mesh, specs(opt_state)),
      "flops": _scanned_flops(model_cfg, mesh, settings) if model_cfg.scan_layers else _flops(compiled),
  }
  report["peak_bytes"] = (report["argument_bytes"] + report["output_bytes"] + report["temp_bytes"]
                          - report["alias_bytes"])
  kinds = {}
  for path, spec in jax.tree_util.tree_flatten_with_path(specs(params))[0]:
    names = sharding.path_names(path)
    kind = "/".join(n for n in names if not n.startswith("layers"))
    kinds.setdefault(kind, str(spec))
  report["specs"] = kinds
  return report


def _compile(model_cfg, mesh, *, strategy, batch_size, seq_len, micro_batches, ratio, param_dtype, data_axis,
             model_axis):
  """The compiled train step, with the abstract parameters, optimizer state and the specs function."""
  model = llama.LlamaForCausalLM(model_cfg)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones((1, 2), jnp.int32))["params"])
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, param_dtype), params)
  stacked_axes = {"layers": 1} if model_cfg.scan_layers else None
  tx = optax.chain(masking.mask_by_magnitude(ratio, stacked_axes=stacked_axes), optax.adamw(1e-4))
  opt_state = jax.eval_shape(tx.init, params)
  specs = sharding.specs_by_rules(llama.PARAM_AXES, mesh, strategy, data_axis=data_axis, model_axis=model_axis)
  step = make_train_step(_loss_fn(model), tx, micro_batches=micro_batches, mode="mesh", mesh=mesh,
                         data_axis=data_axis, state_specs=specs)
  batch = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=NamedSharding(mesh, P(data_axis)))
  compiled = step.compiled.lower(_abstract(params, mesh, specs(params)), _abstract(opt_state, mesh, specs(opt_state)),
                                 batch).compile()
  return compiled, params, opt_state, specs


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0))


def _scanned_flops(model_cfg, mesh, settings) -> float:
  """FLOPs of a layer-scanned step. XLA's cost analysis counts a loop's body once, whatever its trip count,
  so they are extrapolated from the unrolled step with 1 and 2 layers (small compiles): ``f1 + (L - 1) *
  (f2 - f1)``."""
  f1, f2 = (_flops(_compile(dataclasses.replace(model_cfg, scan_layers=False, num_hidden_layers=n), mesh,
                            **settings)[0]) for n in (1, 2))
  return f1 + (model_cfg.num_hidden_layers - 1) * (f2 - f1)


def fits(report: dict, chip: str) -> tuple[bool, float]:
  """``(fits, share)``: whether the plan's peak stays under :data:`FIT_FRACTION` of the chip's memory, and
  the share of the chip's memory it uses."""
  if chip not in CHIP_MEMORY_GB:
    raise ValueError(f"plan: chip {chip!r}; known: {sorted(CHIP_MEMORY_GB)}.")
  share = report["peak_bytes"] / (CHIP_MEMORY_GB[chip] * 1e9)
  return share <= FIT_FRACTION, share


__all__ = ["CHIP_MEMORY_GB", "FIT_FRACTION", "LLAMA_SIZES", "fits", "llama_config", "plan_train_step"]


# --------------------------------------------------------------------------------------------------
# The command: migu-jax plan
# --------------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
  """The options of ``migu-jax plan`` (and ``python -m migu_jax.plan``)."""
  p.add_argument("--model", default="llama2-7b")
  p.add_argument("--devices", type=int, default=8, help="devices of the target slice (simulated on CPU)")
  p.add_argument("--mesh", help="data,model axis sizes (default: every device on the data axis)")
  p.add_argument("--sharding", choices=("fsdp", "tensor", "replicated"), default="fsdp")
  p.add_argument("--chip", default="v5e", help="v4, v5e, v5p, v6e, h100 or h200")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16", help="compute dtype")
  p.add_argument("--param-dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--no-remat", action="store_true", help="keep every layer's activations")
  p.add_argument("--scan-layers", action="store_true", help="scan the decoder layers (nn.scan, stacked params)")
  p.add_argument("--batch-size", type=int, default=None, help="global rows per step (default: --devices)")
  p.add_argument("--seq-len", type=int, default=512)
  p.add_argument("--micro-batches", type=int, default=1)
  p.add_argument("--layers", type=int, help="override the layer count (a quick, smaller compile)")
  p.add_argument("--json", help="write the report here")
  return p


def main(argv=None) -> int:
  """``python -m migu_jax.plan ...``: plans in this process, which must not have started JAX's backend yet
  (``migu-jax plan`` starts a fresh one). Exit code 0 when the plan fits the chip, 3 when it does not."""
  args = add_arguments(argparse.ArgumentParser(prog="migu-jax plan", description=__doc__.split("\n")[0])
                       ).parse_args(argv)
  # The virtual devices must be set before the backend starts.
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
  os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={args.devices}"])
  jax.config.update("jax_num_cpu_devices", args.devices)
  if jax.device_count() != args.devices:
    raise SystemExit(f"migu-jax plan: JAX sees {jax.device_count()} devices, not --devices {args.devices}; run "
                     "it in a fresh process with JAX_PLATFORMS=cpu.")
  shape = tuple(int(v) for v in args.mesh.split(",")) if args.mesh else (args.devices,)
  names = ("data", "model")[:len(shape)]
  mesh = jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))
  dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
  overrides = dict(dtype=dtypes[args.dtype], remat=not args.no_remat, scan_layers=args.scan_layers)
  if args.layers:
    overrides["num_hidden_layers"] = args.layers
  cfg = llama_config(args.model, **overrides)
  batch = args.batch_size or args.devices
  start = time.perf_counter()
  report = plan_train_step(cfg, mesh, strategy=args.sharding, batch_size=batch, seq_len=args.seq_len,
                                micro_batches=args.micro_batches, param_dtype=dtypes[args.param_dtype])
  ok, share = fits(report, args.chip)
  gb = lambda b: f"{b / 1e9:.2f} GB" if b >= 1e8 else f"{b / 1e6:.2f} MB"
  report.update(model=args.model, layers=cfg.num_hidden_layers, devices=args.devices, mesh=dict(zip(names, shape)),
                sharding=args.sharding, chip=args.chip, chip_gb=CHIP_MEMORY_GB[args.chip], fits=ok,
                share=share, dtype=args.dtype, param_dtype=args.param_dtype, remat=not args.no_remat,
                scan_layers=args.scan_layers,
                batch_size=batch, seq_len=args.seq_len, compile_s=time.perf_counter() - start)
  print(f"plan: {args.model} ({report['parameters'] / 1e9:.2f} B parameters, {cfg.num_hidden_layers} layers), "
        f"mesh {report['mesh']}, sharding {args.sharding}, compute {args.dtype}, params {args.param_dtype}, "
        f"remat {report['remat']}, scan_layers {args.scan_layers}, batch {batch} x {args.seq_len}")
  print(f"  per device: arguments {gb(report['argument_bytes'])} (parameters + AdamW state "
        f"{gb(report['state_bytes'])}), outputs {gb(report['output_bytes'])}, temporaries "
        f"{gb(report['temp_bytes'])}, donated {gb(report['alias_bytes'])}")
  print(f"  peak {gb(report['peak_bytes'])} of {args.chip}'s {report['chip_gb']} GB ({100 * share:.0f}%): "
        f"{'fits' if ok else 'does NOT fit'} (limit {100 * FIT_FRACTION:.0f}%)")
  print(f"  {report['flops'] / 1e12:.2f} TFLOP per step per device; compiled in {report['compile_s']:.0f} s")
  print("  sharding: " + "; ".join(f"{k} {v}" for k, v in report["specs"].items()))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=2)
  return 0 if ok else 3


if __name__ == "__main__":
  sys.exit(main())
