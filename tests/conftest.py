"""Shared test set-up: 8 simulated CPU devices, the shared CIFAR-10 folder, a compilation cache."""
import os

# Must precede the first `import jax` anywhere in the test session: every test
# then runs on 8 real (host-simulated) devices, so sharding is exercised.
# On 2 loaded cores a simulated device can reach a collective long after the
# others; XLA's default 40 s rendezvous limit would abort the process.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_cpu_collective_call_terminate_timeout_seconds=1200 "
                      "--xla_cpu_collective_call_warn_stuck_timeout_seconds=300")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # TensorFlow must never see a GPU.

from resnet_jax.training import cli  # pylint: disable=wrong-import-position

cli.quiet()  # libtpu, where installed, compiles for TPUs here and must not complain of no TPU.

import pathlib

import pytest

# CI (.ci/run) runs the suite in three environments, `--share=3.11|3.12|3.13` each: a test file
# runs whole in the one environment that lists it, and a test marked `every_environment` (one
# whose outcome depends on the versions of Python, jax, flax, optax or orbax: the model, its
# kernels and transforms, the step, checkpoints, config loading) runs in all three. Without
# --share the whole suite runs. tests/test_install.py checks that every test file has a share.
SHARES = {
    # jax 0.10.2, the oldest we support, and PyTorch (its 2.13.0 CPU wheel is for Python 3.11):
    # the PyTorch twins run here only.
    "3.11": (),
    # jax 0.12 with libtpu: the TPU compilation tests run here only.
    "3.12": (),
    "3.13": (),
}

SHARED_CIFAR10 = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg"


def pytest_addoption(parser):
  parser.addoption("--share", choices=sorted(SHARES), help="Run the test files of this CI "
                   "environment and every test marked every_environment (see SHARES).")


def pytest_collection_modifyitems(config, items):
  share = config.getoption("share")
  if share is None:
    return
  kept, deselected = [], []
  for item in items:
    whole_file = item.path.name in SHARES[share]
    (kept if whole_file or item.get_closest_marker("every_environment") else deselected).append(item)
  if deselected:
    config.hook.pytest_deselected(items=deselected)
    items[:] = kept


@pytest.fixture(scope="session")
def cifar10_dir() -> pathlib.Path:
  """The shared CIFAR-10 JPEG folder; CI (RESNET_JAX_REQUIRE_DATA=1) fails instead of skipping."""
  root = pathlib.Path(os.environ.get("RESNET_JAX_CIFAR10_DIR", SHARED_CIFAR10))
  if not (root / "train").is_dir():
    message = f"CIFAR-10 JPEG folder not found at {root} (set RESNET_JAX_CIFAR10_DIR)"
    if os.environ.get("RESNET_JAX_REQUIRE_DATA") == "1":
      pytest.fail(message)
    pytest.skip(message)
  return root


@pytest.fixture(scope="session")
def compilation_cache(tmp_path_factory) -> dict[str, str]:
  """Environment for trainer subprocesses: one persistent XLA cache, so each compiles once."""
  return {"JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("xla_cache")),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
