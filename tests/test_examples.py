"""The examples run as a user runs them: subprocesses on tiny inputs, their printed numbers checked."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from resnet_jax import models
from resnet_jax.models import pretrained

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_example(script: str, *flags: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, os.path.join(REPO, "examples", script), *flags],
                        cwd=REPO, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, PYTHONPATH=REPO))


@pytest.fixture(scope="module")
def resnet18_npz(tmp_path_factory) -> str:
  """A torchvision-layout ResNet-18 state dict of random weights, as `np.savez` writes it."""
  model = nnx.eval_shape(lambda: models.create("resnet18", num_classes=1000,
                                               stride_on_1x1=False, rngs=nnx.Rngs(0)))
  # `create`'s initialisation, drawn by numpy: jax's eager one compiles per shape (20 s here).
  rng = np.random.default_rng(0)
  for path, variable in nnx.iter_graph(model):
    if isinstance(variable, nnx.Variable):
      if len(variable.shape) > 1:  # Conv HWIO, Linear (in, out): He normal over fan-in.
        value = rng.normal(0, np.sqrt(2 / np.prod(variable.shape[:-1])), variable.shape)
      else:  # BN: scale and variance 1, bias and mean 0; Linear bias 0.
        value = np.full(variable.shape, float(path[-1] in ("scale", "var")))
      variable.set_value(value.astype(np.float32))
  path = str(tmp_path_factory.mktemp("weights") / "resnet18.npz")
  np.savez(path, **pretrained.to_torchvision(model))
  return path


def test_feature_extraction_prints_the_stage_shapes(resnet18_npz):
  result = run_example("feature_extraction.py", "--model=resnet18", "--image_size=64",
                       "--batch=4", f"--torchvision_weights={resnet18_npz}")
  assert result.returncode == 0, result.stderr
  # C1 to C5 at strides 2 to 32 of a 64x64 image; ResNet-18's widths; the pooled C5.
  assert result.stdout.splitlines() == [
      "stem: (4, 32, 32, 64) float32, stride 2", "stage1: (4, 16, 16, 64) float32, stride 4",
      "stage2: (4, 8, 8, 128) float32, stride 8", "stage3: (4, 4, 4, 256) float32, stride 16",
      "stage4: (4, 2, 2, 512) float32, stride 32", "pooled: (4, 512) float32"]


def test_fine_tuning_memorises_a_batch(resnet18_npz, tmp_path):
  rng = np.random.default_rng(1)
  data = str(tmp_path / "data.npz")
  np.savez(data, images=rng.integers(0, 256, (4, 32, 32, 3), np.uint8), labels=[0, 1, 2, 0])
  result = run_example("fine_tune.py", f"--torchvision_weights={resnet18_npz}",
                       "--model=resnet18", "--num_classes=3", f"--data={data}", "--batch=4",
                       "--steps=4", "--learning_rate=0.01")
  assert result.returncode == 0, result.stderr
  losses = [float(x) for x in re.findall(r"^step \d+ loss (\S+)$", result.stdout, re.M)]
  assert len(losses) == 4
  # A new 3-class head starts near ln 3; four steps on the one batch drive the loss far below.
  assert losses[-1] < 0.5 * losses[0], losses
  assert re.search(r"^eval accuracy [\d.]+ on 4 training images$", result.stdout, re.M)


def test_fine_tuning_without_weights_starts_at_random_on_a_random_batch():
  result = run_example("fine_tune.py", "--model=resnet18", "--num_classes=3", "--image_size=32",
                       "--batch=4", "--steps=4", "--learning_rate=0.01")
  assert result.returncode == 0, result.stderr
  losses = [float(x) for x in re.findall(r"^step \d+ loss (\S+)$", result.stdout, re.M)]
  assert len(losses) == 4
  # The random batch with labels 0, 1, 2, 0, memorised as the pretrained net does.
  assert losses[-1] < 0.5 * losses[0], losses
  assert re.search(r"^eval accuracy [\d.]+ on 4 training images$", result.stdout, re.M)


@pytest.mark.parametrize("script", ["feature_extraction.py", "fine_tune.py"])
def test_missing_weights_file_is_one_line_and_status_2(script, tmp_path):
  missing = tmp_path / "resnet18.pth"
  result = run_example(script, "--model=resnet18", f"--torchvision_weights={missing}")
  assert result.returncode == 2
  assert result.stderr.strip() == f"error: State dict file '{missing}' does not exist."
