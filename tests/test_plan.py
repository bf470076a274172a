"""Planning a run from shapes (migu_jax/plan.py: `migu-jax plan`, experiments/plan_scale.py) on virtual CPU devices.

On 8 devices a tiny Llama's FSDP plan holds an eighth of the replicated plan's parameters and AdamW state per
device (by the specs, and in XLA's argument sizes), and reports FLOPs; the script prints the verdict for a
chip and exits 3 when the plan does not fit.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from migu_jax import plan

REPO = Path(__file__).resolve().parents[1]


def _mesh():
  return jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def test_fsdp_plan_holds_an_eighth_of_the_state():
  cfg = plan.llama_config("tiny", num_hidden_layers=1, dtype=jnp.bfloat16)
  fsdp = plan.plan_train_step(cfg, _mesh(), strategy="fsdp", batch_size=8, seq_len=16)
  replicated = plan.plan_train_step(cfg, _mesh(), strategy="replicated", batch_size=8, seq_len=16)
  # Parameters + 2 AdamW moments, float32, every leaf's largest axes divide by 8 except the norms' scales.
  assert replicated["state_bytes"] == 3 * 4 * fsdp["parameters"] + 4  # + AdamW's int32 step count
  assert fsdp["state_bytes"] < replicated["state_bytes"] / 6
  assert fsdp["argument_bytes"] < replicated["argument_bytes"] / 4 and fsdp["flops"] > 0
  assert fsdp["specs"]["mlp/up_proj/kernel"] == "P('data',)"
  assert plan.fits(fsdp, "v5e") == (True, pytest.approx(fsdp["peak_bytes"] / 16e9))


def test_scanned_plan_holds_the_same_state_and_never_splits_the_layer_axis():
  cfg = plan.llama_config("tiny", dtype=jnp.bfloat16)
  unrolled = plan.plan_train_step(cfg, _mesh(), strategy="fsdp", batch_size=8, seq_len=16)
  scanned = plan.plan_train_step(plan.llama_config("tiny", dtype=jnp.bfloat16, scan_layers=True), _mesh(),
                                 strategy="fsdp", batch_size=8, seq_len=16)
  assert scanned["parameters"] == unrolled["parameters"] and scanned["state_bytes"] == unrolled["state_bytes"]
  assert scanned["specs"]["mlp/up_proj/kernel"] == "P(None, 'data')"
  # XLA counts a scanned loop's body once; the plan extrapolates from unrolled 1- and 2-layer compiles.
  assert scanned["flops"] == pytest.approx(unrolled["flops"], rel=0.02)


def test_model_names_and_config_files(tmp_path):
  assert plan.llama_config("llama2-7b").hidden_size == 4096
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64,
                                                    "num_attention_heads": 4, "vocab_size": 100}))
  assert plan.llama_config(str(tmp_path)).hidden_size == 64
  with pytest.raises(ValueError, match="config.json"):
    plan.llama_config("llama9-1t")
  with pytest.raises(ValueError, match="known"):
    plan.fits({"peak_bytes": 1}, "v99")


@pytest.mark.heavy
def test_plan_command_reports_the_verdict(tmp_path):
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
  # The tests' XLA_FLAGS (8 virtual devices, fast compiles) stay: the command replaces the device count.
  out = subprocess.run([sys.executable, "-m", "migu_jax.cli", "plan", "--model", "tiny",
                        "--layers", "1", "--devices", "4", "--seq-len", "16", "--chip", "v4", "--json",
                        str(tmp_path / "plan.json")], env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "mesh {'data': 4}, sharding fsdp" in out.stdout and "fits" in out.stdout
  report = json.loads((tmp_path / "plan.json").read_text())
  assert report["fits"] and report["devices"] == 4 and report["peak_bytes"] > 0


def test_plan_scale_script_is_the_plan_command():
  out = subprocess.run([sys.executable, str(REPO / "experiments" / "plan_scale.py"), "--help"],
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0 and out.stdout.startswith("usage: migu-jax plan") and "--chip" in out.stdout
