"""`python -m resnet_jax.benchmark` runs end to end on a tiny network; its FLOPs are count_macs'."""
import pytest
from flax import nnx

from resnet_jax import benchmark, models


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
