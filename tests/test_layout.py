"""The package's layering rules, read from the source: no import cycles, `nn` pure,
torch only in `convert`, `train` and `eval` free of `convert`, public JAX only, no
process re-execution."""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "g2face_jax"


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str) -> set[str]:
  """Every module name `name` imports (top level or inside functions), absolute."""
  path = MODULES[name]
  tree = ast.parse(path.read_text(), str(path))
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      names = [f"{base}.{a.name}" for a in node.names]
      found.update(names)
      if not all(n in MODULES for n in names):  # names defined in `base` itself
        found.add(base)
  return found


def _package_imports(name: str) -> set[str]:
  """The package's own modules that `name` imports (a package counts as its __init__)."""
  return {m for m in _imports(name) if m in MODULES and m != name}


def _cycle() -> list[str] | None:
  """One import cycle among the package's modules, or None."""
  graph = {m: _package_imports(m) for m in MODULES}
  state: dict[str, int] = {}
  stack: list[str] = []

  def visit(m):
    state[m] = 1
    stack.append(m)
    for n in sorted(graph[m]):
      if state.get(n) == 1:
        return stack[stack.index(n):] + [n]
      if n not in state:
        found = visit(n)
        if found:
          return found
    state[m] = 2
    stack.pop()
    return None

  for m in sorted(graph):
    if m not in state:
      found = visit(m)
      if found:
        return found
  return None


def _under(name: str, package: str) -> bool:
  return name == package or name.startswith(package + ".")


def test_no_import_cycles():
  assert _cycle() is None, " -> ".join(_cycle())


@pytest.mark.parametrize("layer", ["g2face_jax.nn"])
def test_nn_imports_nothing_else_of_the_package(layer):
  outside = {m: sorted(i for i in _package_imports(m) if not _under(i, layer)
                       and i != "g2face_jax")
             for m in MODULES if _under(m, layer)}
  assert not {m: i for m, i in outside.items() if i}


def test_torch_only_in_convert():
  users = [m for m in MODULES if any(_under(i, "torch") for i in _imports(m))]
  assert all(_under(m, "g2face_jax.convert") for m in users), users


@pytest.mark.parametrize("layer", ["g2face_jax.train", "g2face_jax.eval"])
def test_training_and_evaluation_read_weights_through_bundles(layer):
  users = [m for m in MODULES if _under(m, layer)
           and any(_under(i, "g2face_jax.convert") for i in _imports(m))]
  assert not users


def test_public_jax_only_and_no_re_execution():
  offenders = []
  for name, path in MODULES.items():
    text = path.read_text()
    if any(_under(i, "jax._src") for i in _imports(name)) or "jax._src" in text:
      offenders.append(f"{name}: jax._src")
    tree = ast.parse(text)
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and node.attr.startswith("exec")
          and isinstance(node.value, ast.Name) and node.value.id == "os"):
        offenders.append(f"{name}: os.{node.attr}")
  assert not offenders


def test_nn_keeps_no_module_state():
  """No `global` statement and no module-level mutable container in `nn`."""
  offenders = []
  for name, path in MODULES.items():
    if not _under(name, "g2face_jax.nn"):
      continue
    tree = ast.parse(path.read_text())
    offenders += [f"{name}: global" for n in ast.walk(tree) if isinstance(n, ast.Global)]
    for node in tree.body:
      value = getattr(node, "value", None)
      if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(
          value, (ast.List, ast.Dict, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp)):
        offenders.append(f"{name}: line {node.lineno}")
  assert not offenders
