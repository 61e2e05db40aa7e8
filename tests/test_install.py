"""setup.py declares exactly what the code imports, in the extra that needs it; the wheel holds
the configs, and trains by a config's name outside the checkout.

`pip install resnet_jax` is the models alone (no TensorFlow); `[train]` adds the trainer, its
data pipelines and the report; `[test]` and `[benchmark]` add theirs.
"""
import ast
import os
import pathlib
import platform
import re
import runpy
import shutil
import site
import subprocess
import sys
import sysconfig
import types
import zipfile

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = pathlib.Path(__file__).resolve().parents[1]
# The library (`resnet_jax.models`) installs alone; the rest of the package is the trainer's, but
# for the benchmarks'.
CORE_MODULES = {"__init__", *(f"models/{path.stem}" for path in (REPO / "resnet_jax" / "models").glob("*.py"))}
BENCHMARK_MODULES = {"tools/benchmark", "tools/input_benchmark"}
# Readers of formats the user brings, each imported only where it is read, with an error that
# says what to install.
OPTIONAL_IMPORTS = {"models/pretrained": {"keras", "torch"}}
# Imported name -> the distributions that provide it.
DISTRIBUTIONS = {
    "absl": {"absl-py"}, "etils": {"etils"}, "flax": {"flax"}, "grain": {"grain"},
    "jax": {"jax"}, "keras": {"keras"}, "matplotlib": {"matplotlib"},
    "ml_collections": {"ml-collections"}, "numpy": {"numpy"}, "optax": {"optax"},
    "orbax": {"orbax-checkpoint"}, "packaging": {"packaging"}, "PIL": {"pillow"},
    "pytest": {"pytest"},
    "requests": {"requests"}, "tensorboardX": {"tensorboardx"},
    "tensorflow": {"tensorflow", "tensorflow-cpu"}, "tensorflow_datasets": {"tensorflow-datasets"},
    "torch": {"torch"},
}
FIRST_PARTY = {"resnet_jax", "configs", "experiments", "processes", "torchvision_resnet",
               "akamaster_resnet", "torch_twins", "conftest"}
# Declared and never imported by name: TFDS's dataset builders import importlib_resources
# without declaring it; pytest loads its plugins.
UNIMPORTED = {"importlib-resources", "pytest-xdist", "pytest-timeout",
              # cpu_kernels loads oneDNN's library from this distribution's files.
              "onednn-cpu-gomp"}
# The files setup.py builds the wheel from.
WHEEL_SOURCES = ("setup.py", "pyproject.toml", "README.md", "LICENSE", "resnet_jax", "configs")


def copy_sources(destination: pathlib.Path) -> pathlib.Path:
  """The package's sources, copied to `destination`: a build in the checkout would leave build/
  there, whose stale files a later build ships, and an install there would rewrite the
  extension that other tests' processes have loaded."""
  destination.mkdir()
  for name in WHEEL_SOURCES:
    (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(REPO / name, destination / name)
  return destination


@pytest.fixture(scope="module")
def setup_arguments() -> dict:
  """The arguments setup.py gives setuptools.setup."""
  arguments = {}
  fake = types.ModuleType("setuptools")
  fake.setup, fake.find_packages = arguments.update, lambda **kwargs: []
  fake.Extension = lambda name, sources, **kwargs: types.SimpleNamespace(name=name, sources=sources,
                                                                         **kwargs)
  with pytest.MonkeyPatch.context() as patch:
    patch.setitem(sys.modules, "setuptools", fake)
    patch.chdir(REPO)
    runpy.run_path("setup.py")
  return arguments


@pytest.fixture(scope="module")
def requirements(setup_arguments) -> dict[str, list[Requirement]]:
  """setup.py's requirements by extra ("" for install_requires), as setuptools receives them."""
  arguments = setup_arguments
  extras = {"": arguments["install_requires"], **arguments["extras_require"]}
  return {extra: [Requirement(line) for line in lines] for extra, lines in extras.items()}


def declared(requirements, *extras: str) -> set[str]:
  return {canonicalize_name(r.name) for extra in extras for r in requirements[extra]}


def imports(path: pathlib.Path) -> tuple[set[str], set[str]]:
  """Third-party names `path` imports at module level, and inside functions only."""
  module_level, in_functions = set(), set()

  def visit(node, in_function):
    for child in ast.iter_child_nodes(node):
      inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
      names = []
      if isinstance(child, ast.Import):
        names = [alias.name for alias in child.names]
      elif isinstance(child, ast.ImportFrom) and child.level == 0:
        names = [child.module]
      elif (isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute)
            and child.func.attr == "importorskip"):
        names = [child.args[0].value]
      (in_functions if inside else module_level).update(name.split(".")[0] for name in names)
      visit(child, inside)

  visit(ast.parse(path.read_text()), False)
  third_party = lambda names: names - set(sys.stdlib_module_names) - FIRST_PARTY
  return third_party(module_level), third_party(in_functions - module_level)


def distributions(names: set[str]) -> set[str]:
  unknown = names - DISTRIBUTIONS.keys()
  assert not unknown, f"add {unknown} to DISTRIBUTIONS and declare it in setup.py"
  return set().union(*(DISTRIBUTIONS[name] for name in names))


def package_modules():
  """Each module of the package as `resnet_jax/{name}.py`, the configs (resnet_jax.configs)
  among them, with the extra it needs."""
  for path in sorted([*(REPO / "resnet_jax").rglob("*.py"), *(REPO / "configs").glob("*.py")]):
    name = path.relative_to(REPO).with_suffix("").as_posix().removeprefix("resnet_jax/")
    extra = "" if name in CORE_MODULES else "benchmark" if name in BENCHMARK_MODULES else "train"
    yield path, name, extra


def test_each_module_imports_only_what_its_extra_declares(requirements):
  for path, name, extra in package_modules():
    allowed = declared(requirements, "", extra)
    module_level, in_functions = imports(path)
    for imported in module_level | (in_functions - OPTIONAL_IMPORTS.get(name, set())):
      assert distributions({imported}) & allowed, (
          f"resnet_jax/{name}.py imports {imported}, which "
          f"{f'the {extra!r} extra' if extra else 'install_requires'} does not declare")
  for name, optional in OPTIONAL_IMPORTS.items():
    assert optional <= imports(REPO / "resnet_jax" / f"{name}.py")[1], (
        f"{optional} must be imported only inside resnet_jax/{name}.py's functions")


def test_tests_and_examples_import_only_what_the_test_extra_declares(requirements):
  allowed = declared(requirements, "", "test")
  for path in sorted([*(REPO / "tests").glob("*.py"), *(REPO / "examples").glob("*.py")]):
    module_level, in_functions = imports(path)
    missing = {name for name in module_level | in_functions
               if not distributions({name}) & allowed}
    assert not missing, f"{path.relative_to(REPO)} imports {missing}, undeclared in [test]"


def test_every_declared_requirement_is_imported(requirements):
  imported = {extra: set() for extra in ("", "train", "benchmark", "test")}
  for path, name, extra in package_modules():
    names = set().union(*imports(path))
    imported[extra] |= distributions(names)
    imported["test"] |= distributions(names)
  for path in [*(REPO / "tests").glob("*.py"), *(REPO / "examples").glob("*.py")]:
    imported["test"] |= distributions(set().union(*imports(path)))
  for path in (REPO / "benchmarks").glob("*.py"):
    imported["benchmark"] |= distributions(set().union(*imports(path)))
  imported["benchmark"] |= imported["train"]
  for extra, names in imported.items():
    unused = declared(requirements, extra) - names - UNIMPORTED - imported[""]
    assert not unused, f"{extra or 'install_requires'} declares {unused}, which nothing imports"
  assert declared(requirements, "") & {"tensorflow", "tensorflow-cpu", "tensorflow-datasets"} == set()


@pytest.mark.parametrize("machine,tensorflow", [("x86_64", "tensorflow-cpu"),
                                                ("aarch64", "tensorflow")])
def test_one_tensorflow_for_each_machine(requirements, machine, tensorflow):
  # tensorflow-cpu has no Linux aarch64 wheel (pip download --platform manylinux_2_27_aarch64).
  chosen = [r.name for r in requirements["train"] if r.name.startswith("tensorflow")
            and (r.marker is None or r.marker.evaluate({"platform_machine": machine}))]
  assert sorted(chosen) == sorted([tensorflow, "tensorflow-datasets"])


@pytest.mark.slow
def test_a_models_only_install_brings_no_tensorflow(tmp_path):
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=300)
  python = str(venv / "bin" / "python")
  pip = [python, "-m", "pip", "--disable-pip-version-check", "-q"]
  probe = subprocess.run([*pip, "download", "--no-deps", "-d", tmp_path / "probe", "etils"],
                         capture_output=True, text=True, timeout=600)
  if probe.returncode:
    pytest.skip(f"pip cannot reach a package index: {probe.stderr.strip()[-500:]}")
  install = subprocess.run([*pip, "install", "--no-compile", copy_sources(tmp_path / "source")],
                           capture_output=True, text=True, timeout=1800,
                           env=dict(os.environ, PIP_NO_INPUT="1"))
  assert install.returncode == 0, install.stderr[-3000:]
  check = subprocess.run(
      [python, "-c", "import importlib.util, sys\n"
       "from flax import nnx\n"
       "from resnet_jax import models\n"
       "model = models.create('cifar_resnet20', num_classes=10, rngs=nnx.Rngs(0))\n"
       "print(models.count_params(model))\n"
       "print(sorted(m for m in ('tensorflow', 'tensorflow_datasets', 'ml_collections', 'optax')"
       " if importlib.util.find_spec(m) is None))\n"],
      cwd=tmp_path, capture_output=True, text=True, timeout=600, env={"PATH": os.environ["PATH"]})
  assert check.returncode == 0, check.stderr[-3000:]
  # 0.27M parameters (Table 6); nothing of the trainer's installed but optax, which flax needs.
  assert check.stdout.split("\n")[:2] == ["269722", "['ml_collections', 'tensorflow', "
                                          "'tensorflow_datasets']"], check.stdout


def test_the_changelog_opens_with_the_version(setup_arguments):
  heading = re.search(r"^## (\S+)", (REPO / "CHANGELOG.md").read_text(), re.M)
  assert heading and heading.group(1) == setup_arguments["version"]


@pytest.mark.slow
def test_the_wheel_holds_the_configs_and_trains_by_a_config_name_outside_the_checkout(tmp_path):
  source = copy_sources(tmp_path / "source")
  pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
  build = subprocess.run([*pip, "wheel", "--no-deps", "-w", tmp_path / "dist", source],
                         capture_output=True, text=True, timeout=600)
  assert build.returncode == 0, build.stderr[-3000:]
  (wheel,) = (tmp_path / "dist").glob("resnet_jax-*.whl")
  names = set(zipfile.ZipFile(wheel).namelist())
  assert {f"resnet_jax/configs/{path.name}" for path in (REPO / "configs").glob("*.py")} <= names
  assert "resnet_jax/py.typed" in names
  assert any(re.fullmatch(r"resnet_jax-[^/]+\.dist-info/(licenses/)?LICENSE", n) for n in names)
  assert not [n for n in names if not n.startswith("resnet_jax")], names
  # The oneDNN extension, built for this Python alone, where pyproject.toml's build has its
  # headers (x86-64 Linux).
  extensions = [n for n in names if n.endswith(".so")]
  if sys.platform == "linux" and platform.machine() == "x86_64":
    assert extensions == [f"resnet_jax/models/_onednn{sysconfig.get_config_var('EXT_SUFFIX')}"]

  # A fresh venv holding the wheel, installed as a user installs it; its dependencies are this
  # environment's, through a .pth line, which adds their folders to sys.path without running
  # the .pth files there: an editable install of the checkout stays out.
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=300)
  python = str(venv / "bin" / "python")
  site_packages = subprocess.run(
      [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
      capture_output=True, text=True, check=True, timeout=60).stdout.strip()
  (pathlib.Path(site_packages) / "dependencies.pth").write_text(
      "\n".join(site.getsitepackages()) + "\n")
  install = subprocess.run([*pip, "--python", python, "install", "--no-deps", "--no-compile",
                            wheel], capture_output=True, text=True, timeout=600)
  assert install.returncode == 0, install.stderr[-3000:]

  run = tmp_path / "run"
  run.mkdir()
  environment = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
  where = subprocess.run(
      [python, "-c", "import importlib.util, resnet_jax\n"
       "print(resnet_jax.__file__, importlib.util.find_spec('configs'))"],
      cwd=run, capture_output=True, text=True, timeout=60, env=environment)
  assert where.stdout.split() == [f"{site_packages}/resnet_jax/__init__.py", "None"], where
  smoke = subprocess.run(
      [python, "-m", "resnet_jax.main", "--config=cifar_resnet20:smoke",
       "--config.model=cifar_resnet8", "--config.num_train_steps=2", "--config.lr_boundaries=(1,)",
       "--config.eval_every_steps=2", "--config.checkpoint_every_steps=2", f"--workdir={run}/w"],
      cwd=run, capture_output=True, text=True, timeout=600, env=environment)
  assert smoke.returncode == 0, smoke.stderr[-3000:]
  assert "done: 2 steps" in smoke.stderr
