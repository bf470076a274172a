"""The README's Python example runs as written; the test command runs every docstring example."""

import doctest
import importlib
import re
import tomllib
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
WITH_EXAMPLES = ["migu_jax.magnitudes", "migu_jax.masking", "migu_jax.sharding", "migu_jax.train_step", "migu_jax.lora",
                 "migu_jax.cl.storage", "migu_jax.cl.text", "migu_jax.cl.perplexity", "migu_jax.cl.end_tasks",
                 "migu_jax.cl.objectives", "migu_jax.models.bert.mlm", "migu_jax.models.bert.sharding",
                 "migu_jax.models.llama.sharding", "migu_jax.models.t5.sharding"]
"""Modules whose docstring examples the test command runs (they once had a test of their own each)."""


def test_readme_example_runs():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
  assert blocks, "README.md has no python example"
  namespace: dict = {}
  for block in blocks:
    exec(compile(block, str(README), "exec"), namespace)
  assert namespace["loss"].shape == ()


def test_readme_names_the_commands_ci_runs():
  text = README.read_text()
  ci = (README.parent / ".ci" / "run").read_text()
  test_command = re.search(r"^bash \.ci/setup && (.*pytest.*?)\s*#", text, flags=re.M)
  assert test_command and test_command.group(1).strip() in ci


def test_the_test_command_runs_the_docstring_examples():
  # Run by pytest's doctest collection (pyproject.toml), so `pytest` alone runs every module's examples.
  options = tomllib.loads((README.parent / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
  assert "migu_jax" in options["testpaths"] and "--doctest-modules" in options["addopts"].split()
  for name in WITH_EXAMPLES:
    module = importlib.import_module(name)
    assert any(test.examples for test in doctest.DocTestFinder().find(module)), f"{name} lost its examples"
