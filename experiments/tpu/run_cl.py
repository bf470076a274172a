"""The continual-learning runner on every host of a TPU pod slice; unchanged on one host.

Run the same command on every host (experiments/tpu/README.md has the gcloud line)::

    python experiments/tpu/run_cl.py --config experiments/tpu/order1_minilm_pod.py

Every process joins the pod (``jax.distributed.initialize()``; skipped when there is one process and no
coordinator is configured), builds the same global mesh of every chip (``Config.mode="mesh"``, a data axis
and optionally a model axis, ``--mesh-shape``), and runs :func:`migu_jax.cl.runner.run_experiment`: each
process feeds rows ``process_index::process_count`` of every global batch to its own chips, every process
takes part in the orbax checkpoint saves, and process 0 alone writes results, plots and logs. The accuracy
matrix is that of a one-device run (float sums in another order; see tests/test_tpu.py).

Arguments are those of ``migu-jax run`` (``--config``, ``--output``, ``--set key=value``, ...), plus
``--mesh-shape`` (e.g. ``-1`` or ``-1,2``). The output folder must be one that every host sees (an NFS /
Filestore mount, or a gcsfuse-mounted bucket): orbax writes each checkpoint from all processes, and a
resumed run reads it back on all of them.

Preemption: SIGTERM (what a preempted TPU VM's hosts get; one host's SIGTERM is enough) or Ctrl-C stops every
process after the same step; together they save a checkpoint there, print where they stopped and exit with
143 (130); the same command resumes from that step, bit for bit (tests/test_tpu.py). The script takes the
signals right after joining the pod and turns JAX's own preemption service off: that service would take a
SIGTERM that came before the run's handler and keep the run going (see :mod:`migu_jax.cl.faults`). Process 0
holds the output folder's lock for the job.

On one machine with virtual CPU devices (what tests/test_tpu.py runs)::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python experiments/tpu/run_cl.py \\
        --model minilm --tasks sst-2,agnews --train-per-class 8 --max-test 40 --output runs/tpu_try
"""

from __future__ import annotations

import logging
import os
import sys

import jax


def initialize_distributed() -> int:
  """Joins the processes of a pod slice; returns the process count.

  On a Cloud TPU VM, ``jax.distributed.initialize()`` finds the coordinator and the other hosts itself.
  Elsewhere (GPUs, CPUs, tests) set ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0),
  ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` on each process. Where no cluster is found and no coordinator
  is configured, the script runs as the only process.
  """
  if jax.distributed.is_initialized():
    return jax.process_count()
  env = {name: os.environ.get(f"JAX_{name.upper()}") for name in ("num_processes", "process_id")}
  # JAX's preemption service would install its own SIGTERM handler here; a signal it took (one that came
  # before faults.stop_signals below) would be lost to the run. Without it such an early SIGTERM ends the
  # process as it does a one-process run: nothing is lost but the startup, and the run resumes from the
  # last checkpoint. Orbax treats the service's absence as "no preemption".
  jax.config.update("jax_enable_preemption_service", False)
  try:
    jax.distributed.initialize(**{k: int(v) for k, v in env.items() if v is not None})
  except ValueError:
    if os.environ.get("JAX_COORDINATOR_ADDRESS") or any(env.values()):
      raise
    logging.info("run_cl: no cluster detected and no coordinator configured: one process.")
  return jax.process_count()


def main(argv=None) -> int:
  initialize_distributed()
  from migu_jax.cl import faults

  with faults.stop_signals():  # from here on SIGTERM / SIGINT stop the run at its next step (the run's block nests)
    from migu_jax import cli

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--mode" not in argv:
      argv += ["--mode", "mesh"]
    if jax.process_index() != 0 and "--no-progress" not in argv:
      argv.append("--no-progress")
    if jax.process_index() == 0:
      print(f"run_cl: {jax.process_count()} process(es), {jax.device_count()} {jax.devices()[0].platform} "
            f"device(s), {jax.local_device_count()} on this host.", flush=True)
    return cli.main(["run", *argv])


if __name__ == "__main__":
  sys.exit(main())
