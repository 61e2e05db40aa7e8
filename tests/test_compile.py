"""`python -m resnet_jax.training.compile`: a config's steps compiled for TPU topologies on a CPU host.

The tests that compile need libtpu (`pip install ".[tpu]"`, Python 3.12): they skip without it,
except where RESNET_JAX_REQUIRE_LIBTPU=1 (.ci/run's Python 3.12 suite) makes them required.
"""
import importlib.util
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from configs import cifar_resnet20
from resnet_jax.training import compile as tpu_compile
from resnet_jax import data, models
from resnet_jax.models import cpu_kernels
from resnet_jax.training import loop

GIB = 1 << 30


@pytest.fixture(scope="module")
def libtpu():
  if importlib.util.find_spec("libtpu") is None:
    message = 'libtpu is not installed (pip install ".[tpu]", Python 3.12)'
    if os.environ.get("RESNET_JAX_REQUIRE_LIBTPU") == "1":
      pytest.fail(message)
    pytest.skip(message)


def small_cifar_config(**fields):
  """ResNet-8 by the CIFAR recipe: the paper's batch of 128 and eval batch of 1024."""
  config = cifar_resnet20.get_config()
  config.model = "cifar_resnet8"
  config.update(fields)
  return config


@pytest.mark.parametrize("name, message", [
    ("v6e-256", "unknown topology 'v6e-256'; use GENERATION:SHAPE"),
    ("v9:2x2", "unknown topology 'v9:2x2'"),
    ("v5e:2x2x2", "does not have the 2 axes of a v5e slice"),
    ("v4:2x2", "does not have the 3 axes of a v4 slice"),
    ("v5e:0x4", "does not have the 2 axes"),
])
def test_an_unknown_topology_is_one_error_showing_the_accepted_form(name, message):
  with pytest.raises(tpu_compile.CompileError, match=re.escape(message)) as error:
    tpu_compile.parse_topology(name)
  assert "e.g. --topology=v5e:16x16" in str(error.value)


def test_without_libtpu_the_error_says_what_to_install(monkeypatch):
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *args: None if name == "libtpu" else real_find_spec(name, *args))
  with pytest.raises(tpu_compile.CompileError, match=re.escape(
      'compiling for a TPU needs libtpu, which is not installed: pip install "resnet_jax[tpu]"')):
    tpu_compile.run(small_cifar_config(), "v5e:2x2")


def linear_memory(base: float, per_image: float, chip: tpu_compile.Chip, calls: list[int]):
  """A stand-in for compiling: memory base + per_image * batch, out of memory past the HBM."""

  def compile_at(per_chip: int) -> tpu_compile.StepReport:
    calls.append(per_chip)
    memory = int(base + per_image * per_chip)
    if memory > chip.hbm_bytes:
      raise tpu_compile.OutOfMemory(f"{memory} bytes")
    return tpu_compile.StepReport("train", per_chip, per_chip, 1.0,
                                  {"arguments": int(base), "outputs": 0, "aliased": 0,
                                   "temporaries": memory - int(base), "code": 0}, 1.0, 1.0, 1.0)
  return compile_at


@pytest.mark.parametrize("base, per_image, known_fail, step", [
    (0.3 * GIB, 37e6, 1024, 8),  # ResNet-50-like: 433 per chip fit in 16 GiB.
    (2 * GIB, 5e6, None, 8),  # Nothing known to fail: the search finds the edge itself.
    (0.1 * GIB, 1.3e9, 64, 8),  # Only 8 fit.
    (0.3 * GIB, 37e6, 1024, 24),  # Whole batch norm groups of 24 images per chip.
])
def test_the_largest_batch_search_finds_the_edge_in_few_compiles(base, per_image, known_fail,
                                                                 step):
  chip = tpu_compile.CHIPS["v5e"]
  calls = []
  compile_at = linear_memory(base, per_image, chip, calls)
  fits = None if known_fail else compile_at(3 * step)
  largest = tpu_compile.largest_batch_per_chip(compile_at, chip, fits, known_fail, step)
  expected = int((chip.hbm_bytes - base) // per_image) // step * step
  assert largest.batch_per_chip == expected
  assert all(per_chip % step == 0 for per_chip in calls), calls
  assert largest.memory_bytes <= chip.hbm_bytes
  assert len(calls) <= 8, calls


def test_the_search_says_when_not_even_the_smallest_batch_fits():
  chip = tpu_compile.CHIPS["v5e"]
  with pytest.raises(tpu_compile.OutOfMemory, match="not even 8 images per chip fit"):
    tpu_compile.largest_batch_per_chip(linear_memory(17 * GIB, 1e6, chip, []), chip, None, 64)


def test_on_cpu_the_trainer_keeps_its_cpu_kernels_and_float32():
  config = small_cifar_config()
  model = loop.create_model(config, 10, 0, "cpu")
  assert isinstance(model.stem_conv, cpu_kernels.Conv) and type(model.stem_norm) is models.BatchNorm
  assert model.stem_conv.dtype == jnp.float32
  tpu_model = loop.create_model(config, 10, 0, "tpu")
  # flax's layers (batch norm by groups of config.batch_norm_group images), not the CPU kernels.
  assert type(tpu_model.stem_conv) is nnx.Conv and type(tpu_model.stem_norm) is models.BatchNorm
  assert tpu_model.stem_norm.group_size == config.batch_norm_group == 64
  assert tpu_model.stem_conv.dtype == jnp.bfloat16
  assert cpu_kernels.training_layers("tpu") == cpu_kernels.training_layers("gpu") == {}
  assert cpu_kernels.compiler_options("tpu") is None and cpu_kernels.compiler_options("cpu") is not None
  # The trainer's own mesh here is of CPU devices, whatever platform a compile targets.
  assert data.core.platform(data.core.make_mesh()) == "cpu"


def test_a_cifar_net_compiled_for_a_tpu_has_no_cpu_kernel_and_bfloat16_convolutions(libtpu):
  del libtpu
  topology = tpu_compile.parse_topology("v5e:2x2")
  target = tpu_compile.Target(small_cifar_config(), tpu_compile.topology_devices(topology))
  assert target.platform == "tpu" and target.dtype == jnp.bfloat16
  assert target.on_device  # CIFAR is held on the chips, as the trainer holds it.
  inputs = data.on_device.abstract(target.mesh, target.info, seed=0, augment=True)
  step = lambda state, inputs: loop.train_step(
      target.recipe, state, inputs.train_batch(state.step, 128))
  jaxpr = str(jax.make_jaxpr(step)(target.state, inputs))
  assert "custom_vjp_call" not in jaxpr  # cpu_kernels.Conv is a custom VJP.
  # 7 forward convolutions, 7 weight gradients, 6 input gradients (none for the images).
  assert jaxpr.count("conv_general_dilated[") == 20
  report = target.train_step(128)
  assert report.batch_per_chip == 32 and report.fits(topology.chip)
  # Every convolution of the compiled TPU program (forward and both gradients) is in bfloat16.
  results = re.findall(r"= (\w+)\[[^\n]* convolution\(", report.compiled.as_text())
  assert len(results) >= 20 and set(results) == {"bf16"}, results
  # XLA's FLOPs per chip are those of the model's MACs within what BN, ReLU and the optimizer
  # add (and the stem's input gradient, never computed, takes away).
  assert 0.8 < report.xla_flops / report.model_flops < 1.3
  assert 0 < report.memory["temporaries"] < report.memory_bytes < GIB


def test_the_command_prints_a_line_per_step_on_a_slice_of_several_hosts(libtpu, tmp_path):
  del libtpu
  lines = []
  record = tmp_path / "steps.jsonl"
  reports = tpu_compile.run(small_cifar_config(), "v5e:4x4", emit=lines.append,
                            record_to=record)
  assert lines[0].startswith("compile: cifar_resnet8 on v5e:4x4 (16 chips, 4 hosts, TPU v5 lite)"
                             ", batch 128 (8 per chip), eval batch 1024, bfloat16, data held on "
                             "the chips")
  assert [report.step for report in reports] == ["train", "eval"]
  memory = re.compile(r"memory per chip (\d+\.\d\d) GiB of 16\.00 GiB \(fits; arguments "
                      r"(\d+\.\d\d), outputs (\d+\.\d\d), aliased (\d+\.\d\d), temporaries "
                      r"(\d+\.\d\d), code (\d+\.\d\d)\)")
  for line, report, per_chip in zip(lines[1:], reports, (8, 64)):
    assert line.startswith(f"{report.step}: {per_chip} per chip, compiled in ")
    total, *parts = map(float, memory.search(line).groups())
    assert total == pytest.approx(parts[0] + parts[1] - parts[2] + parts[3] + parts[4], abs=0.02)
    assert re.search(r"floor \d+\.\d\d ms, (FLOPs|bandwidth)-bound", line)
  assert lines[1].endswith("the data is held on the chips: no host input pipeline")
  records = [json.loads(line) for line in record.read_text().splitlines()]
  assert [(r["step"], r["chips"], r["hosts"], r["fits"]) for r in records] == [
      ("train", 16, 4, True), ("eval", 16, 4, True)]


def test_steps_eval_compiles_the_evaluation_steps_alone(libtpu):
  del libtpu
  lines = []
  reports = tpu_compile.run(small_cifar_config(), "v5e:2x2", which="eval", emit=lines.append)
  assert [report.step for report in reports] == ["eval"]
  assert [line.split(":")[0] for line in lines[1:]] == ["eval"]


def test_a_batch_that_does_not_fit_is_one_error_naming_the_largest_that_does(libtpu):
  del libtpu
  # ResNet-8's evaluation of 224x224 views: 4,480 per chip need just over 16 GiB (and the
  # command, in a process of its own, must print nothing of libtpu's start-up complaints).
  completed = subprocess.run(
      [sys.executable, "-m", "resnet_jax.training.compile", "--config=configs/cifar_resnet20.py:smoke",
       "--config.model=cifar_resnet8", "--topology=v5e:2x2", "--config.dataset.image_size=224",
       "--config.dataset.synthetic_train_size=256", "--config.eval_batch_size=17920",
       "--steps=eval"],
      capture_output=True, text=True, check=False,
      env={key: value for key, value in os.environ.items() if key not in (
          "JAX_PLATFORMS", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES",
          "ALLOW_MULTIPLE_LIBTPU_LOAD")})
  assert completed.returncode == 2, completed.stderr[-3000:]
  error = re.fullmatch(
      r"\nerror: eval at 4480 per chip \(--config\.eval_batch_size=17920\) does not fit in a v5e "
      r"chip's 16\.00 GiB of HBM; the largest that does is (\d+) per chip "
      r"\(--config\.eval_batch_size=(\d+), (\d+\.\d\d) GiB\)\.\n", completed.stderr)
  assert error, completed.stderr[-3000:]
  largest, global_batch, gib = int(error[1]), int(error[2]), float(error[3])
  assert 2048 < largest < 4480 and largest % 8 == 0 and global_batch == 4 * largest
  assert gib <= 16
  assert not any(line.startswith("train:") for line in completed.stdout.splitlines())
