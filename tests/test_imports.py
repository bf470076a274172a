"""The package's import graph has no cycle, counting imports inside functions (which hide cycles at runtime); no
test module imports another."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "migu_jax"


def _modules() -> dict[str, Path]:
  modules = {}
  for path in PACKAGE.rglob("*.py"):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return modules


def _within(name: str, modules) -> str | None:
  """The innermost module of the package that ``name`` (a module or an attribute of one) lives in."""
  while name and name not in modules:
    name = name.rpartition(".")[0]
  return name or None


def import_graph() -> dict[str, set[str]]:
  """Module -> the package's modules it imports anywhere in its source (top level or in a function).

  ``from pkg import name`` points at ``pkg.name`` when that is a module, else at ``pkg``. Parent packages,
  which Python imports implicitly, are not edges: only what the source names is.
  """
  modules = _modules()
  graph = {}
  for module, path in modules.items():
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
      if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          parts = package.split(".")[:len(package.split(".")) - node.level + 1]
          base = ".".join(parts + ([node.module] if node.module else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
      else:
        continue
      targets.update(t for t in (_within(n, modules) for n in names) if t and t != module)
    graph[module] = targets
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle of ``graph`` as a list of modules (first == last), or None."""
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state and (cycle := visit(nxt)):
        return cycle
    state[node] = "done"
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state and (cycle := visit(node)):
      return cycle
  return None


def test_graph_sees_function_level_and_relative_imports():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}}
  assert find_cycle(graph) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set()}) is None
  real = import_graph()
  assert "migu_jax.cl.runner" in real["migu_jax.cli"]  # imported inside cli's functions only


def test_migu_jax_has_no_import_cycle():
  cycle = find_cycle(import_graph())
  assert cycle is None, ("import cycle: " + " -> ".join(cycle) + ". Move what both modules need into a "
                         "lower module, or the higher-level function into a module above both.")


def test_no_test_module_imports_another():
  tests = Path(__file__).resolve().parent
  modules = {path.stem for path in tests.glob("test_*.py")}
  for path in sorted(tests.glob("*.py")):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
      if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom) and not node.level:
        names = [node.module or ""]
      else:
        continue
      imported = sorted({name.split(".")[0] for name in names} & modules)
      assert not imported, (f"{path.name} imports {imported}: shared fixtures belong in conftest.py, shared "
                            "helpers in a helper module such as tiny_cl.py")
