"""Every ``migu-jax run --config FILE.py:VARIANT`` command in a config file's docstring loads the Config
that ``experiments/reproduce.py`` runs for that variant (the same settings, the same output folder)."""

import re
import sys
from pathlib import Path

import pytest

from migu_jax import cli

ROOT = Path(__file__).resolve().parents[1]
COMMAND = re.compile(r"migu-jax run --config (experiments/configs/(\w+\.py):(\S+)) --output runs/repro/(\w+)/(\S+)")


def _reproduce():
  sys.path[:0] = [str(ROOT / "experiments"), str(ROOT / "experiments" / "configs")]
  try:
    import reproduce
  finally:
    del sys.path[:2]
  return reproduce


def _commands():
  for path in sorted((ROOT / "experiments" / "configs").glob("*.py")):
    yield from COMMAND.findall(path.read_text())


@pytest.mark.parametrize("command", list(_commands()), ids=lambda c: c[0].split("/")[-1])
def test_a_docstring_command_runs_what_reproduce_runs(command, monkeypatch):
  arg, file, variant, experiment, sub = command
  monkeypatch.chdir(ROOT)
  reproduce = _reproduce()
  assert reproduce.EXPERIMENTS[experiment][0] == file and sub == variant
  expected = reproduce.configs(experiment)[variant].to_dict()
  assert cli.load_config_file(arg) == expected


def test_every_variant_has_its_command():
  found = {(c[1], c[2]) for c in _commands()}
  reproduce = _reproduce()
  files = {file for file, _ in reproduce.EXPERIMENTS.values()}
  for file in files:
    name = next(n for n, (f, _) in reproduce.EXPERIMENTS.items() if f == file)  # its first experiment
    assert {(file, v) for v in reproduce.configs(name)} <= found, file
