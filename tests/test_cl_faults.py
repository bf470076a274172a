"""Faults besides a crash: a damaged checkpoint, a stop signal, a second process, a failing save.

Each ends either bit-identical to an uninterrupted run (resumed from the newest readable checkpoint, or from
the step the signal stopped at) or with one clear message and the previous checkpoint intact.
"""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tiny_cl import DATA, resumable_config, tiny_config

REPO = Path(__file__).resolve().parents[1]


class Killed(Exception):
  """Stands for the process dying: nothing in memory survives the restart."""


def _kill_at(task, step):
  def callback(event, info):
    if event == "step" and (info["task"], info["step"]) == (task, step):
      raise Killed(f"task {task} step {step}")
  return callback


def _signal_at(task, step, signum=signal.SIGTERM):
  def callback(event, info):
    if event == "step" and (info["task"], info["step"]) == (task, step):
      os.kill(os.getpid(), signum)  # a real signal: the handler records it, the loop stops after this step
  return callback


def _same(result, reference):
  assert result["matrix"] == reference["matrix"]
  assert result["initial"] == reference["initial"]
  assert result["params_sha256"] == reference["params_sha256"]


def _largest_file(folder) -> Path:
  return max((p for p in Path(os.fspath(folder)).rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate(path: Path) -> None:
  with open(path, "r+b") as f:
    f.truncate(path.stat().st_size // 2)


# ------------------------------------------------------------------ checkpoints alone (no model, fast)


def _state(value):
  w = np.random.default_rng(abs(value)).standard_normal((256, 64)).astype(np.float32)  # incompressible
  return {"params": {"w": w, "b": np.zeros(3, np.float32)},
          "key": jax.random.key(0)}


def test_restore_walks_back_past_a_truncated_checkpoint(tmp_path):
  from migu_jax.cl import checkpoint, faults

  with checkpoint.RunCheckpoints(tmp_path / "checkpoints", keep=3) as saved:
    for value in range(3):
      saved.save(_state(value), {"task": 0, "step": value})
  _truncate(_largest_file(tmp_path / "checkpoints" / "2"))
  with checkpoint.RunCheckpoints(tmp_path / "checkpoints", keep=3) as saved:
    with pytest.warns(faults.FaultWarning, match=r"checkpoints/2 is damaged \(ValueError: .*\), moved to "
                      r".*damaged_checkpoints/2\. Resuming from checkpoint 1 \(task 1, step 1\)"):
      state, meta = saved.restore(_state(-1))
    assert meta["step"] == 1 and np.array_equal(state["params"]["w"], _state(1)["params"]["w"])
    assert saved.latest() == 1 and saved.save(_state(3), {"task": 0, "step": 3}) == 2  # numbering goes on
  assert (tmp_path / "damaged_checkpoints" / "2").is_dir()


def test_every_checkpoint_damaged_and_other_settings_are_told_apart(tmp_path):
  from migu_jax.cl import checkpoint

  with checkpoint.RunCheckpoints(tmp_path / "checkpoints") as saved:
    saved.save(_state(0), {"task": 0, "step": 0})
    other = {"params": {"w": np.zeros((256, 16), np.float32), "b": np.zeros(3, np.float32)}, "key": jax.random.key(0)}
    with pytest.raises(checkpoint.CheckpointMismatch, match=r"params\.w: stored float32\[256, 64\], this run "
                       r"float32\[256, 16\]") as mismatch:
      saved.restore(other)
    assert "delete" not in str(mismatch.value)
  (tmp_path / "checkpoints" / "0" / "meta" / "metadata").write_text("{trunc")
  with checkpoint.RunCheckpoints(tmp_path / "checkpoints") as saved:
    with pytest.raises(checkpoint.CheckpointDamaged, match="No checkpoint in .* reads completely: 0: "):
      saved.restore(_state(0))


def test_failing_save_names_the_folder_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
  from migu_jax.cl import checkpoint

  original = ocp.JsonCheckpointHandler._save_fn

  async def full_disk(self, *args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  with checkpoint.RunCheckpoints(tmp_path / "checkpoints") as saved:
    saved.save(_state(0), {"task": 0, "step": 0})
    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", full_disk)
    with pytest.raises(checkpoint.CheckpointSaveError, match=r"Could not write checkpoint 1 in "
                       rf"{tmp_path}/checkpoints \(OSError: .*No space left.*checkpoint 0, the newest complete "
                       "one, is intact"):
      saved.save(_state(1), {"task": 0, "step": 1})
    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", original)
  with checkpoint.RunCheckpoints(tmp_path / "checkpoints") as saved:
    state, meta = saved.restore(_state(-1))
    assert meta["step"] == 0 and saved.latest() == 0
    assert np.array_equal(state["params"]["w"], _state(0)["params"]["w"])


# ------------------------------------------------------------------------------------ the lock


def _dead_pid() -> int:
  proc = subprocess.Popen(["true"])
  proc.wait()
  return proc.pid


def _write_lock(folder: Path, pid: int, host: str, refreshed: float) -> Path:
  from migu_jax.cl import faults

  path = folder / faults.LOCK_NAME
  path.write_text(json.dumps({"pid": pid, "host": host, "started": "2025-01-01T00:00:00", "refreshed": refreshed}))
  return path


def test_output_lock_refuses_a_live_holder_and_takes_over_stale_ones(tmp_path):
  from migu_jax.cl import faults

  with faults.output_lock(tmp_path):
    holder = json.loads((tmp_path / faults.LOCK_NAME).read_text())
    assert (holder["pid"], holder["host"]) == (os.getpid(), socket.gethostname())
    with faults.output_lock(tmp_path):  # nested in one process: shared
      pass
    assert (tmp_path / faults.LOCK_NAME).exists()
    with pytest.raises(faults.OutputLocked, match=rf"is in use by another run \(pid {os.getpid()} on host "
                       rf"{socket.gethostname()}, started .*choose another output folder"):
      faults.OutputLock(tmp_path).acquire()  # another holder in the same folder
  assert not (tmp_path / faults.LOCK_NAME).exists()

  _write_lock(tmp_path, os.getpid(), "elsewhere", time.time())  # alive (refreshed now) on another host
  with pytest.raises(faults.OutputLocked, match="pid .* on host elsewhere"):
    faults.OutputLock(tmp_path).acquire()
  _write_lock(tmp_path, _dead_pid(), socket.gethostname(), time.time())
  with pytest.warns(faults.FaultWarning, match=r"took over the lock of pid \d+ .*is no longer running"):
    faults.OutputLock(tmp_path).acquire().release()
  _write_lock(tmp_path, 12345, "elsewhere", time.time() - 1000)
  with pytest.warns(faults.FaultWarning, match=r"on host elsewhere.*not refreshed for 1000 s"):
    lock = faults.OutputLock(tmp_path, heartbeat_s=0.05).acquire()
  before = json.loads(lock.path.read_text())["refreshed"]
  time.sleep(0.3)
  assert json.loads(lock.path.read_text())["refreshed"] > before  # the heartbeat keeps it fresh
  lock.release()
  assert not lock.path.exists()


def _cli(*args, **popen):
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
  return subprocess.Popen([sys.executable, "-m", "migu_jax.cli", *args], cwd=REPO, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def _clean(stderr: str) -> None:
  assert "Traceback" not in stderr and "Event loop is closed" not in stderr and "Exception ignored" not in stderr, stderr


def test_second_process_on_an_output_folder_is_refused(tiny_models, tmp_path):
  from migu_jax.cl import faults

  with faults.output_lock(tmp_path):  # this process is the first one
    proc = _cli("run", "--model", tiny_models["bert"], "--data-dir", str(DATA), "--tasks", "amazon",
                "--output", str(tmp_path), "--no-progress")
    out, err = proc.communicate(timeout=120)
  assert proc.returncode == 2, out + err
  assert f"is in use by another run (pid {os.getpid()} on host {socket.gethostname()}, started" in err
  assert len(err.strip().splitlines()) == 1
  _clean(err)
  assert not (tmp_path / "migu").exists()  # the second process wrote nothing


# ----------------------------------------------------------------------------- runs (tiny BERT)


def test_killed_then_newest_checkpoint_truncated_resumes_bit_identical(tiny_models, tmp_path, uninterrupted_run):
  from migu_jax.cl import faults, runner

  cfg = resumable_config(tiny_models, tmp_path)
  with pytest.raises(Killed):
    runner.run_sequence(cfg, "migu", 0, callbacks=[_kill_at(1, 1)])
  checkpoints = runner.run_folder(cfg, "migu", 0) / "checkpoints"
  newest = max(int(p.name) for p in checkpoints.iterdir())  # the end of task 1 (after step 12 of 14)
  _truncate(_largest_file(checkpoints / str(newest)))
  with pytest.warns(faults.FaultWarning, match=rf"checkpoints/{newest} is damaged .* Resuming from checkpoint "
                    rf"{newest - 1} \(task 1, step 12\)"):
    _same(runner.run_sequence(cfg, "migu", 0), uninterrupted_run)


def test_sigterm_mid_task_saves_at_that_step_and_resumes_bit_identical(tiny_models, tmp_path, uninterrupted_run):
  from migu_jax.cl import checkpoint, faults, runner

  cfg = resumable_config(tiny_models, tmp_path)
  before = signal.getsignal(signal.SIGTERM)
  saved = []
  with pytest.raises(faults.Preempted, match=r"stopped by SIGTERM at migu seed 0, task 1 of 3 \(dbpedia\), "
                     r"step 5; saved checkpoint 2 in .*Run the same command again") as stopped:
    runner.run_sequence(cfg, "migu", 0, callbacks=[_signal_at(0, 4),
                                                   lambda e, i: saved.append(i["step"]) if e == "saved" else None])
  assert stopped.value.exit_code == 143 and saved == [0, 3, 5]  # step 5 is no scheduled save (every 3)
  assert signal.getsignal(signal.SIGTERM) is before  # the handler is the run's only
  with checkpoint.RunCheckpoints(runner.run_folder(cfg, "migu", 0) / "checkpoints") as kept:
    assert (kept.read_meta()["task"], kept.read_meta()["step"]) == (0, 5)
  steps = []
  _same(runner.run_sequence(cfg, "migu", 0, callbacks=[lambda e, i: steps.append(i["step"]) if e == "step"
                                                      else None]), uninterrupted_run)
  assert steps[0] == 5  # nothing replayed, nothing skipped


def test_failing_save_in_a_run_stops_it_and_the_resume_is_bit_identical(tiny_models, tmp_path, uninterrupted_run,
                                                                         monkeypatch):
  from migu_jax.cl import checkpoint, runner

  cfg = resumable_config(tiny_models, tmp_path)
  saves = []
  original = ocp.JsonCheckpointHandler._save_fn

  async def failing_write(self, *args, **kwargs):
    saves.append(1)
    if len(saves) == 3:  # initial, step 3, then step 6 fails
      raise PermissionError(errno.EACCES, "Permission denied")
    await original(self, *args, **kwargs)

  monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", failing_write)
  with pytest.raises(checkpoint.CheckpointSaveError, match=r"checkpoint 2 in .*/migu/seed_0/checkpoints "
                     r"\(PermissionError.*checkpoint 1, the newest complete one, is intact"):
    runner.run_sequence(cfg, "migu", 0)
  monkeypatch.undo()
  _same(runner.run_sequence(cfg, "migu", 0), uninterrupted_run)


# ------------------------------------------------------------------ the command, stopped by SIGTERM

LONG = dict(order="dbpedia,amazon", train_per_class=4, task_epochs={"dbpedia": 30}, checkpoint_every=1000,
            magnitude_batches=0)
"""A first task of 210 steps, a second of 3, checkpoints only at task ends."""


@pytest.mark.heavy
def test_sigterm_to_the_command_stops_it_within_30s_and_the_resume_is_bit_identical(tiny_models, tmp_path):
  from migu_jax.cl import checkpoint, runner

  cfg = tiny_config(tiny_models["bert"], tmp_path / "stopped", **LONG)
  args = ["run", "--model", cfg.model, "--data-dir", cfg.data_dir, "--tasks", "dbpedia,amazon", "--methods", "migu",
          "--train-per-class", "4", "--set", f"task_epochs={LONG['task_epochs']!r}", "--max-test", "8",
          "--max-length", "32", "--batch-size", "8", "--lr", "3e-3", "--checkpoint-every", "1000", "--output",
          cfg.output_dir, "--set", "length_buckets=(32,)", "--set", "eval_batch_size=16", "--set",
          "magnitude_batches=0", "--no-progress", "--no-plots"]
  proc = _cli(*args)
  first = runner.run_folder(cfg, "migu", 0) / "checkpoints" / "0"
  deadline = time.time() + 180
  while not first.exists() and proc.poll() is None and time.time() < deadline:  # the initial evaluation's
    time.sleep(0.2)
  time.sleep(1.0)  # into the first task
  sent = time.time()
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=60)
  assert time.time() - sent < 30
  assert proc.returncode == 143, out + err
  assert "migu-jax run: stopped by SIGTERM at migu seed 0, task 1 of 2 (dbpedia), step " in err
  _clean(err)
  with checkpoint.RunCheckpoints(first.parent) as kept:
    meta = kept.read_meta()
  assert meta["task"] == 0 and 0 < meta["step"] < 210, meta  # past the task's start, before its end
  assert f"step {meta['step']}; saved checkpoint 1 in " in err
  whole = runner.run_sequence(tiny_config(tiny_models["bert"], tmp_path / "whole", **LONG), "migu", 0)
  _same(runner.run_sequence(cfg, "migu", 0), whole)


FAILING_SAVE = """
import errno, sys
import numpy as np
import orbax.checkpoint as ocp
from migu_jax import cli
from migu_jax.cl import checkpoint

async def full_disk(self, *args, **kwargs):
  raise OSError(errno.ENOSPC, "No space left on device")

with checkpoint.RunCheckpoints(sys.argv[1]) as saved:
  saved.save({"w": np.zeros(3)}, {"step": 0})
  ocp.JsonCheckpointHandler._save_fn = full_disk
  try:
    saved.save({"w": np.ones(3)}, {"step": 1})
  except checkpoint.CheckpointSaveError as e:
    print(f"migu-jax run: error: {e}", file=sys.stderr, flush=True)
    cli.quiet_after_error()
sys.exit(2)
"""


def test_nothing_follows_the_error_message(tmp_path):
  # Orbax's threads, cut short by the failing save, would log tracebacks at interpreter shutdown.
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
  done = subprocess.run([sys.executable, "-c", FAILING_SAVE, str(tmp_path / "checkpoints")], env=env, text=True,
                        capture_output=True, timeout=120)
  assert done.returncode == 2
  assert done.stderr.rstrip().splitlines()[-1].startswith("migu-jax run: error: Could not write checkpoint 1 in ")
