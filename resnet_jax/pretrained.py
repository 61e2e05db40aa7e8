"""Published ImageNet weights for our ResNets, via Keras Applications.

This module imports no Keras or TensorFlow: `from_keras` reads the Keras model it
is given through `layers`, `get_layer` and `get_weights` only.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from resnet_jax import models

_BLOCK_CONV = re.compile(r"conv(\d)_block(\d+)_1_conv")


def _unsupported(reason: str) -> ValueError:
  return ValueError(
      f"Not a supported Keras model: {reason}. from_keras takes the original (v1) "
      "keras.applications.ResNet50, ResNet101 or ResNet152, built channels_last with "
      "include_top=True.")


def _stage_sizes(keras_model: Any) -> tuple[int, ...]:
  """Blocks per stage (conv2 to conv5), from layer names `conv{stage}_block{i}_1_conv`."""
  names = [layer.name for layer in getattr(keras_model, "layers", ())]
  if any(name.endswith("_preact_bn") for name in names):
    raise _unsupported("it is a ResNetV2 (pre-activation, stride in the last block of "
                       "a stage), a layout our models do not have")
  blocks = {}
  for name in names:
    if match := _BLOCK_CONV.fullmatch(name):
      stage, index = int(match.group(1)), int(match.group(2))
      blocks[stage] = max(blocks.get(stage, 0), index)
  if sorted(blocks) != [2, 3, 4, 5] or "conv1_bn" not in names:
    raise _unsupported("its layers are not named like a Keras ResNet "
                       "(conv1_conv, conv1_bn, conv{2..5}_block{i}_{j}_conv, ...)")
  if "predictions" not in names:
    raise _unsupported("it has no classifier ('predictions' Dense layer); rebuild it "
                       "with include_top=True")
  return tuple(blocks[stage] for stage in (2, 3, 4, 5))


def _weights(keras_model: Any, layer_name: str, count: int) -> list[np.ndarray]:
  weights = keras_model.get_layer(layer_name).get_weights()
  if len(weights) != count:
    raise _unsupported(f"layer {layer_name!r} has {len(weights)} weight arrays, "
                       f"expected {count}")
  return [np.asarray(w, np.float64) for w in weights]


def _assign(variable: nnx.Variable, value: np.ndarray, layer_name: str) -> None:
  if variable.shape != value.shape:
    raise _unsupported(f"layer {layer_name!r} has shape {value.shape}, our model "
                       f"expects {variable.shape}")
  variable.set_value(jnp.asarray(value, jnp.float32))


def _load_conv_bn(keras_model: Any, prefix: str, conv: nnx.Conv,
                  norm: nnx.BatchNorm) -> None:
  """Copies `{prefix}_conv` and `{prefix}_bn`, folding the conv bias into the BN."""
  kernel, bias = _weights(keras_model, f"{prefix}_conv", 2)
  gamma, beta, mean, var = _weights(keras_model, f"{prefix}_bn", 4)
  keras_epsilon = keras_model.get_layer(f"{prefix}_bn").epsilon
  _assign(conv.kernel, kernel, f"{prefix}_conv")  # Both HWIO.
  _assign(norm.scale, gamma, f"{prefix}_bn")
  _assign(norm.bias, beta, f"{prefix}_bn")
  # BN(conv(x) + b) normalises by (conv(x) + b - m) / sqrt(v + eps_keras): the
  # same as mean m - b and variance v + eps_keras - eps_ours. Done in float64 so
  # the 1e-8 epsilon difference is not rounded away on tiny variances.
  _assign(norm.mean, mean - bias, f"{prefix}_bn")
  _assign(norm.var, var + keras_epsilon - norm.epsilon, f"{prefix}_bn")


def from_keras(keras_model: Any, *, dtype: Any = jnp.float32) -> models.ResNet:
  """Our ResNet-50/101/152 with the weights of a Keras Applications ResNet (v1).

  The route for published ImageNet weights into JAX, e.g.

    keras_model = keras.applications.ResNet50(weights="imagenet")  # network, or
    # weights="/path/to/resnet50_weights_tf_dim_ordering_tf_kernels.h5"
    model = pretrained.from_keras(keras_model)
    logits = model(keras.applications.resnet.preprocess_input(images_rgb_0_255))

  Those ImageNet weights expect Caffe-style input: 0..255 images in BGR channel
  order with the ImageNet channel means subtracted, as made from RGB images by
  `keras.applications.resnet.preprocess_input`. Our ImageNet pipeline
  (`resnet_jax.data.imagenet`: 0..255 RGB minus the RGB mean) differs only in
  channel order, so feed its images as `images[..., ::-1]`.

  The depth comes from the Keras layer names, the class count from its Dense.
  Keras's architecture is the paper's with option B shortcuts and the stride in
  each bottleneck's first 1x1 conv, our `create` defaults. Its conv biases are
  folded exactly into the following batch norm's mean (and its BN epsilon
  1.001e-5 into the variance), so the result has no extra parameters. Keras
  zero-pads before the stem's max pool; after a ReLU that equals our -inf padding.

  Args:
    keras_model: `keras.applications.ResNet50/101/152(include_top=True, ...)`, any
      weights, any input size; read duck-typed, so keras is not imported here.
    dtype: compute dtype of the returned model; its parameters are float32.

  Returns:
    A `models.ResNet` in eval mode. It returns logits: Keras's default softmax
    classifier activation is not applied.

  Raises:
    ValueError: for any other Keras model (ResNetV2, include_top=False,
      channels_first, an unknown depth, a non-ResNet).
  """
  stage_sizes = _stage_sizes(keras_model)
  depths = {sizes: depth for depth, (layers, sizes) in models.IMAGENET_DEPTHS.items()
            if layers is models.bottleneck_layers}
  if stage_sizes not in depths:
    raise _unsupported(f"blocks per stage {stage_sizes} match none of "
                       f"ResNet-50/101/152 {tuple(depths)}")
  if keras_model.get_layer("conv1_conv").data_format != "channels_last":
    raise _unsupported("it is channels_first; build it with channels_last")
  num_classes = keras_model.get_layer("predictions").get_weights()[0].shape[1]

  # Shapes only: every array is overwritten below, so skip the random init.
  model = nnx.eval_shape(lambda: models.create(
      f"resnet{depths[stage_sizes]}", num_classes=num_classes, dtype=dtype,
      rngs=nnx.Rngs(0)))
  _load_conv_bn(keras_model, "conv1", model.stem_conv, model.stem_norm)
  block_names = [f"conv{stage}_block{index}"
                 for stage, size in zip((2, 3, 4, 5), stage_sizes)
                 for index in range(1, size + 1)]
  layer_names = {layer.name for layer in keras_model.layers}
  for block, name in zip(model.blocks, block_names):
    for j, (conv, norm) in enumerate(zip(block.convs, block.norms), start=1):
      _load_conv_bn(keras_model, f"{name}_{j}", conv, norm)
    if (block.projection is not None) != (f"{name}_0_conv" in layer_names):
      raise _unsupported(f"block {name} has a projection shortcut where ours has not, "
                         "or the reverse")
    if block.projection is not None:
      _load_conv_bn(keras_model, f"{name}_0", block.projection, block.projection_norm)
  kernel, bias = _weights(keras_model, "predictions", 2)
  _assign(model.head.kernel, kernel, "predictions")
  _assign(model.head.bias, bias, "predictions")

  leftover = [jax.tree_util.keystr(path)
              for path, leaf in jax.tree.leaves_with_path(nnx.state(model))
              if isinstance(leaf, jax.ShapeDtypeStruct)]
  assert not leftover, f"Unassigned variables: {leftover}"
  model.eval()
  return model
