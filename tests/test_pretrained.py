"""`pretrained.from_keras` reproduces Keras Applications ResNets exactly."""
import pathlib
import subprocess
import sys

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from resnet_jax import models
from resnet_jax.models import pretrained

SIZE = 64  # The smallest input Keras accepts is 32; 64 keeps a 2x2 final map.


def _randomize(keras_model, rng):
  """Random BN statistics, scales and shifts, and conv biases (Keras starts them at
  0/1, which would leave the bias and epsilon folding untested)."""
  norms = [layer for layer in keras_model.layers
           if isinstance(layer, keras.layers.BatchNormalization)]
  for layer in norms:
    gamma, beta, mean, var = layer.get_weights()
    layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.1, beta.shape),
                       rng.normal(0, 1, mean.shape), rng.uniform(0.5, 2, var.shape)])
  # Near-zero variances (as trained nets have in some channels) on the last BN:
  # only there is the 1e-8 epsilon difference visible (5e-4 relative if unfolded).
  gamma, beta, mean, var = norms[-1].get_weights()
  norms[-1].set_weights([gamma, beta, mean, rng.uniform(0, 1e-6, var.shape)])
  for layer in keras_model.layers:
    if isinstance(layer, keras.layers.Conv2D):
      kernel, bias = layer.get_weights()
      layer.set_weights([kernel, rng.normal(0, 0.1, bias.shape)])


@pytest.mark.parametrize("constructor", [
    "ResNet50",
    pytest.param("ResNet101", marks=pytest.mark.slow),
    pytest.param("ResNet152", marks=pytest.mark.slow),
])
def test_logits_match_keras(constructor):
  keras.utils.set_random_seed(0)  # Keras's own kernel initialisation.
  keras_model = getattr(keras.applications, constructor)(
      weights=None, input_shape=(SIZE, SIZE, 3), classes=10, classifier_activation=None)
  rng = np.random.default_rng(0)
  _randomize(keras_model, rng)
  x = rng.normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)
  expected = np.asarray(keras_model(x, training=False))

  model = pretrained.from_keras(keras_model)
  logits = np.asarray(model(x))

  scale = np.abs(expected).max()
  assert np.abs(logits - expected).max() / scale < 1e-4
  # float32 round-off differs between TF and XLA convolutions (summation order)
  # and grows over 50-150 layers to ~1e-6 of the logit scale (measured 4e-7 to
  # 1.3e-6, ResNet-50 to 152). A logit's error follows that scale, not its own
  # size, hence the atol; 1e-5 leaves ~8x headroom and still catches any
  # mis-copied layer or unfolded bias (~6e-2).
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5 * scale)

  conv_biases = sum(layer.get_weights()[1].size for layer in keras_model.layers
                    if isinstance(layer, keras.layers.Conv2D))
  keras_params = sum(int(np.prod(w.shape)) for w in keras_model.trainable_weights)
  assert models.count_params(model) == keras_params - conv_biases


@pytest.mark.parametrize("build, message", [
    (lambda: keras.applications.ResNet50V2(weights=None, input_shape=(SIZE, SIZE, 3)),
     "ResNetV2"),
    (lambda: keras.applications.ResNet50(weights=None, include_top=False,
                                         input_shape=(SIZE, SIZE, 3)),
     "include_top=True"),
    (lambda: keras.Sequential([keras.Input((8,)), keras.layers.Dense(2)]),
     "not named like a Keras ResNet"),
    (lambda: object(), "not named like a Keras ResNet"),
], ids=["resnet_v2", "no_top", "not_a_resnet", "not_a_model"])
def test_unsupported_model_is_a_clear_error(build, message):
  with pytest.raises(ValueError, match=f"Not a supported Keras model: .*{message}"):
    pretrained.from_keras(build())


def test_no_keras_tensorflow_or_torch_at_import():
  code = ("import sys, resnet_jax.models.pretrained, resnet_jax.models; "
          "print(sorted({m.split('.')[0] for m in sys.modules} & {'keras', 'tensorflow', 'torch'}))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True, cwd=pathlib.Path(__file__).parents[1]).stdout
  assert out.strip() == "[]"


def test_local_files(tmp_path):
  keras.utils.set_random_seed(1)
  keras_model = keras.applications.ResNet50(weights=None, classifier_activation=None)
  _randomize(keras_model, np.random.default_rng(1))
  x = np.random.default_rng(2).normal(size=(1, SIZE, SIZE, 3)).astype(np.float32)
  expected = np.asarray(pretrained.from_keras(keras_model)(x))
  # Keras's published weights are such a file (resnet50_weights_tf_dim_ordering_tf_kernels.h5).
  keras_model.save_weights(tmp_path / "resnet50.weights.h5")
  keras_model.save(tmp_path / "resnet50.keras")
  for args in ((tmp_path / "resnet50.weights.h5", "resnet50"), (str(tmp_path / "resnet50.keras"),)):
    np.testing.assert_array_equal(np.asarray(pretrained.from_keras(*args)(x)), expected)
  with pytest.raises(ValueError, match="needs the network's name"):
    pretrained.from_keras(tmp_path / "resnet50.weights.h5")
  with pytest.raises(ValueError, match="does not exist"):
    pretrained.from_keras(tmp_path / "missing.h5", "resnet50")
  with pytest.raises(ValueError, match="Keras could not read"):
    pretrained.from_keras(tmp_path / "resnet50.weights.h5", "resnet101")
