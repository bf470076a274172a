"""experiments/accelerator_check.py runs end to end on CPU at a tiny size."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from tiny_cl import DATA

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "accelerator_check.py"


@pytest.mark.heavy
def test_accelerator_check_runs_at_tiny_size(tiny_models, capsys):
  spec = importlib.util.spec_from_file_location("accelerator_check", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  sys.modules["accelerator_check"] = module
  spec.loader.exec_module(module)
  out = module.main(["--tiny", "--model", str(tiny_models["llama"]), "--data-dir", str(DATA)])
  printed = capsys.readouterr().out
  assert "1. MIGU / plain step" in printed and "2. JAX / PyTorch" in printed and "3. order 1" in printed
  assert out["migu"]["ratio"] > 0 and 0.9 < out["migu"]["peak_ratio"] < 1.5
  assert np.array(out["cl"]["result"]["matrix"]).shape == (2, 2) and out["cl"]["wall_s"] > 0
