"""experiments/tpu/run_cl.py, unchanged, on one host with 8 virtual CPU devices (tests/conftest.py).

The mesh run (the global batch split over 8 devices, the script's data sharding, orbax checkpoints, results
from process 0) gives the accuracy matrix of the one-device jit run. Tolerance: the same accuracies (the
matrix is a count of correct test records, 8 per task); the per-task final losses agree to 1e-4 relative
(the mesh sums the batch in another order, so parameters differ in the last bits, not in any answer).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_cl_runner import DATA, tiny_config, tiny_models  # noqa: F401 (fixture)

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"benchmark data not found at {DATA}")

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "tpu" / "run_cl.py"
ORDER = "amazon,agnews"  # 20 and 16 training records: 2 + 2 steps of 8 rows


def run_script(*args, processes=1, devices=8, timeout=300):
  """Runs the script as a fresh command (as on a pod host), ``processes`` of them with ``devices`` virtual CPU
  devices each, joined by jax.distributed on localhost when more than one; returns their outputs."""
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
         "JAX_NUM_CPU_DEVICES": str(devices), "JAX_PLATFORMS": "cpu"}
  if processes > 1:
    with socket.socket() as s:
      s.bind(("localhost", 0))
      port = s.getsockname()[1]
    env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(processes))
  ids = [{"JAX_PROCESS_ID": str(i)} if processes > 1 else {} for i in range(processes)]
  procs = [subprocess.Popen([sys.executable, str(SCRIPT), *args], env={**env, **ids[i]},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(processes)]
  outputs = [p.communicate(timeout=timeout)[0] for p in procs]
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {i} failed:\n{out[-3000:]}"
  return outputs


def _config(models, out, **overrides):
  return tiny_config(models["bert"], out, order=ORDER, train_per_class=4, **overrides)


@pytest.fixture(scope="module")
def reference(tiny_models, tmp_path_factory):  # noqa: F811
  from migu_jax.cl import runner

  cfg = _config(tiny_models, tmp_path_factory.mktemp("jit"), magnitude_batches=0)
  return runner.run_sequence(cfg, "migu", 0)


def _same_run(run, reference):
  assert run["initial"] == reference["initial"]
  assert run["matrix"] == reference["matrix"]
  assert run["steps"] == reference["steps"] == [2, 2]
  np.testing.assert_allclose(run["final_loss"], reference["final_loss"], rtol=1e-4)


def _argv(models, out):
  return ["--model", models["bert"], "--data-dir", str(DATA), "--tasks", ORDER, "--methods", "migu",
          "--train-per-class", "4", "--max-test", "8", "--max-length", "32", "--batch-size", "8", "--lr", "3e-3",
          "--checkpoint-every", "1", "--output", str(out), "--set", "length_buckets=(32,)",
          "--set", "eval_batch_size=16", "--set", "magnitude_batches=1", "--no-progress"]


def test_script_on_a_mesh_matches_one_device(tiny_models, tmp_path, reference):  # noqa: F811
  out = tmp_path / "mesh"
  printed, = run_script(*_argv(tiny_models, out))
  assert "run_cl: 1 process(es), 8 cpu device(s), 8 on this host." in printed and "| migu |" in printed
  results = json.loads((out / "results.json").read_text())
  assert results["config"]["mode"] == "mesh"
  _same_run(results["runs"][0], reference)
  assert (out / "results.md").exists() and (out / "plots" / "matrix_migu_seed0.png").stat().st_size > 1000
  # Of 5 checkpoints (initial, step 1 and end of each task) the newest 2 are kept.
  assert sorted(p.name for p in (out / "migu" / "seed_0" / "checkpoints").iterdir()) == ["3", "4"]
  # The config.json identity is that of a jit run (a run may move between modes).
  assert "mode" not in json.loads((out / "migu" / "seed_0" / "config.json").read_text())


def test_script_as_two_hosts_matches_one_device(tiny_models, tmp_path, reference):  # noqa: F811
  # Two processes of 4 CPU devices joined by jax.distributed (gloo): each feeds half of every batch, both
  # take part in the orbax saves, process 0 alone reports.
  out = tmp_path / "hosts"
  first, second = run_script(*_argv(tiny_models, out), processes=2, devices=4)
  assert "run_cl: 2 process(es), 8 cpu device(s), 4 on this host." in first and "| migu |" in first
  assert "run_cl:" not in second and "Results in" not in second
  _same_run(json.loads((out / "results.json").read_text())["runs"][0], reference)
  assert sorted(p.name for p in (out / "migu" / "seed_0" / "checkpoints").iterdir()) == ["3", "4"]


def test_model_axis_shards_kernels_and_matches(tiny_models, tmp_path, reference):  # noqa: F811
  import jax

  from migu_jax.cl import methods, runner

  cfg = _config(tiny_models, tmp_path, mode="mesh", mesh_shape="-1,2", magnitude_batches=0)
  assert cfg.mesh_shape == (-1, 2) and dict(runner.make_mesh(cfg).shape) == {"data": 4, "model": 2}
  run = runner.run_sequence(cfg, "migu", 0)
  _same_run(run, reference)
  head = runner._head(cfg, runner.load_tasks(cfg, 0))
  _, step = runner._train_step(cfg, methods.get_method("migu"), 0, head)
  assert step.compiled._cache_size() == 1  # the sharded state's layout is stable across steps and tasks
  placed = runner._placement(cfg, step)
  tree = {"kernel": np.ones((4, 6), np.float32), "bias": np.ones(6, np.float32),
          "odd": np.ones((4, 5), np.float32), "scale": np.float32(1)}
  params = placed.place(tree)
  P = jax.sharding.PartitionSpec
  assert {k: v.sharding.spec for k, v in params.items()} == {
      "kernel": P(None, "model"), "bias": P("model"), "odd": P("model"), "scale": P()}
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(placed.fetch(params)), jax.tree.leaves(tree)))


def test_resume_a_jit_run_on_a_mesh(tiny_models, tmp_path, reference):  # noqa: F811
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


def test_mesh_settings_are_checked(tiny_models, tmp_path):  # noqa: F811
  from migu_jax.cl import runner

  with pytest.raises(ValueError, match="expected 'jit'"):
    _config(tiny_models, tmp_path, mode="pmap")
  with pytest.raises(ValueError, match="needs mode='mesh'"):
    _config(tiny_models, tmp_path, mesh_shape=(8,))
  with pytest.raises(ValueError, match="does not cover the 8 devices"):
    runner.make_mesh(_config(tiny_models, tmp_path, mode="mesh", mesh_shape=(3, -1)))
  with pytest.raises(ValueError, match="batch_size=4 does not split over the mesh's 8 data shards"):
    runner.run_sequence(_config(tiny_models, tmp_path, mode="mesh", batch_size=4), "migu", 0)
