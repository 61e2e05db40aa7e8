"""Layer responses (Fig. 7) against a hand computation, and training curves from metrics logs."""
import json

import jax
import numpy as np
import pytest
from flax import nnx

from resnet_jax.models import analysis
from resnet_jax.training import metrics
from resnet_jax import models


def _randomize_batch_norms(model, seed=0):
  """Non-trivial running statistics, scales and shifts, so eval-mode BN is really tested."""
  rng = np.random.default_rng(seed)
  for _, module in nnx.iter_graph(model):
    if isinstance(module, nnx.BatchNorm):
      shape = module.mean.shape
      module.mean[...] = rng.normal(0, 0.5, shape).astype(np.float32)
      module.var[...] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
      module.scale[...] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
      module.bias[...] = rng.normal(0, 0.2, shape).astype(np.float32)


def _conv_bn(x, conv, norm, stride):
  """conv (3x3, pad 1, no bias) then eval-mode BN, written out with NumPy statistics."""
  y = jax.lax.conv_general_dilated(x, np.asarray(conv.kernel[...]), (stride, stride),
                                   ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  y = np.asarray(y, np.float64)
  return ((y - norm.mean[...]) / np.sqrt(norm.var[...] + norm.epsilon) * norm.scale[...]
          + norm.bias[...])


@pytest.mark.parametrize("name", ["cifar_resnet8", "cifar_plain8"])
def test_layer_responses_match_a_hand_computation(name):
  model = models.create(name, num_classes=10, rngs=nnx.Rngs(0))
  _randomize_batch_norms(model)
  images = np.random.default_rng(1).normal(size=(6, 32, 32, 3)).astype(np.float32)
  model.train()  # layer_responses must switch to eval mode itself.

  responses = analysis.layer_responses(model, images)

  # CIFAR ResNet-8: the 3x3 stem, then 3 blocks of two 3x3 convs; plain nets the same points.
  assert responses.shape == (7,)
  stem = _conv_bn(images, model.stem_conv, model.stem_norm, 1)
  block0, block1 = model.blocks[0], model.blocks[1]
  first = _conv_bn(np.maximum(stem, 0).astype(np.float32), block0.convs[0], block0.norms[0], 1)
  second = _conv_bn(np.maximum(first, 0).astype(np.float32), block0.convs[1], block0.norms[1], 1)
  # Block 0 keeps the shape, so its shortcut (option A) is the identity: relu(F(x) + x).
  shortcut = np.maximum(stem, 0) if name == "cifar_resnet8" else 0.0
  block0_out = np.maximum(second + shortcut, 0).astype(np.float32)
  third = _conv_bn(block0_out, block1.convs[0], block1.norms[0], 2)  # stride 2: 32 -> 16
  expected = [np.std(stem), np.std(first), np.std(second), np.std(third)]
  np.testing.assert_allclose(responses[:4], expected, rtol=2e-4)


def test_layer_responses_of_bottlenecks_are_their_3x3_convs():
  model = models.create("resnet50", num_classes=10, rngs=nnx.Rngs(0))
  images = np.zeros((1, 32, 32, 3), np.float32)
  assert analysis.layer_responses(model, images).shape == (16,)  # 3 + 4 + 6 + 3 blocks


@pytest.mark.parametrize("train_error", [
    lambda percent: {"top1_error": percent},
    lambda percent: {"train_error": percent / 100}],  # Runs logged before errors were percent.
    ids=["percent", "fraction"])
def test_training_curves_read_metrics_and_keep_the_last_record_of_a_step(tmp_path, train_error):
  records = [
      {"step": 10, "kind": "train", "loss": 2.0, **train_error(90.0)},
      {"step": 10, "kind": "eval", "top1_error": 85.0},
      {"step": 20, "kind": "train", "loss": 1.5, **train_error(70.0)},
      # Stopped after step 20, resumed from the checkpoint at step 10: step 20 again.
      {"step": 20, "kind": "train", "loss": 1.4, **train_error(60.0)},
      {"step": 20, "kind": "eval", "top1_error": 70.0},
  ]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  curves = metrics.training_curves([tmp_path, tmp_path / "missing"])
  run = curves[str(tmp_path)]
  np.testing.assert_array_equal(run["train_step"], [10, 20])
  np.testing.assert_allclose(run["train_error"], [90.0, 60.0])
  np.testing.assert_array_equal(run["test_step"], [10, 20])
  np.testing.assert_allclose(run["test_error"], [85.0, 70.0])
  assert curves[str(tmp_path / "missing")]["train_step"].size == 0
