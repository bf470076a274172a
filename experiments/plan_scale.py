"""Plan a MIGU run before it starts: compile the train step for N devices from shapes, print per-device memory.

Runs on a CPU host (the devices are virtual); no weight is allocated or read. Example (Llama-2-7B on a v5e-32
slice, FSDP, bfloat16 compute, remat, global batch 32 x 512 tokens)::

    python experiments/plan_scale.py --model llama2-7b --devices 32 --chip v5e --dtype bfloat16 \\
        --sharding fsdp --batch-size 32 --seq-len 512

and the same with ``--sharding replicated`` to see why FSDP is needed. ``--model`` takes a name of
``migu_jax.plan.LLAMA_SIZES``, "tiny", or a Llama checkpoint's config.json (or its folder). ``--mesh
8,4`` splits the devices into data x model axes (tensor parallelism). ``--json FILE`` writes the report.
Exit code 0 when the plan fits the chip, 3 when it does not.
"""

import argparse
import json
import os
import sys
import time


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="llama2-7b")
  p.add_argument("--devices", type=int, default=8, help="devices of the target slice (simulated on CPU)")
  p.add_argument("--mesh", help="data,model axis sizes (default: every device on the data axis)")
  p.add_argument("--sharding", choices=("fsdp", "tensor", "replicated"), default="fsdp")
  p.add_argument("--chip", default="v5e", help="v4, v5e, v5p, v6e, h100 or h200")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16", help="compute dtype")
  p.add_argument("--param-dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--no-remat", action="store_true", help="keep every layer's activations")
  p.add_argument("--batch-size", type=int, default=None, help="global rows per step (default: --devices)")
  p.add_argument("--seq-len", type=int, default=512)
  p.add_argument("--micro-batches", type=int, default=1)
  p.add_argument("--layers", type=int, help="override the layer count (a quick, smaller compile)")
  p.add_argument("--json", help="write the report here")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  # The virtual devices must be set before JAX starts.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={args.devices}").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  import jax.numpy as jnp

  from migu_jax import plan

  jax.config.update("jax_num_cpu_devices", args.devices)
  if jax.device_count() != args.devices:
    raise SystemExit(f"plan_scale: JAX sees {jax.device_count()} devices, not --devices {args.devices}; run it "
                     "in a fresh process with JAX_PLATFORMS=cpu.")
  shape = tuple(int(v) for v in args.mesh.split(",")) if args.mesh else (args.devices,)
  names = ("data", "model")[:len(shape)]
  mesh = jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))
  dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
  overrides = dict(dtype=dtypes[args.dtype], remat=not args.no_remat)
  if args.layers:
    overrides["num_hidden_layers"] = args.layers
  cfg = plan.llama_config(args.model, **overrides)
  batch = args.batch_size or args.devices
  start = time.perf_counter()
  report = plan.plan_train_step(cfg, mesh, strategy=args.sharding, batch_size=batch, seq_len=args.seq_len,
                                micro_batches=args.micro_batches, param_dtype=dtypes[args.param_dtype])
  ok, share = plan.fits(report, args.chip)
  gb = lambda b: f"{b / 1e9:.2f} GB" if b >= 1e8 else f"{b / 1e6:.2f} MB"
  report.update(model=args.model, layers=cfg.num_hidden_layers, devices=args.devices, mesh=dict(zip(names, shape)),
                sharding=args.sharding, chip=args.chip, chip_gb=plan.CHIP_MEMORY_GB[args.chip], fits=ok,
                share=share, dtype=args.dtype, param_dtype=args.param_dtype, remat=not args.no_remat,
                batch_size=batch, seq_len=args.seq_len, compile_s=time.perf_counter() - start)
  print(f"plan: {args.model} ({report['parameters'] / 1e9:.2f} B parameters, {cfg.num_hidden_layers} layers), "
        f"mesh {report['mesh']}, sharding {args.sharding}, compute {args.dtype}, params {args.param_dtype}, "
        f"remat {report['remat']}, batch {batch} x {args.seq_len}")
  print(f"  per device: arguments {gb(report['argument_bytes'])} (parameters + AdamW state "
        f"{gb(report['state_bytes'])}), outputs {gb(report['output_bytes'])}, temporaries "
        f"{gb(report['temp_bytes'])}, donated {gb(report['alias_bytes'])}")
  print(f"  peak {gb(report['peak_bytes'])} of {args.chip}'s {report['chip_gb']} GB ({100 * share:.0f}%): "
        f"{'fits' if ok else 'does NOT fit'} (limit {100 * plan.FIT_FRACTION:.0f}%)")
  print(f"  {report['flops'] / 1e12:.2f} TFLOP per step per device; compiled in {report['compile_s']:.0f} s")
  print("  sharding: " + "; ".join(f"{k} {v}" for k, v in report["specs"].items()))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=2)
  return 0 if ok else 3


if __name__ == "__main__":
  sys.exit(main())
