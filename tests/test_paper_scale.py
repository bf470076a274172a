"""experiments/paper_scale.py: the probe, the wall-time estimate and the run, at a tiny size on CPU."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tiny_cl import DATA

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "paper_scale.py"


def _module():
  spec = importlib.util.spec_from_file_location("paper_scale", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  sys.modules["paper_scale"] = module
  spec.loader.exec_module(module)
  return module


def test_the_estimate_adds_training_evaluation_and_compilation():
  ps = _module()
  cfg = ps.runner.Config(methods=("seqft", "migu"), seeds=(0, 1, 2), also_eval=("options",))
  counts = {"train_tokens": {"a": 1000, "b": 3000}, "test_tokens": {"a": 100, "b": 300}}
  plan = ps.estimate(cfg, counts, {"train_tokens_per_s": 100.0, "eval_tokens_per_s": 40.0, "compile_s": 5.0})
  # training 4000/100 = 40 s; 2 modes x 2 evaluations x 400/40 = 40 s; compile 5 s; 6 runs; initial 2 x 10 s
  assert plan["per_run_s"] == pytest.approx(85.0) and plan["runs"] == 6
  assert plan["total_s"] == pytest.approx(6 * 85.0 + 20.0)


def test_paper_scale_dry_run_estimates_then_trains(tiny_models, tmp_path, capsys):
  ps = _module()
  out = tmp_path / "paper"
  args = ["--tiny", "--model", str(tiny_models["llama"]), "--data-dir", str(DATA), "--order", "dbpedia,amazon",
          "--methods", "migu", "--output", str(out), "--no-progress"]
  assert ps.main(args) == 0
  printed = capsys.readouterr().out
  assert "expected:" in printed and "done in" in printed
  saved = json.loads((out / "estimate.json").read_text())
  assert saved["counts"]["steps"] == {"dbpedia": 7, "amazon": 3}  # 28 and 10 records, batch 4
  assert saved["estimate"]["runs"] == 1 and saved["estimate"]["total_s"] > 0
  results = json.loads((out / "results.json").read_text())
  assert set(results["comparison"]) == {"migu"}
  run = json.loads((out / "migu" / "seed_0" / "result.json").read_text())
  assert run["eval_mode"] == "generate" and len(run["matrix"]) == 2
