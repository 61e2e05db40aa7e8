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
# runs whole in the one environment whose share lists it, and the tests of EVERY_ENVIRONMENT
# (those whose outcome depends most on the versions of Python, jax, flax, optax and orbax: the
# model and its kernels under every transform, the optimizer, a resumed run, checkpoints, config
# loading) run in all three. Without --share the whole suite runs.
# tests/test_ci_shares.py checks that every test file is in one share or wholly in
# EVERY_ENVIRONMENT, and that each entry names a test.
SHARES = {
    # jax 0.10.2, the oldest we support, and PyTorch (its 2.13.0 CPU wheel is for Python 3.11):
    # the PyTorch twins run here.
    "3.11": ("test_torchvision.py", "test_akamaster.py", "test_readme.py", "test_preactivation.py", "test_tfds.py",
             "test_configs.py", "test_benchmark.py", "test_claim.py", "test_data_imagenet.py",
             "test_analysis.py", "test_experiments.py", "test_launch.py", "test_install.py",
             "test_private_api.py", "test_ci_shares.py"),
    # jax 0.12 with libtpu: the TPU compilation tests run here.
    "3.12": ("test_compile.py", "test_ops.py", "test_train.py", "test_evaluate.py",
             "test_reliability.py", "test_data.py", "test_batch_norm_groups.py", "test_train_multihost.py",
             "test_data_multihost.py"),
    "3.13": ("test_transforms.py", "test_cli.py", "test_paths.py", "test_composition.py",
             "test_pretrained.py", "test_multiscale.py", "test_examples.py"),
}
# Whole files, or a test (every parameter of it, or those whose id starts so).
EVERY_ENVIRONMENT = (
    "test_models.py", "test_optim.py", "test_bridge.py", "test_build.py",
    "test_ops.py::test_gradients_equal_lax",
    "test_transforms.py::test_every_transformation[cifar_resnet8 (A)",
    "test_transforms.py::test_cpu_training_kernels_support_reverse_mode_and_say_forward_mode_is_unsupported",
    "test_train.py::test_stop_and_resume_gives_bitwise_the_same_parameters",
    "test_reliability.py::test_damaged_newest_checkpoint_is_reported_in_one_line_and_skipped",
    "test_cli.py::test_a_config_by_name_is_the_config_file_of_that_name",
    "test_data.py::test_train_batch_is_a_pure_function_of_seed_and_step",
)


SHARED_CIFAR10 = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg"


def names(entry: str, test: str) -> bool:
  """Whether EVERY_ENVIRONMENT's `entry` names `test` (a node id below tests/)."""
  if "[" in entry:  # Parameters whose id starts so.
    return test.startswith(entry)
  if "::" in entry:  # A test, with every parameter.
    return test == entry or test.startswith(f"{entry}[")
  return test.startswith(f"{entry}::")  # A file.


def runs_in(share: str, node_id: str) -> bool:
  """Whether CI's environment `share` runs the test `node_id` (tests/FILE::NAME[PARAMS])."""
  test = node_id.removeprefix("tests/")
  return (test.split("::")[0] in SHARES[share]
          or any(names(entry, test) for entry in EVERY_ENVIRONMENT))


@pytest.fixture(params=["xla", "onednn"])
def convolution_kernel(request, monkeypatch):
  """Which kernels `cpu_kernels.Conv` differentiates float32 convolutions with: XLA's (the
  module's forms), or oneDNN's, as in a process with one CPU device (this one has 8; the
  tests' arrays are on one of them)."""
  from resnet_jax.models import cpu_kernels  # pylint: disable=g-import-not-at-top
  if request.param == "onednn" and not cpu_kernels.has_onednn():
    pytest.skip("no oneDNN weight gradient here (resnet_jax.models._onednn, onednn-cpu-gomp)")
  monkeypatch.setattr(cpu_kernels, "_one_cpu_device", lambda: request.param == "onednn")
  return request.param


def pytest_addoption(parser):
  parser.addoption("--share", choices=sorted(SHARES), help="Run this CI environment's test "
                   "files and the tests of EVERY_ENVIRONMENT (tests/conftest.py).")


def pytest_collection_modifyitems(config, items):
  share = config.getoption("share")
  if share is None:
    return
  kept, deselected = [], []
  for item in items:
    (kept if runs_in(share, item.nodeid) else deselected).append(item)
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
