"""Plan a MIGU run before it starts: ``migu-jax plan`` (the same options), kept as a script for the TPU notes.

Compiles the train step for N devices from shapes and prints per-device memory; runs on a CPU host (the devices
are virtual); no weight is allocated or read. Example (Llama-2-7B on a v5e-32 slice, FSDP, bfloat16 compute,
remat, global batch 32 x 512 tokens)::

    migu-jax plan --model llama2-7b --devices 32 --chip v5e --dtype bfloat16 --sharding fsdp \\
        --batch-size 32 --seq-len 512

and the same with ``--sharding replicated`` to see why FSDP is needed. ``--model`` takes a name of
``migu_jax.plan.LLAMA_SIZES``, "tiny", or a Llama checkpoint's config.json (or its folder). ``--mesh
8,4`` splits the devices into data x model axes (tensor parallelism). ``--json FILE`` writes the report.
Exit code 0 when the plan fits the chip, 3 when it does not.
"""

import sys

from migu_jax import cli

if __name__ == "__main__":
  sys.exit(cli.main(["plan", *sys.argv[1:]]))
