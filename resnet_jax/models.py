"""The networks of "Deep Residual Learning for Image Recognition" as Flax NNX modules.

One `Block` class covers every residual unit of the paper: a basic block is two
3x3 convs, a bottleneck is 1x1, 3x3, 1x1 (Fig. 5), and a block's layers are a
small table of (kernel, features, stride). Shortcuts follow Sec. 3.3:

  "A"   identity; where the shape changes, stride-2 subsampling and zero-padded
        extra channels (no parameters).
  "B"   1x1 projection (+BN) only where the shape changes, identity elsewhere.
  "C"   1x1 projection (+BN) on every block.
  None  a plain network: the same stacks with no shortcut at all.

Every module is pure under `jax.jit` through `nnx.split` / `nnx.merge`. Input is
NHWC float; `model.eval()` then `model(x)` gives logits, `model.train()` makes
batch norm use (and update) batch statistics.

This module imports jax and flax only: no TensorFlow, no dataset code.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import jax.extend.core as jax_core
from flax import nnx

from resnet_jax import ops

# Initialisation of reference [13] (He et al., 2015, "Delving Deep into
# Rectifiers"): zero-mean Gaussian with std sqrt(2 / n), n = k * k * c_in.
he_normal = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")

SHORTCUTS = ("A", "B", "C")

# (kernel, features, stride) of each conv in a block; `width` is the stage width.
LayerTable = tuple[tuple[int, int, int], ...]


def basic_layers(width: int, stride: int, stride_on_1x1: bool) -> LayerTable:
  del stride_on_1x1  # A basic block has no 1x1 conv.
  return ((3, width, stride), (3, width, 1))


def bottleneck_layers(width: int, stride: int, stride_on_1x1: bool) -> LayerTable:
  # The paper's release (and Keras) subsample in the first 1x1 conv; "v1.5"
  # (torchvision, most later work) moves the stride to the 3x3 conv.
  stride_1x1, stride_3x3 = (stride, 1) if stride_on_1x1 else (1, stride)
  return ((1, width, stride_1x1), (3, width, stride_3x3), (1, 4 * width, 1))


def _padding(kernel: int) -> tuple[tuple[int, int], tuple[int, int]]:
  # Explicit symmetric padding, as Caffe/PyTorch/Keras do; "SAME" would pad
  # (0, 1) on stride-2 layers and shift every later feature map by a pixel.
  return ((kernel // 2, kernel // 2),) * 2


class Block(nnx.Module):
  """One residual unit (or its plain twin when `shortcut` is None)."""

  def __init__(self, in_features: int, layers: LayerTable, *, shortcut: str | None,
               preact: bool, zero_init_last_bn: bool, conv: Callable[..., nnx.Conv],
               norm: Callable[..., ops.BatchNorm], rngs: nnx.Rngs):
    self.preact = preact
    self.stride = math.prod(stride for _, _, stride in layers)
    self.in_features, self.out_features = in_features, layers[-1][1]
    conv_inputs = [in_features] + [features for _, features, _ in layers[:-1]]
    self.convs = nnx.List([
        conv(c_in, features, (k, k), strides=stride, padding=_padding(k), rngs=rngs)
        for c_in, (k, features, stride) in zip(conv_inputs, layers)])
    # Post-activation (the paper): BN after every conv, before ReLU (Sec. 3.4).
    # Pre-activation (He et al., 2016): BN-ReLU before every conv.
    norm_features = conv_inputs if preact else [features for _, features, _ in layers]
    last_scale = nnx.initializers.zeros if zero_init_last_bn else nnx.initializers.ones
    self.norms = nnx.List([
        norm(features, scale_init=last_scale if i == len(layers) - 1 and not preact
             else nnx.initializers.ones, rngs=rngs)
        for i, features in enumerate(norm_features)])

    self.shortcut = shortcut
    reshapes = self.stride != 1 or in_features != self.out_features
    projects = shortcut == "C" or (shortcut == "B" and reshapes)
    self.projection = conv(in_features, self.out_features, (1, 1), strides=self.stride,
                           padding=_padding(1), rngs=rngs) if projects else None
    # The pre-activation unit projects the already normalised input (He et al., 2016).
    self.projection_norm = (norm(self.out_features, rngs=rngs)
                            if projects and not preact else None)

  def _identity(self, x: jax.Array) -> jax.Array:
    """Option A: subsample by the stride and zero-pad the new channels."""
    x = x[:, ::self.stride, ::self.stride, :]
    extra = self.out_features - self.in_features
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra))) if extra else x

  def _residual_branch(self, x: jax.Array) -> jax.Array:
    y = x
    for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
      if self.preact:
        y = conv(y if i == 0 else nnx.relu(norm(y)))  # x arrives pre-activated.
      else:
        y = norm(conv(y))
        if i < len(self.convs) - 1:
          y = nnx.relu(y)
    return y

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.preact:
      activated = nnx.relu(self.norms[0](x))
      y = self._residual_branch(activated)
      if self.shortcut is None:
        return y
      return y + (self.projection(activated) if self.projection is not None
                  else self._identity(x))
    y = self._residual_branch(x)
    if self.shortcut is not None:
      y = y + (self.projection_norm(self.projection(x)) if self.projection is not None
               else self._identity(x))
    return nnx.relu(y)


class ResNet(nnx.Module):
  """A stem, stages of blocks, global average pooling and a linear classifier."""

  def __init__(self, *, stage_sizes: Sequence[int], stage_widths: Sequence[int],
               block_layers: Callable[[int, int, bool], LayerTable], imagenet_stem: bool,
               num_classes: int, shortcut: str | None, preact: bool = False,
               stride_on_1x1: bool = True, zero_init_last_bn: bool = False,
               dtype: Any = jnp.float32, rngs: nnx.Rngs):
    if zero_init_last_bn and preact:
      raise ValueError("zero_init_last_bn needs post-activation blocks: a pre-activation "
                       "block ends in a conv, not a BN. Drop one of the two overrides.")
    # Parameters and BN statistics stay float32 whatever the compute dtype.
    conv = functools.partial(nnx.Conv, use_bias=False, kernel_init=he_normal, dtype=dtype,
                             param_dtype=jnp.float32,
                             conv_general_dilated=ops.conv_general_dilated)
    norm = functools.partial(ops.BatchNorm, momentum=0.9, epsilon=1e-5, dtype=dtype,
                             param_dtype=jnp.float32)
    self.preact, self.imagenet_stem = preact, imagenet_stem

    stem_features = stage_widths[0] if imagenet_stem else 16
    kernel, stride = (7, 2) if imagenet_stem else (3, 1)
    self.stem_conv = conv(3, stem_features, (kernel, kernel), strides=stride,
                          padding=_padding(kernel), rngs=rngs)
    # A pre-activation CIFAR net feeds the raw stem conv to its first block's BN-ReLU.
    self.stem_norm = None if preact and not imagenet_stem else norm(stem_features, rngs=rngs)

    blocks, features = [], stem_features
    for stage, (num_blocks, width) in enumerate(zip(stage_sizes, stage_widths)):
      for index in range(num_blocks):
        stride = 2 if stage > 0 and index == 0 else 1
        block = Block(features, block_layers(width, stride, stride_on_1x1), shortcut=shortcut,
                      preact=preact, zero_init_last_bn=zero_init_last_bn, conv=conv,
                      norm=norm, rngs=rngs)
        blocks.append(block)
        features = block.out_features
    self.blocks = nnx.List(blocks)
    self.final_norm = norm(features, rngs=rngs) if preact else None
    self.head = nnx.Linear(features, num_classes, dtype=dtype, param_dtype=jnp.float32,
                           rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.stem_conv(x)
    if self.stem_norm is not None:
      x = nnx.relu(self.stem_norm(x))
    if self.imagenet_stem:
      x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for block in self.blocks:
      x = block(x)
    if self.final_norm is not None:
      x = nnx.relu(self.final_norm(x))
    x = jnp.mean(x, axis=(1, 2))
    return self.head(x).astype(jnp.float32)


# Table 1: blocks per stage of the ImageNet networks.
IMAGENET_DEPTHS = {
    18: (basic_layers, (2, 2, 2, 2)),
    34: (basic_layers, (3, 4, 6, 3)),
    50: (bottleneck_layers, (3, 4, 6, 3)),
    101: (bottleneck_layers, (3, 4, 23, 3)),
    152: (bottleneck_layers, (3, 8, 36, 3)),
}
CIFAR_DEPTHS = (20, 32, 44, 56, 110, 1202)  # Sec. 4.2 / Table 6; any 6n+2 works.

NAMES = tuple([f"cifar_{kind}{d}" for kind in ("resnet", "plain") for d in CIFAR_DEPTHS]
              + [f"{kind}{d}" for kind in ("resnet", "plain") for d in IMAGENET_DEPTHS])

_NAME_PATTERN = re.compile(r"(cifar_)?(resnet|plain)(\d+)")


def _invalid_name(name: str, reason: str) -> ValueError:
  return ValueError(
      f"Unknown model {name!r}: {reason}. Valid names: "
      f"cifar_resnet{{20,32,44,56,110,1202}} and cifar_plain{{...}} (any depth 6n+2 >= 8), "
      f"resnet{{18,34,50,101,152}} and plain{{18,34,50,101,152}}.")


def create(name: str, *, num_classes: int, rngs: nnx.Rngs, shortcut: str | None = None,
           stride_on_1x1: bool = True, preact: bool = False, zero_init_last_bn: bool = False,
           dtype: Any = jnp.float32) -> ResNet:
  """Builds a network of the paper by name, e.g. `create("cifar_resnet110", ...)`.

  Args:
    name: one of `NAMES`, or `cifar_resnet{6n+2}` / `cifar_plain{6n+2}` for any n.
    num_classes: size of the classifier.
    rngs: parameter initialisation keys.
    shortcut: "A", "B" or "C" for residual nets; default "A" on CIFAR (Sec. 4.2)
      and "B" on ImageNet (Sec. 3.3). Plain nets take none.
    stride_on_1x1: bottlenecks subsample in the first 1x1 conv (the paper), or in
      the 3x3 conv when False ("ResNet v1.5").
    preact: pre-activation blocks (He et al., 2016, "Identity Mappings").
    zero_init_last_bn: start each block's last BN scale at zero (off, as the paper).
    dtype: compute dtype (e.g. jnp.bfloat16); parameters and BN stats stay float32.
  """
  match = _NAME_PATTERN.fullmatch(name)
  if not match:
    raise _invalid_name(name, "the name has no known form")
  is_cifar, kind, depth = bool(match.group(1)), match.group(2), int(match.group(3))
  if kind == "plain":
    if shortcut is not None:
      raise ValueError(f"{name} is a plain network and has no shortcut; got shortcut="
                       f"{shortcut!r}. Use the resnet name for a residual network.")
  else:
    shortcut = shortcut or ("A" if is_cifar else "B")
    if shortcut not in SHORTCUTS:
      raise ValueError(f"Unknown shortcut option {shortcut!r}; valid: {SHORTCUTS} (Sec. 3.3).")
  if num_classes < 1:
    raise ValueError(f"num_classes must be positive, got {num_classes}.")
  common = dict(num_classes=num_classes, shortcut=shortcut if kind == "resnet" else None,
                preact=preact, stride_on_1x1=stride_on_1x1,
                zero_init_last_bn=zero_init_last_bn, dtype=dtype, rngs=rngs)
  if is_cifar:
    if depth < 8 or (depth - 2) % 6:
      raise _invalid_name(name, f"CIFAR depth must be 6n+2 with n >= 1, got {depth}")
    # Sec. 4.2: 3 stages of 2n layers with 16/32/64 filters on 32/16/8 maps.
    return ResNet(stage_sizes=((depth - 2) // 6,) * 3, stage_widths=(16, 32, 64),
                  block_layers=basic_layers, imagenet_stem=False, **common)
  if depth not in IMAGENET_DEPTHS:
    raise _invalid_name(name, f"ImageNet depth must be one of {tuple(IMAGENET_DEPTHS)}")
  block_layers, stage_sizes = IMAGENET_DEPTHS[depth]
  return ResNet(stage_sizes=stage_sizes, stage_widths=(64, 128, 256, 512),
                block_layers=block_layers, imagenet_stem=True, **common)


def count_params(model: nnx.Module) -> int:
  """Number of trainable parameters (BN scales and biases included, statistics not)."""
  return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


def count_macs(model: nnx.Module, input_shape: Sequence[int]) -> int:
  """Multiply-accumulates of one eval-mode forward pass.

  `input_shape` is (H, W, C) for one image or (N, H, W, C) for a batch. Counts
  every convolution and matrix product in the traced program (no execution).
  """
  shape = tuple(input_shape)
  if len(shape) == 3:
    shape = (1,) + shape
  graphdef, state = nnx.split(model)

  def forward(x):
    net = nnx.merge(graphdef, state)
    net.eval()
    return net(x)

  closed = jax.make_jaxpr(forward)(jax.ShapeDtypeStruct(shape, jnp.float32))
  return _jaxpr_macs(closed.jaxpr)


def _jaxpr_macs(jaxpr) -> int:
  macs = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      kernel = eqn.invars[1].aval.shape
      rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, *spatial)
      per_output = kernel[rhs_spec[1]] * math.prod(kernel[d] for d in rhs_spec[2:])
      macs += math.prod(eqn.outvars[0].aval.shape) * per_output
    elif eqn.primitive.name == "dot_general":
      (lhs_contracting, _), _ = eqn.params["dimension_numbers"]
      lhs_shape = eqn.invars[0].aval.shape
      macs += (math.prod(eqn.outvars[0].aval.shape)
               * math.prod(lhs_shape[d] for d in lhs_contracting))
    repeats = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
    for sub in jax_core.jaxprs_in_params(eqn.params):
      macs += repeats * _jaxpr_macs(sub)
  return macs
