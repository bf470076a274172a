"""The migu-jax command: run / eval / report on the tiny random BERT, and its errors."""

import importlib.metadata
import json

import pytest

from migu_jax import cli
from tiny_cl import DATA, TASKS


def _run_args(model, out, *extra):
  # The settings of tiny_cl.tiny_config, so the runs compile the programs of the runner tests.
  return ["run", "--model", model, "--data-dir", str(DATA), "--tasks", TASKS, "--train-per-class", "2",
          "--max-test", "8", "--max-length", "32", "--batch-size", "8", "--lr", "3e-3", "--output", str(out),
          "--set", "length_buckets=(32,)", "--set", "eval_batch_size=16", "--set", "magnitude_batches=1",
          "--no-progress", *extra]


def test_run_report_and_eval_write_results(tiny_models, tmp_path, capsys):
  out = tmp_path / "exp"
  assert cli.main(_run_args(tiny_models["bert"], out, "--methods", "seqft,migu")) == 0
  printed = capsys.readouterr().out
  assert "| seqft |" in printed and "| migu |" in printed and "migu: AA" in printed and "BWT" in printed
  results = json.loads((out / "results.json").read_text())
  assert [r["method"] for r in results["runs"]] == ["seqft", "migu"]
  assert results["config"]["learning_rate"] == 3e-3
  assert (out / "results.md").exists() and (out / "migu" / "seed_0" / "result.json").exists()
  for name in ("matrix_seqft_seed0.png", "matrix_migu_seed0.png", "magnitudes_initial.png", "overlap.png"):
    assert (out / "plots" / name).stat().st_size > 1000, name

  rep = tmp_path / "report"
  assert cli.main(["report", str(out), "--out", str(rep)]) == 0
  assert "| migu |" in capsys.readouterr().out
  assert (rep / "report.md").exists() and (rep / "exp" / "overlap.png").exists()

  run_dir = out / "migu" / "seed_0"
  assert cli.main(["eval", str(run_dir), "--no-progress"]) == 0  # the final checkpoint on the run's tasks
  evaluated = json.loads((run_dir / "eval.json").read_text())
  assert evaluated["checkpoint"] == {"task": 3, "step": 0}
  assert evaluated["accuracies"] == results["runs"][1]["matrix"][-1]
  assert cli.main(["eval", str(run_dir), "--tasks", "sst-2", "--max-test", "4", "--no-progress"]) == 0
  evaluated = json.loads((run_dir / "eval.json").read_text())
  assert evaluated["tasks"] == ["sst-2"] and len(evaluated["accuracies"]) == 1
  assert "| migu seed 0 | task 3 step 0 |" in capsys.readouterr().out


def test_config_file_and_flag_override(tiny_models, tmp_path):
  config = tmp_path / "tiny.py"
  config.write_text(
      '"""Tiny config."""\n'
      "def get_config():\n"
      f"  return dict(model={tiny_models['bert']!r}, data_dir={str(DATA)!r}, order='amazon', methods=('seqft',),\n"
      "              train_per_class=2, max_test=4, max_length=32, length_buckets=(32,), batch_size=8,\n"
      "              magnitude_batches=0, progress=False, output_dir='unused')\n")
  args = cli.parser().parse_args(["run", "--config", str(config), "--output", str(tmp_path / "o"), "--ratio", "0.5"])
  cfg = cli.build_config(args)
  assert (cfg.order, cfg.methods, cfg.ratio, cfg.output_dir) == ("amazon", ("seqft",), 0.5, str(tmp_path / "o"))


def test_errors_name_the_problem(tiny_models, tmp_path, capsys):
  assert cli.main(_run_args(tiny_models["bert"], tmp_path, "--methods", "seqft,ewc")) == 2
  assert "Unknown method 'ewc'" in capsys.readouterr().err
  args = _run_args(tiny_models["bert"], tmp_path, "--methods", "migu")
  args[args.index("--tasks") + 1] = "dbpedia,nosuchtask"
  assert cli.main(args) == 2
  assert "Unknown task 'nosuchtask'" in capsys.readouterr().err
  assert cli.main(["report", str(tmp_path / "missing")]) == 2
  assert "not a finished experiment folder" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    cli.main(["run", "--config", str(tmp_path / "nope.py")])


def test_console_script_is_declared():
  scripts = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")}
  assert scripts.get("migu-jax") == "migu_jax.cli:main"


def test_config_file_variant_is_get_configs_entry(tmp_path):
  from migu_jax import cli
  file = tmp_path / "exp.py"
  file.write_text("from migu_jax.cl.runner import Config\n"
                  "def get_configs():\n  return {'a': Config(ratio=0.5), 'b': Config(ratio=0.6)}\n"
                  "def get_config():\n  return get_configs()['a']\n")
  assert cli.split_config_arg(f"{file}:b") == (str(file), "b")
  assert cli.split_config_arg(str(file)) == (str(file), None)
  assert cli.load_config_file(f"{file}:b")["ratio"] == 0.6
  assert cli.load_config_file(str(file))["ratio"] == 0.5
  with pytest.raises(SystemExit, match=r"no variant 'c'.*\['a', 'b'\]"):
    cli.load_config_file(f"{file}:c")
