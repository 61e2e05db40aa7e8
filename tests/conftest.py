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

SHARED_CIFAR10 = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg"


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
