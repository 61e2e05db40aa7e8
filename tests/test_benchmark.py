"""`python -m resnet_jax.benchmark` runs end to end on a tiny network; its FLOPs are count_macs'.

So do `benchmarks/cpu_ladder.py`'s two modes, so that neither rots.
"""
import os
import subprocess
import sys

import pytest
from flax import nnx

from resnet_jax import benchmark, models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_runs_and_counts_flops(capsys):
  batch = 16
  rows = benchmark.main(["--model=cifar_resnet8", f"--batch={batch}", "--steps=1",
                         "--repeats=2", "--input_pipeline", "--peak_tflops=1"])
  by_name = {row.name: row for row in rows}
  assert set(by_name) == {"train", "eval", "train+input"}

  model = models.create("cifar_resnet8", num_classes=10, rngs=nnx.Rngs(0))
  forward_flops = 2 * models.count_macs(model, (batch, 32, 32, 3))
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


def test_benchmark_writes_a_profiler_trace(tmp_path):
  benchmark.main(["--model=cifar_resnet8", "--batch=8", "--steps=1", "--repeats=1",
                  f"--trace_dir={tmp_path}"])
  assert list(tmp_path.glob("**/*.xplane.pb"))


def test_cpu_ladder_runs_both_modes():
  run = lambda *args: subprocess.run(
      [sys.executable, os.path.join(REPO, "benchmarks", "cpu_ladder.py"), *args],
      capture_output=True, text=True, check=True, timeout=300).stdout
  ladder = run("--model=cifar_resnet8", "--batch=8", "--repeats=1", "--steps=1").splitlines()
  assert [line.split(" median")[0].strip() for line in ladder[1:]] == [
      "XLA's defaults", "+ ops weight gradient", "+ ops.compiler_options()", "+ ops.BatchNorm"]
  assert all("over the row above" in line for line in ladder[2:])
  layers = run("--layers", "--batch=2", "--repeats=1").splitlines()
  assert len(layers) == 6 and all(line.count(" ms") == 1 and "weight gradient" in line
                                  for line in layers)
