"""experiments/: every config file loads into valid settings; reproduce.py runs an experiment and its
report tabulates exactly the finished runs."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from migu_jax import cli
from migu_jax.cl import runner
from tiny_cl import DATA, TASKS

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def _reproduce():
  spec = importlib.util.spec_from_file_location("reproduce", EXPERIMENTS / "reproduce.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules["reproduce"] = module
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("path", sorted([*(EXPERIMENTS / "configs").glob("*.py"), *(EXPERIMENTS / "tpu").glob("*_pod.py")]),
                         ids=lambda p: p.name)
def test_every_config_file_gives_valid_settings(path):
  module = cli.load_config_module(str(path))
  configs = [runner.Config.from_dict(cli.load_config_file(str(path)))]
  if hasattr(module, "get_configs"):
    configs += list(module.get_configs().values())
  for cfg in configs:
    assert runner.Config.from_dict(cfg.to_dict()) == cfg
    assert module.__doc__ and "Command" in module.__doc__ or path.name == "cpu_scale.py"


def test_reproduce_names_only_existing_configs():
  reproduce = _reproduce()
  for name in reproduce.EXPERIMENTS:
    assert reproduce.configs(name), name


@pytest.mark.heavy
def test_reproduce_runs_an_experiment_and_reports_its_runs(tiny_models, tmp_path):
  reproduce = _reproduce()
  root, out = tmp_path / "runs", tmp_path / "results"
  tiny = dict(model=tiny_models["bert"], data_dir=str(DATA), order=TASKS, train_per_class=2, max_test=8,
              max_length=32, length_buckets=(32,), batch_size=8, eval_batch_size=16, learning_rate=3e-3,
              magnitude_batches=1)
  reproduce.run(["layers"], root, seeds=(0, 1), changes=tiny, compile_cache=False)
  summary = reproduce.report(root, out).read_text()

  runs = reproduce.runs_of(root, "layers", "attention", "migu")
  assert [r["seed"] for r in runs] == [0, 1]
  aa = [100 * r["metrics"]["average_accuracy"] for r in runs]
  row = next(line for line in summary.splitlines() if line.startswith("| attention only |"))
  assert row.split(" | ")[1] == f"{np.mean(aa):.1f} ± {np.std(aa):.1f}" and row.split(" | ")[5] == "0,1 |"
  # What did not run is said so, not left blank or made up.
  not_run = [line for line in summary.splitlines() if line.startswith("Not run: ")]
  assert any("all layers (MIGU)" in line for line in not_run) and any("gradient magnitude" in line for line in not_run)
  assert not any(line.startswith("| all layers (MIGU) |") for line in summary.splitlines())
  assert (out / "ratio_sweep.png").exists() and (out / "lr_sweep.png").exists()
  assert json.loads((root / "layers" / "ffn" / "results.json").read_text())["config"]["mask_targets"] == ["ffn"]
