"""Exact resume: a run killed mid-task or mid-save and started again ends bit-identical to an uninterrupted one."""

import json

import numpy as np
import orbax.checkpoint as ocp
import pytest

from tiny_cl import resumable_config, tiny_config


class Killed(Exception):
  """Stands for the process dying: nothing in memory survives the restart."""


def _kill_at(task, step):
  def callback(event, info):
    if event == "step" and (info["task"], info["step"]) == (task, step):
      raise Killed(f"task {task} step {step}")
  return callback


def _same(result, reference):
  assert result["matrix"] == reference["matrix"]
  assert result["initial"] == reference["initial"]
  assert result["params_sha256"] == reference["params_sha256"]
  assert result["steps"] == reference["steps"] == [14, 4, 4]


def test_killed_mid_task_resumes_bit_identical(tiny_models, tmp_path, uninterrupted_run):
  from migu_jax.cl import report, runner

  cfg = resumable_config(tiny_models, tmp_path)
  folder = runner.run_folder(cfg, "migu", 0)
  with pytest.raises(Killed):
    runner.run_sequence(cfg, "migu", 0, callbacks=[_kill_at(0, 10)])  # last save at step 9
  assert not (folder / "result.json").exists()  # nothing half-run is reported
  with pytest.raises(FileNotFoundError, match="not a finished experiment folder"):
    report.load_results(tmp_path)
  steps = []
  with pytest.raises(Killed):
    runner.run_sequence(cfg, "migu", 0, callbacks=[lambda e, i: steps.append((i["task"], i["step"]))
                                                   if e == "step" else None, _kill_at(2, 1)])
  assert steps[0] == (0, 9)  # resumed at the checkpointed step: nothing replayed twice, nothing skipped
  _same(runner.run_sequence(cfg, "migu", 0), uninterrupted_run)


def test_killed_mid_save_keeps_last_good_checkpoint(tiny_models, tmp_path, uninterrupted_run, monkeypatch):
  from migu_jax.cl import checkpoint, runner

  cfg = resumable_config(tiny_models, tmp_path)
  saves = []
  original = ocp.JsonCheckpointHandler._save_fn  # writes the meta item's file

  async def dying_write(self, *args, **kwargs):
    saves.append(1)
    await original(self, *args, **kwargs)  # the meta file is on disk, the checkpoint not finalized
    if len(saves) == 4:  # initial, steps 3, 6, 9 of task 0 -> dies while saving step 9
      raise Killed("during save")

  monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", dying_write)
  with pytest.raises(Killed):
    runner.run_sequence(cfg, "migu", 0)
  monkeypatch.undo()
  saved = checkpoint.RunCheckpoints(runner.run_folder(cfg, "migu", 0) / "checkpoints")
  meta = saved.read_meta()
  assert (meta["task"], meta["step"]) == (0, 6)  # the partial save of step 9 is not the latest
  saved.close()
  _same(runner.run_sequence(cfg, "migu", 0), uninterrupted_run)


def test_resume_with_other_settings_is_refused(tiny_models, tmp_path):
  from migu_jax.cl import runner

  cfg = resumable_config(tiny_models, tmp_path)
  with pytest.raises(Killed):
    runner.run_sequence(cfg, "migu", 0, callbacks=[_kill_at(0, 4)])
  with pytest.raises(ValueError, match="learning_rate: 0.003 -> 0.1"):
    runner.run_sequence(cfg.replace(learning_rate=0.1), "migu", 0)
  config = json.loads((runner.run_folder(cfg, "migu", 0) / "config.json").read_text())
  assert config["method"] == "migu" and np.isclose(config["learning_rate"], 3e-3)


def test_resume_checks_settings_and_counts_later_added_ones_as_their_defaults(tmp_path):
  from migu_jax.cl import runner

  current = runner._identity(runner.Config(), "migu", 0)
  older = {k: v for k, v in current.items() if k != "mask_targets"}  # written before the setting existed
  runner._check_identity(older, current, tmp_path)
  with pytest.raises(ValueError, match="mask_targets"):
    runner._check_identity(older, runner._identity(runner.Config(mask_targets=("ffn",)), "migu", 0), tmp_path)
  with pytest.raises(ValueError, match=r"learning_rate: 5e-05 -> 0.001"):
    runner._check_identity(current, runner._identity(runner.Config(learning_rate=1e-3), "migu", 0), tmp_path)


@pytest.mark.parametrize("method", ["random", "fisher_mask", "migu_lora", "migu_replay"])
def test_methods_with_more_state_resume_bit_identical(tiny_models, tmp_path, method):
  # The random mask's PRNG key, Fisher's moving averages, LoRA factors and the replay mix all travel
  # through the checkpoint: killed in the middle of a later task, the run ends as if never stopped.
  from migu_jax.cl import runner

  def config(folder):
    return tiny_config(tiny_models["bert"], folder, methods=(method,), checkpoint_every=2, magnitude_batches=0,
                       epochs=2, replay_fraction=0.25)

  whole = runner.run_sequence(config(tmp_path / "whole"), method, 0)
  cfg = config(tmp_path / "killed")
  with pytest.raises(Killed):
    runner.run_sequence(cfg, method, 0, callbacks=[_kill_at(1, 1)])
  resumed = runner.run_sequence(cfg, method, 0)
  assert resumed["params_sha256"] == whole["params_sha256"]
  assert resumed["matrix"] == whole["matrix"]


def test_a_checkpoint_meta_of_an_older_version_resumes_bit_identical(tiny_models, tmp_path, uninterrupted_run):
  # Checkpoints written before RunState carry fewer keys (no speed, metric, general, also, end_tasks,
  # params_sha256); they resume with those at their defaults, to the same parameters.
  from migu_jax.cl import checkpoint, runner

  cfg = resumable_config(tiny_models, tmp_path)
  with pytest.raises(Killed):
    runner.run_sequence(cfg, "migu", 0, callbacks=[_kill_at(0, 10)])  # last save at step 9
  folder = runner.run_folder(cfg, "migu", 0) / "checkpoints"
  with checkpoint.RunCheckpoints(folder) as saved:
    newest = saved.latest()
  meta_file = folder / str(newest) / "meta" / "metadata"
  meta = json.loads(meta_file.read_text())
  assert (meta["task"], meta["step"]) == (0, 9)
  old = {k: v for k, v in meta.items() if k not in ("speed", "metric", "general", "also", "end_tasks",
                                                    "params_sha256")}
  meta_file.write_text(json.dumps(old))
  _same(runner.run_sequence(cfg, "migu", 0), uninterrupted_run)
