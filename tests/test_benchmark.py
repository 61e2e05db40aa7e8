"""`python -m resnet_jax.tools.benchmark` runs end to end on a tiny network; its FLOPs are analysis.count_macs'.

So do `benchmarks/cpu_ladder.py`'s two modes, the benchmark's `--serve` protocol (the PyTorch
baseline's JAX side) and the input benchmark's ImageNet pipelines, so that none rots.
"""
import io
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

import processes
from resnet_jax import models
from resnet_jax.models import analysis, cpu_kernels
from resnet_jax.tools import benchmark, input_benchmark

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_runs_and_counts_flops(capsys):
  batch = 16
  rows = benchmark.run(benchmark.make_config("cifar_resnet8", batch, "float32", batch_norm_group=8),
                       steps=1, repeats=2, input_pipeline=True, peak=1)
  by_name = {row.name: row for row in rows}
  assert set(by_name) == {"train", "eval", "train+input"}

  model = models.create("cifar_resnet8", num_classes=10, rngs=nnx.Rngs(0))
  forward_flops = 2 * analysis.count_macs(model, (batch, 32, 32, 3))
  assert by_name["eval"].flops_per_step == forward_flops
  assert by_name["train"].flops_per_step == by_name["train+input"].flops_per_step == 3 * forward_flops
  for row in rows:
    assert len(row.step_s) == 2 and all(t > 0 for t in row.step_s)
    assert row.compile_s > 0
    assert row.images_per_s == pytest.approx(batch / row.median_s)
    assert row.mfu(1.0) == pytest.approx(row.flops_per_step / row.median_s / 1e12)

  printed = capsys.readouterr().out
  assert "cifar_resnet8, batch 16, float32" in printed and "eval/train throughput" in printed


@pytest.mark.parametrize("kind,dtype,peak", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.0),
    ("NVIDIA H200", "float32", 67.0),
    ("TPU v4", "bfloat16", 275.0),
    ("TPU v5 lite", "bfloat16", 197.0),
    ("TPU v5", "bfloat16", 459.0),
    ("TPU v4", "float32", None),
    ("cpu", "float32", None),
])
def test_peak_lookup(kind, dtype, peak):
  assert benchmark.peak_tflops(kind, dtype) == peak


def benchmark_command(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "resnet_jax.tools.benchmark", *args], cwd=REPO,
                        env=processes.environment(8), capture_output=True, text=True,
                        timeout=300)


def test_the_command_writes_a_profiler_trace(tmp_path):
  completed = benchmark_command("--model=cifar_resnet8", "--batch=8", "--batch_norm_group=0",
                                "--steps=1", "--repeats=1", f"--trace_dir={tmp_path}")
  assert completed.returncode == 0, completed.stderr[-3000:]
  assert completed.stdout.startswith("cifar_resnet8, batch 8, float32, 8 x ")
  assert "eval/train throughput" in completed.stdout
  assert list(tmp_path.glob("**/*.xplane.pb"))


@pytest.mark.parametrize("args,message", [
    (["--dtype=float16"], "flag --dtype=float16: value should be one of <float32|bfloat16>"),
    (["--batch=12", "--model=cifar_resnet8"], "batch_size 12 does not divide across 8 devices"),
    (["cifar_resnet8"], "unexpected arguments: cifar_resnet8 (flags take the form --name=value)."),
])
def test_a_bad_command_line_is_one_error_line_and_exit_status_2(args, message):
  completed = benchmark_command(*args)
  assert completed.returncode == 2, completed.stderr[-3000:]
  assert completed.stderr.strip().splitlines()[-1].startswith(f"error: {message}")
  assert "Traceback" not in completed.stderr


def test_cpu_ladder_runs_both_modes():
  # In a process of one CPU device, as the trainer's on a CPU host: oneDNN's kernels' row is
  # there where they are.
  run = lambda *args: subprocess.run(
      [sys.executable, os.path.join(REPO, "benchmarks", "cpu_ladder.py"), *args],
      capture_output=True, text=True, check=True, timeout=300,
      env={**os.environ, "XLA_FLAGS": ""}).stdout
  onednn = cpu_kernels.has_onednn()
  ladder = run("--model=cifar_resnet8", "--batch=8", "--repeats=1", "--steps=1").splitlines()
  assert [line.split(" median")[0].strip() for line in ladder[1:]] == [
      "XLA's defaults", "+ cpu_kernels weight gradient", "+ YNNPACK fusions off",
      "+ dy and x materialised",
      "+ strided input gradient by phase", "+ oneDNN convolutions",
      "+ lax's weight gradient, fewer channels in", "+ YNNPACK fusions back, beside oneDNN",
      *["+ oneDNN's kernels for training"] * onednn]
  assert all("over the row above" in line for line in ladder[2:])
  layers = run("--layers", "--batch=2", "--repeats=1").splitlines()
  assert len(layers) == 5 * (3 + onednn) and all(
      line.count(" ms") == 1 and "weight gradient" in line for line in layers)


def test_serve_times_the_requested_steps():
  config = benchmark.make_config("cifar_resnet8", 8, "float32", batch_norm_group=4)
  assert config.batch_norm_group == 4
  assert benchmark.make_config("cifar_resnet8", 8, "float32").batch_norm_group == 64  # Recipe's.
  runners, _ = benchmark.build_runners(config, input_pipeline=False)
  replies = io.StringIO()
  benchmark.serve(runners, io.StringIO("train 1\neval 2\ntrain 1\n"), replies)
  header, *times = replies.getvalue().splitlines()
  header = json.loads(header)
  assert set(header) == {"jax", "python", "device", "compile_s"}
  assert set(header["compile_s"]) == {"train", "eval"}
  assert len(times) == 3 and all(float(t) > 0 for t in times)


def test_tree_cpu_s_counts_child_processes():
  busy = ("import time\nend = time.process_time() + 1.0\nwhile time.process_time() < end: pass\n"
          "print('done', flush=True)\ntime.sleep(60)")
  before = input_benchmark.tree_cpu_s()
  child = subprocess.Popen([sys.executable, "-c", busy], stdout=subprocess.PIPE, text=True)
  try:
    assert child.stdout.readline() == "done\n"  # One CPU-second spent, and still alive.
    assert input_benchmark.tree_cpu_s() - before >= 1.0
  finally:
    child.kill()
    child.wait()


def test_imagenet_pipelines_deliver_training_batches(tmp_path):
  timings = input_benchmark.imagenet_pipelines(tmp_path, num_classes=2, per_class=4, batch_size=4,
                                              repeats=2, steps=1, warmup=1, image_height=64)
  assert list(timings) == ["tf.data, array_record", "Grain, array_record", "tf.data, image folder"]
  for timing in timings.values():
    assert len(timing.wall) == len(timing.per_cpu_s) == 2
    assert all(0 < rate < math.inf for rate in timing.wall + timing.per_cpu_s)
  printed = input_benchmark.format_timings(timings).splitlines()
  assert len(printed) == 4 and printed[1].endswith(" 1.00x")

  # Grain's batches are the trainer's: 224x224 float32 pixels less the mean image, plus the
  # lighting offset.
  data_dir = tmp_path / "tfds"
  for batches in (input_benchmark.grain_batches(data_dir, 4, workers=1),
                  input_benchmark.tf_data_batches("imagenet2012", data_dir, 4)):
    images = np.asarray(next(batches))
    batches.close()
    assert images.shape == (4, 224, 224, 3) and images.dtype == np.float32
    assert -285 < images.min() and images.max() < 285 and images.std() > 1
    assert abs(images.mean()) < 30  # Centred, up to the lighting noise and the crops' placement.
