"""No private API of jax, flax, optax or orbax in the package (issue 23): their `_src` modules,
their private attributes and their internal event and logger names all change without notice
between the versions setup.py allows."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = sorted([*(ROOT / "resnet_jax").rglob("*.py"), *(ROOT / "configs").glob("*.py"),
                  *(ROOT / "benchmarks").glob("*.py"), *(ROOT / "examples").glob("*.py"),
                  *(ROOT / "experiments").glob("*.py")])
LIBRARIES = ("jax", "jaxlib", "flax", "optax", "orbax")
# The standard library's public names that start with an underscore.
PUBLIC_UNDERSCORED = {"_replace", "_asdict", "_fields", "_make", "_exit"}
# (file, use): where a private name is the only way, and why.
ALLOWED: dict[tuple[str, str], str] = {}


def _private(name: str) -> bool:
  return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def defined_names(trees: list[ast.AST]) -> set[str]:
  """The private names our own code defines: functions, classes, attributes it assigns and
  class-level names."""
  names = set()
  for tree in trees:
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        names.add(node.name)
      elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
        names.add(node.attr)
      elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
        names.add(node.id)
      elif isinstance(node, ast.arg):
        names.add(node.arg)
  return {name for name in names if _private(name)}


def private_uses(tree: ast.AST, ours: set[str]) -> list[str]:
  """In one parsed file: imports of a library's private modules or names, private attributes
  that our code never defines (so another library's), and string constants naming a library's
  internal modules or events."""
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found += [f"import {alias.name}" for alias in node.names
                if alias.name.split(".")[0] in LIBRARIES
                and any(_private(part) for part in alias.name.split("."))]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      if node.module.split(".")[0] in LIBRARIES:
        found += [f"from {node.module} import {alias.name}" for alias in node.names
                  if any(_private(part) for part in [*node.module.split("."), alias.name])]
    elif isinstance(node, ast.Attribute) and _private(node.attr):
      if node.attr not in ours and node.attr not in PUBLIC_UNDERSCORED:
        found.append(ast.unparse(node))
    elif isinstance(node, ast.Constant) and isinstance(node.value, str):
      text = node.value
      if any(f"{library}._" in text or (text.startswith(f"/{library}/")
                                        and len(text) > len(library) + 2)
             for library in LIBRARIES):
        found.append(repr(text))
  return found


def test_the_checker_finds_each_kind_of_private_use():
  tree = ast.parse(
      "import jax\nfrom jax._src import xla_bridge\nfrom flax import nnx\nimport logging\n"
      "logging.getLogger('jax._src.xla_bridge')\n"
      "jax.monitoring.register_event_listener(lambda name: name == "
      "'/jax/compilation_cache/cache_hits')\n"
      "class Norm(nnx.BatchNorm):\n  def __call__(self, x):\n    self._ours = self.mean._can_update\n"
      "    return self._ours, self.__class__, x._replace(), '/jax/' in x\n"
      "import optax._src.base\n")
  assert sorted(private_uses(tree, defined_names([tree]))) == sorted([
      "from jax._src import xla_bridge", "import optax._src.base", "'jax._src.xla_bridge'",
      "'/jax/compilation_cache/cache_hits'", "self.mean._can_update"])


def test_no_private_api_of_jax_flax_optax_or_orbax():
  trees = {path.relative_to(ROOT).as_posix(): ast.parse(path.read_text()) for path in SOURCES}
  ours = defined_names(list(trees.values()))
  found = [f"{name}: {use}" for name, tree in trees.items() for use in private_uses(tree, ours)
           if (name, use) not in ALLOWED]
  assert not found, ("private API of another library (use a public one, or justify it in "
                     "ALLOWED):\n" + "\n".join(found))


def test_no_module_reaches_into_another_objects_private_attributes():
  """Within the package, a private name is used only by its own object (`self`, `cls`,
  `super()`) or its own module: another class's behaviour is reached through its public API."""
  found = []
  for path in sorted((ROOT / "resnet_jax").rglob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Attribute) and _private(node.attr):
        base = node.value
        own = (isinstance(base, ast.Name) and base.id in ("self", "cls")) or (
            isinstance(base, ast.Call) and isinstance(base.func, ast.Name)
            and base.func.id == "super")
        if not own:
          found.append(f"{path.relative_to(ROOT).as_posix()}:{node.lineno}: {ast.unparse(node)}")
  assert not found, "\n".join(found)
