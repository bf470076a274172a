"""experiments/tpu/run_cl.py, unchanged, as two hosts of 4 virtual CPU devices (jax.distributed on localhost),
and the runner's mesh mode in-process on 8 (tests/conftest.py).

A mesh run (the global batch split over 8 devices, the script's data sharding, orbax checkpoints, results
from process 0) gives the accuracy matrix of the one-device jit run. Tolerance: the same accuracies (the
matrix is a count of correct test records, 8 per task); the per-task final losses agree to 1e-4 relative
(the mesh sums the batch in another order, so parameters differ in the last bits, not in any answer).

Preemption of two processes (jax.distributed on localhost): SIGTERM to both, or to one, stops both after the
same step with one checkpoint there and exit code 143 within 30 s; the resumed run's state at its next stop
equals the uninterrupted two-process run's, bit for bit.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tiny_cl import DATA, once_per_run, tiny_config

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "tpu" / "run_cl.py"
ORDER = "amazon,agnews"  # 20 and 16 training records: 2 + 2 steps of 8 rows


HOSTS, DEVICES = 2, 4
"""The script runs as HOSTS processes of DEVICES virtual CPU devices each."""


def start_script(*args, script=None, env=None):
  """Starts the script as fresh commands (as on pod hosts): HOSTS processes of DEVICES virtual CPU devices,
  joined by jax.distributed on localhost; returns the processes. ``script``: Python source to run instead of
  the file (it runs the file itself); ``env``: more environment variables."""
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))  # the rest kept
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = {**os.environ, **(env or {}), "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={DEVICES}".strip(),
         "JAX_NUM_CPU_DEVICES": str(DEVICES), "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
         "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": str(HOSTS)}
  command = [sys.executable, *(["-c", script] if script else [str(SCRIPT)]), *args]
  return [subprocess.Popen(command, env={**env, "JAX_PROCESS_ID": str(i)}, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
          for i in range(HOSTS)]


def run_script(*args, timeout=300):
  """Runs the script (see :func:`start_script`) to its end; returns the outputs of its processes."""
  procs = start_script(*args)
  outputs = [p.communicate(timeout=timeout)[0] for p in procs]
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {i} failed:\n{out[-3000:]}"
  return outputs


def _config(models, out, **overrides):
  # Dropout off: these tests compare placements (one device, a mesh, two hosts), and a multi-host run's
  # dropout units are not those of a one-device run (exact resume within one placement is tested below).
  return tiny_config(models["bert"], out, order=ORDER, train_per_class=4, dropout=False, **overrides)


@pytest.fixture(scope="session")
def reference(tiny_models, tmp_path_factory):
  """The run on one device (jit)."""
  def run(folder):
    from migu_jax.cl import runner
    return runner.run_sequence(_config(tiny_models, folder, magnitude_batches=0), "migu", 0)

  return once_per_run(tmp_path_factory, "test_tpu.reference", run)


def _same_run(run, reference):
  assert run["initial"] == reference["initial"]
  assert run["matrix"] == reference["matrix"]
  assert run["steps"] == reference["steps"] == [2, 2]
  np.testing.assert_allclose(run["final_loss"], reference["final_loss"], rtol=1e-4)


def _argv(models, out):
  return ["--model", models["bert"], "--data-dir", str(DATA), "--tasks", ORDER, "--methods", "migu",
          "--train-per-class", "4", "--max-test", "8", "--max-length", "32", "--batch-size", "8", "--lr", "3e-3",
          "--checkpoint-every", "1", "--output", str(out), "--set", "length_buckets=(32,)", "--set", "dropout=False",
          "--set", "eval_batch_size=16", "--set", "magnitude_batches=1", "--no-progress"]


@pytest.fixture(scope="session")
def two_hosts(tiny_models, tmp_path_factory):
  """An uninterrupted run as two processes of 4 CPU devices: (output folder, outputs of the processes)."""
  out, outputs = once_per_run(tmp_path_factory, "test_tpu.two_hosts",
                              lambda out: (str(out), run_script(*_argv(tiny_models, out))))
  return Path(out), outputs


def test_script_as_two_hosts_matches_one_device(two_hosts, reference):
  # Two processes of 4 CPU devices joined by jax.distributed (gloo): each feeds half of every batch, both
  # take part in the orbax saves, process 0 alone reports. (One process on a mesh is the runner's mesh mode,
  # tested in-process below; the script adds only the set-up this test runs.)
  out, (first, second) = two_hosts
  assert "run_cl: 2 process(es), 8 cpu device(s), 4 on this host." in first and "| migu |" in first
  assert "run_cl:" not in second and "Results in" not in second
  results = json.loads((out / "results.json").read_text())
  assert results["config"]["mode"] == "mesh"
  _same_run(results["runs"][0], reference)
  assert (out / "results.md").exists() and (out / "plots" / "matrix_migu_seed0.png").stat().st_size > 1000
  # Of 5 checkpoints (initial, step 1 and end of each task) the newest 2 are kept.
  assert sorted(p.name for p in (out / "migu" / "seed_0" / "checkpoints").iterdir()) == ["3", "4"]
  # The config.json identity is that of a jit run (a run may move between modes).
  assert "mode" not in json.loads((out / "migu" / "seed_0" / "config.json").read_text())


PAUSED = f"""
import os, runpy, sys, time
from pathlib import Path

import jax

from migu_jax.cl import runner

pause_dir, at = Path(os.environ["PAUSE_DIR"]), tuple(int(v) for v in os.environ["PAUSE_AT"].split(","))
run_sequence = runner.run_sequence


def pause(event, info):  # the step loop waits after step `at` until the test has sent its signals
  if event == "step" and (info["task"], info["step"]) == at:
    (pause_dir / f"paused-{{jax.process_index()}}").touch()
    deadline = time.time() + 120
    while not (pause_dir / "go").exists() and time.time() < deadline:
      time.sleep(0.05)


def paused_run_sequence(cfg, method_name, seed, *, callbacks=()):
  return run_sequence(cfg, method_name, seed, callbacks=[*callbacks, pause])


runner.run_sequence = paused_run_sequence
sys.argv = [{str(SCRIPT)!r}, *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
"""The script, waiting (every process) after step ``PAUSE_AT`` ("task,step") until ``PAUSE_DIR/go`` exists."""


def _stop_two_hosts(argv, tmp_path, at, signalled):
  """Starts the script as two processes, waits until both finished step ``at``, sends SIGTERM to the processes
  ``signalled``, lets them go on; returns (seconds from the signal to the end of both, outputs)."""
  pause_dir = tmp_path / f"pause-{at[0]}-{at[1]}"
  pause_dir.mkdir()
  procs = start_script(*argv, script=PAUSED,
                       env={"PAUSE_DIR": str(pause_dir), "PAUSE_AT": f"{at[0]},{at[1]}"})
  deadline = time.time() + 240
  while not all((pause_dir / f"paused-{i}").exists() for i in range(2)):
    if time.time() > deadline or any(p.poll() is not None for p in procs):
      for p in procs:
        p.kill()
      pytest.fail("the processes did not reach the pause:\n" + "\n".join(p.communicate()[0][-3000:] for p in procs))
    time.sleep(0.05)
  sent = time.time()
  for i in signalled:
    procs[i].send_signal(signal.SIGTERM)  # as a TPU VM's preemption: the host's process gets SIGTERM
  (pause_dir / "go").touch()
  outputs = [p.communicate(timeout=120)[0] for p in procs]
  return time.time() - sent, [(p.returncode, out) for p, out in zip(procs, outputs)]


def _state(checkpoint_folder):
  import orbax.checkpoint as ocp

  return ocp.PyTreeCheckpointer().restore(checkpoint_folder / "state")


@pytest.mark.heavy
def test_sigterm_stops_two_hosts_at_the_step_and_the_resume_is_bit_identical(tiny_models, tmp_path, two_hosts):
  # A preempted pod slice: SIGTERM on every host after step 1 of task 1. The resumed run gets SIGTERM on
  # process 1 alone after step 1 of task 2 (process 0 learns of it from the per-step all-gather). Each time
  # both processes save the checkpoint at that step together, say so and exit with 143 within 30 s. The
  # resumed run's checkpoint there holds the uninterrupted two-process run's state at that step, bit for bit
  # (parameters, optimizer state, key); its losses and accuracy rows are the same.
  import jax

  from migu_jax.cl import checkpoint

  out = tmp_path / "stopped"
  argv = _argv(tiny_models, out)
  argv[argv.index("--checkpoint-every") + 1] = "1000"  # no scheduled save inside a task: the stop's own
  folder = out / "migu" / "seed_0" / "checkpoints"
  for at, signalled, task, number in [((0, 0), (0, 1), "task 1 of 2 (amazon)", 1),
                                      ((1, 0), (1,), "task 2 of 2 (agnews)", 3)]:
    seconds, ended = _stop_two_hosts(argv, tmp_path, at, signalled)
    assert seconds < 30, ended
    for code, printed in ended:
      assert code == 143, printed[-3000:]
      assert (f"stopped by SIGTERM at migu seed 0, {task}, step 1; saved checkpoint {number} in {folder}. Run "
              "the same command again") in printed, printed[-3000:]
    with checkpoint.RunCheckpoints(folder) as kept:
      assert kept.latest() == number and (kept.read_meta()["task"], kept.read_meta()["step"]) == (at[0], 1)
  # The uninterrupted run saved after every step: its checkpoint 3 is task 2, step 1 too.
  whole = two_hosts[0] / "migu" / "seed_0" / "checkpoints" / "3"
  stopped, reference = _state(folder / "3"), _state(whole)
  assert jax.tree.structure(stopped) == jax.tree.structure(reference)
  for a, b in zip(jax.tree.leaves(stopped), jax.tree.leaves(reference)):
    assert a.dtype == b.dtype and np.array_equal(a, b)
  metas = []
  for f in (folder, whole.parent):
    with checkpoint.RunCheckpoints(f) as kept:
      metas.append(kept.read_meta(3))
  for key in ("task", "step", "initial", "rows", "steps", "losses"):
    assert metas[0][key] == metas[1][key], key


def test_model_axis_shards_kernels_and_matches(tiny_models, tmp_path, reference):
  import jax

  from migu_jax.cl import methods, runner

  cfg = _config(tiny_models, tmp_path, mode="mesh", mesh_shape="-1,2", magnitude_batches=0)
  assert cfg.mesh_shape == (-1, 2) and dict(runner.make_mesh(cfg).shape) == {"data": 4, "model": 2}
  run = runner.run_sequence(cfg, "migu", 0)
  _same_run(run, reference)
  head = runner._head(cfg, runner.load_tasks(cfg, 0))
  _, step, placed = runner._step_and_placement(cfg, methods.get_method("migu"), 0, head)
  assert step.compiled._cache_size() == 1  # the sharded state's layout is stable across steps and tasks
  tree = {"kernel": np.ones((4, 6), np.float32), "bias": np.ones(6, np.float32),
          "odd": np.ones((4, 5), np.float32), "scale": np.float32(1)}
  params = placed.place(tree)
  P = jax.sharding.PartitionSpec
  assert {k: v.sharding.spec for k, v in params.items()} == {
      "kernel": P(None, "model"), "bias": P("model"), "odd": P("model"), "scale": P()}
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(placed.fetch(params)), jax.tree.leaves(tree)))


def test_fsdp_sharding_by_the_family_rules_matches(tiny_models, tmp_path, reference):
  # Config.sharding="fsdp" on a (4, 2) mesh: BERT's rules split embed over data and heads/mlp over model.
  import jax

  from migu_jax.cl import methods, runner

  cfg = _config(tiny_models, tmp_path, mode="mesh", mesh_shape=(4, 2), sharding="fsdp", magnitude_batches=0)
  _same_run(runner.run_sequence(cfg, "migu", 0), reference)
  head = runner._head(cfg, runner.load_tasks(cfg, 0))
  _, step, placed = runner._step_and_placement(cfg, methods.get_method("migu"), 0, head)
  assert step.compiled._cache_size() == 1
  kernel = placed.place({"model": {"layers_0": {"intermediate": {"kernel": np.ones((32, 64), np.float32)}}}})
  assert kernel["model"]["layers_0"]["intermediate"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(
      "data", "model")
  with pytest.raises(ValueError, match="set mode='mesh' too"):
    _config(tiny_models, tmp_path, sharding="fsdp")


def test_resume_a_jit_run_on_a_mesh(tiny_models, tmp_path, reference):
  from migu_jax.cl import runner

  class Killed(Exception):
    pass

  def kill(event, info):
    if event == "step" and (info["task"], info["step"]) == (1, 0):
      raise Killed

  cfg = _config(tiny_models, tmp_path, magnitude_batches=0, checkpoint_every=1)
  with pytest.raises(Killed):
    runner.run_sequence(cfg, "migu", 0, callbacks=[kill])
  _same_run(runner.run_sequence(cfg.replace(mode="mesh"), "migu", 0), reference)


def test_mesh_settings_are_checked(tiny_models, tmp_path):
  from migu_jax.cl import runner

  with pytest.raises(ValueError, match="expected 'jit'"):
    _config(tiny_models, tmp_path, mode="pmap")
  with pytest.raises(ValueError, match="needs mode='mesh'"):
    _config(tiny_models, tmp_path, mesh_shape=(8,))
  with pytest.raises(ValueError, match="does not cover the 8 devices"):
    runner.make_mesh(_config(tiny_models, tmp_path, mode="mesh", mesh_shape=(3, -1)))
  with pytest.raises(ValueError, match="batch_size=4 does not split over the mesh's 8 data shards"):
    runner.run_sequence(_config(tiny_models, tmp_path, mode="mesh", batch_size=4), "migu", 0)
