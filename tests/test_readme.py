"""The README's Python example runs as written; every core docstring example runs."""

import doctest
import re
from pathlib import Path

import pytest

from migu_jax import magnitudes, masking, sharding, train_step

README = Path(__file__).resolve().parents[1] / "README.md"


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


@pytest.mark.parametrize("module", [magnitudes, masking, sharding, train_step], ids=lambda m: m.__name__)
def test_docstring_examples(module):
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0
