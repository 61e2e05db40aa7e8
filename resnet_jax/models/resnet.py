"""The networks of "Deep Residual Learning for Image Recognition" as Flax NNX modules.

A network is a `ResNet`: a stem, stages of blocks, global average pooling and an
optional linear classifier. What a block is, and which convolution and batch norm
every layer uses, are arguments (flax's `examples/imagenet` pattern):

    ResNet(block_cls=functools.partial(PostActivationBlock, layers=bottleneck,
                                       shortcut="B"),
           stage_sizes=(3, 4, 6, 3), stage_widths=(64, 128, 256, 512),
           imagenet_stem=True, num_classes=1000, rngs=nnx.Rngs(0))

is ResNet-50, and `create("resnet50", num_classes=1000, rngs=...)` builds the same
by name. A block class is a subclass of `Block`, called as `block_cls(in_features,
width, stride, *, activated_input, conv, norm, rngs)`, which declares whether its
output is activated (`Block.activated_output`); a new block type is a new class
(see `PostActivationBlock`).

Blocks. `PostActivationBlock` is the paper's unit (Fig. 2, Eq. 1 and 2):
BN after every conv, ReLU after the addition (Sec. 3.4). `PreActivationBlock` is
He et al., 2016 ("Identity Mappings in Deep Residual Networks", Eq. 3 and Fig.
4e): BN-ReLU before every conv, nothing after the addition. A block's convs are
a table of `Layer(kernel, features, stride)`: `basic` is two 3x3 convs and
`bottleneck` 1x1, 3x3, 1x1 (Fig. 5). Shortcuts follow Sec. 3.3:

  "A"   identity; where the shape changes, stride-2 subsampling and zero-padded
        extra channels (no parameters).
  "B"   1x1 projection (+BN) only where the shape changes, identity elsewhere.
  "C"   1x1 projection (+BN) on every block.
  None  a plain network: the same stacks with no shortcut at all.

Backbones. `model.intermediates(x)` is a flat dict of name to array: every named
output of the forward pass, in order ("stem_norm", "stem", "block{i}.branch{j}" and
"block{i}" for each block, "stage1" ... "stageK", "pooled", "logits"; see the
method). `model.feature_info` names the feature maps among them that a backbone
user takes, with their channels and strides: "stem" (C1) and each stage (C2 to C5
on ImageNet nets). `model(x)` returns the "logits", or the "pooled" features of a
headless model (`num_classes=0`), so the features are exactly what the classifier
reads. `model.reset_classifier(num_classes, rngs=...)` replaces the classifier
(0: none) as the constructor builds it, in the model's dtype.

Modes. A new model is in training mode: `model(x)` normalises by the batch (by
groups of G images with `norm=functools.partial(BatchNorm, group_size=G)`, as the
trainer builds its models) and updates the BN running statistics. Call `model.eval()` for inference (running
statistics, no update) and `model.train()` to go back. Every module is pure under
`jax.jit` and every JAX transformation through `nnx.split` / `nnx.merge`. Input
is NHWC float.

Initialisation. Conv kernels are `he_normal` (Sec. 3.4, reference [13]), the classifier's
flax's `lecun_normal`, BN scales one and biases zero. A build makes all its kernels' draws in
one compiled program (`_Draws`), bit for bit `jax.random.normal(key, shape) * stddev` as
the initializers op by op, with the keys `rngs` gives them in the same order.

This module imports jax and flax only: no TensorFlow, no dataset code.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from typing import Any, Callable, ClassVar, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
import jax.extend.random
from jax.extend.random import threefry_2x32

# Initialisation of reference [13] (He et al., 2015, "Delving Deep into
# Rectifiers"): zero-mean Gaussian with std sqrt(2 / n), n = k * k * c_in.
he_normal = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")
# flax's default for `nnx.Linear` kernels, the classifier's.
lecun_normal = nnx.initializers.lecun_normal()

SHORTCUTS = ("A", "B", "C")


class FeatureInfo(NamedTuple):
  """A feature map of `ResNet.intermediates` that a backbone user takes (`ResNet.feature_info`)."""
  name: str  # Its key in `ResNet.intermediates`.
  channels: int
  stride: int  # Its reduction: input height (width) / its height (width).


class Layer(NamedTuple):
  """One convolution of a block's residual branch."""
  kernel: int
  features: int
  stride: int


def basic(width: int, stride: int) -> tuple[Layer, ...]:
  """Two 3x3 convs of `width` filters (Fig. 5, left); the first carries the stride."""
  return (Layer(kernel=3, features=width, stride=stride), Layer(kernel=3, features=width, stride=1))


def bottleneck(width: int, stride: int, *, stride_on_1x1: bool = True) -> tuple[Layer, ...]:
  """1x1 reduce, 3x3, 1x1 expand to 4 x `width` (Fig. 5, right).

  The paper's release (and Keras) subsample in the first 1x1 conv; "v1.5"
  (torchvision, most later work) moves the stride to the 3x3 conv
  (`functools.partial(bottleneck, stride_on_1x1=False)`).
  """
  stride_1x1, stride_3x3 = (stride, 1) if stride_on_1x1 else (1, stride)
  return (Layer(kernel=1, features=width, stride=stride_1x1),
          Layer(kernel=3, features=width, stride=stride_3x3),
          Layer(kernel=1, features=4 * width, stride=1))


def padding(kernel: int) -> tuple[tuple[int, int], tuple[int, int]]:
  # Explicit symmetric padding, as Caffe/PyTorch/Keras do; "SAME" would pad
  # (0, 1) on stride-2 layers and shift every later feature map by a pixel.
  return ((kernel // 2, kernel // 2),) * 2


class BatchNorm(nnx.BatchNorm):
  """`nnx.BatchNorm` whose training statistics are those of groups of `group_size` examples.

  The paper's batch norm is Caffe's on each GPU: its CIFAR batch of 128 on two GPUs
  (Sec. 4.2) normalised each GPU's 64 images apart, and its ImageNet training 8 x 32
  (Goyal et al., 2017, Sec. 2.3 and 5.1, who keep 32 per worker at any total batch).
  In training, with `group_size` G, the batch [B, ...] is read as B / G groups of G
  consecutive examples, and each group is normalised by its own mean and variance over
  (G, H, W), as if each were a device of its own. Consecutive examples are on one
  device when G divides the per-device batch, so no statistic then crosses devices.

  The running averages move towards the mean over groups of the group means (the batch
  mean) and of the group (biased) variances: the variance a group of G sees, which is
  what inference then divides by, as a worker of the paper's runs would have kept.

  `group_size` 0 or None is `nnx.BatchNorm` exactly: statistics of the whole batch.
  Inference (`use_running_average`) is `nnx.BatchNorm`'s in every case. Grouping takes
  features last and neither `mask` nor `axis_name`; a batch that is not a multiple of
  G is a ValueError.
  """

  def __init__(self, *args, group_size: int | None = None, **kwargs):
    super().__init__(*args, **kwargs)
    if group_size is not None and group_size < 0:
      raise ValueError(f"group_size must be positive, or 0 for the whole batch; got {group_size}.")
    self.group_size = group_size

  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    use_running_average = (self.use_running_average if use_running_average is None
                           else use_running_average)
    if use_running_average or not self.group_size:
      return super().__call__(x, use_running_average=use_running_average, mask=mask)
    self.check_groups(x, mask)
    scale = self.scale[...] if self.scale is not None else None
    bias = self.bias[...] if self.bias is not None else None
    x, _, _, scale, bias = self.promote_dtype(
        (x, self.mean[...], self.var[...], scale, bias), dtype=self.dtype)
    groups = x.reshape((-1, self.group_size) + x.shape[1:])
    # Statistics in float32 at least, and the variance as nnx.BatchNorm's.
    groups32 = groups.astype(jnp.promote_types(groups.dtype, jnp.float32))
    axes = tuple(range(1, groups.ndim - 1))
    mean = jnp.mean(groups32, axes, keepdims=True)
    if self.use_fast_variance:
      var = jnp.maximum(0.0, jnp.mean(jnp.square(groups32), axes, keepdims=True)
                        - jnp.square(mean))
    else:
      var = jnp.mean(jnp.square(groups32 - mean), axes, keepdims=True)
    multiplier = lax.rsqrt(var + self.epsilon)
    if scale is not None:
      multiplier = multiplier * scale
    y = (groups - mean) * multiplier
    if bias is not None:
      y = y + bias
    self.update_running_averages(mean.reshape(-1, x.shape[-1]), var.reshape(-1, x.shape[-1]))
    return y.astype(x.dtype).reshape(x.shape)

  def check_groups(self, x: jax.Array, mask) -> None:
    """Raises ValueError where `x` cannot be normalised in groups of `group_size`."""
    if mask is not None or self.axis_name is not None or self.axis not in (-1, x.ndim - 1):
      raise ValueError("BatchNorm groups need features last and no mask or axis_name; use "
                       "group_size=0 (statistics of the whole batch) for those.")
    if x.shape[0] % self.group_size:
      raise ValueError(f"a batch of {x.shape[0]} does not split into batch norm groups of "
                       f"{self.group_size}; use a batch size that is a multiple of "
                       f"{self.group_size}, or another group size.")

  def update_running_averages(self, group_means: jax.Array, group_vars: jax.Array) -> None:
    """Moves the running averages towards the mean over groups (axis 0) of each statistic.

    As nnx.BatchNorm, the running averages are never differentiated.
    """
    for stat, value in ((self.mean, group_means), (self.var, group_vars)):
      stat[...] = lax.stop_gradient(
          self.momentum * stat[...] + (1 - self.momentum) * jnp.mean(value, axis=0))


def _drawn_together(key: jax.Array, shape: Sequence[int], dtype: Any) -> bool:
  """Whether `_Draws` reproduces `key`'s draw of `shape` and `dtype` bit for bit: a float32
  draw of fewer than 2**32 elements from a threefry key, under `jax_threefry_partitionable`."""
  return (dtype == jnp.float32 and math.prod(shape) < 2**32
          and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ()
          and str(jax.random.key_impl(key)) == "threefry2x32"
          and jax.config.jax_threefry_partitionable)


class _Draws:
  """The Gaussian draws of one `ResNet` build, made in one compiled program.

  Op by op, each initializer call compiles a program of its own (JAX compiles per shape):
  most of a build's time on a CPU. `ResNet` records its conv kernels' draws (`he_normal`) and
  its classifier kernel's (`lecun_normal`) with their keys, as `jax.ShapeDtypeStruct`
  placeholders, and `fill` makes them all in one program (`_draw`, cached per layout) and
  sets them in the model. Each value is `jax.random.normal(key, shape) * stddev` (or
  `truncated_normal(key, -2, 2, shape) * stddev`), the stddev `variance_scaling`'s, bit for
  bit: with `jax_threefry_partitionable` (JAX's default), element i of a threefry key's draw
  depends on the key and i alone, so one threefry over every (key, i) pair gives every
  array's random bits, and `jax.random`'s own float maps make them normal. A draw
  `_drawn_together` cannot reproduce (another PRNG, dtype or option) is made op by op.
  """

  def __init__(self):
    self.keys, self.stddevs, self.layout, self.placeholders = [], [], [], []

  def he_normal(self, key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32):
    return self.record(key, shape, dtype, "normal")

  def lecun_normal(self, key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32):
    return self.record(key, shape, dtype, "truncated_normal")

  def record(self, key: jax.Array, shape: Sequence[int], dtype: Any, distribution: str):
    """A placeholder for `key`'s draw (`he_normal`'s or `lecun_normal`'s), or the draw itself
    where `_drawn_together` says no."""
    shape = tuple(shape)
    if not _drawn_together(key, shape, dtype):
      return (he_normal if distribution == "normal" else lecun_normal)(key, shape, dtype)
    # The standard deviation as `variance_scaling` computes it (fan in: all but the last axis).
    stddev = jnp.sqrt(jnp.array((2.0 if distribution == "normal" else 1.0)
                                / math.prod(shape[:-1]), jnp.float32))
    if distribution == "truncated_normal":  # The stddev of a standard normal cut at +-2.
      stddev = stddev / jnp.array(.87962566103423978, jnp.float32)
    self.keys.append(key)
    self.stddevs.append(stddev)
    self.layout.append((shape, distribution))
    self.placeholders.append(jax.ShapeDtypeStruct(shape, dtype))
    return self.placeholders[-1]

  def fill(self, module: nnx.Module) -> None:
    """Sets every recorded draw in the variable of `module` holding its placeholder."""
    if not self.keys:
      return
    layout = tuple(self.layout)
    flat = _draw(self.keys, self.stddevs, layout=layout)
    try:  # Concrete: cut on the host, as one compiled program per array would take longer.
      host = np.asarray(flat)
      # Uncommitted, as an op-by-op draw is: the trainer then places them on its global mesh
      # (a committed array there would be a cross-host transfer).
      cut = lambda start, size, shape: jnp.asarray(host[start:start + size].reshape(shape))
    except jax.errors.TracerArrayConversionError:  # Traced (nnx.eval_shape, jit): in the trace.
      cut = lambda start, size, shape: flat[start:start + size].reshape(shape)
    values = [cut(start, math.prod(shape), shape)
              for start, (shape, _) in zip(_starts(layout), layout)]
    index = {id(placeholder): i for i, placeholder in enumerate(self.placeholders)}
    filled = 0
    for _, node in nnx.iter_graph(module):
      if isinstance(node, nnx.Variable) and id(node.get_value()) in index:
        node.set_value(values[index[id(node.get_value())]])
        filled += 1
    if filled != len(self.placeholders):
      raise ValueError("A conv layer changed the kernel its kernel_init returned: ResNet's conv "
                       "must hold kernel_init's value as its kernel variable, as nnx.Conv does.")


@functools.cache
def _bits_as_key(size: int):
  """A PRNG implementation whose key is `size` random 32-bit words, which it returns as its
  random bits: `jax.random`'s float maps applied to bits made elsewhere."""
  def random_bits(words: jax.Array, bit_width: int, shape: Sequence[int]) -> jax.Array:
    if bit_width != 32 or math.prod(shape) != size:
      raise NotImplementedError(f"{size} 32-bit words cannot be {bit_width}-bit bits of {shape}.")
    return words.reshape(shape)

  def cannot(*args):
    raise NotImplementedError("a key of precomputed bits is only drawn from, once.")

  return jax.extend.random.define_prng_impl(
      key_shape=(size,), seed=cannot, split=cannot, random_bits=random_bits, fold_in=cannot,
      name=f"bits{size}")


_ROW = 4096  # `_draw` makes each array in rows of this many elements.


def _order(layout: tuple[tuple[tuple[int, ...], str], ...]) -> list[int]:
  """The order in which `_draw` lays out `layout`'s arrays: the normal ones first."""
  return sorted(range(len(layout)), key=lambda i: layout[i][1] != "normal")


def _starts(layout: tuple[tuple[tuple[int, ...], str], ...]) -> list[int]:
  """Where each of `layout`'s arrays starts in `_draw`'s output: each at a row of its own."""
  starts, row = [0] * len(layout), 0
  for i in _order(layout):
    starts[i] = row * _ROW
    row += -(-math.prod(layout[i][0]) // _ROW)
  return starts


@functools.partial(jax.jit, static_argnames=("layout",))
def _draw(keys: list[jax.Array], stddevs: list[jax.Array],
          layout: tuple[tuple[tuple[int, ...], str], ...]) -> jax.Array:
  """`_Draws`' arrays, flat, each from `_starts`: per (shape, distribution) of `layout`, its
  key's `jax.random.normal` or `truncated_normal(-2, 2)` draw times its stddev.

  Every array is cut in rows of `_ROW` elements (its normal ones first), so that all their
  random bits are one threefry over a [rows, _ROW] grid of counters: row r of an array holds
  elements r * _ROW onwards of its key's bits, as `jax.random.bits` makes them under
  `jax_threefry_partitionable` (element i: the threefry hash of the counter pair (0, i), its
  two words xored). `jax.random.normal` and `truncated_normal` then map the normal and the
  truncated arrays' rows (`_bits_as_key`).
  """
  order = _order(layout)
  sizes = [math.prod(layout[i][0]) for i in order]
  rows_per_array = [-(-size // _ROW) for size in sizes]
  array_of_row = np.repeat(np.arange(len(order)), rows_per_array)
  first_row = np.cumsum([0] + rows_per_array)
  row_starts = ((np.arange(len(array_of_row)) - first_row[array_of_row]) * _ROW).astype(np.uint32)
  counters = row_starts[:, None] + lax.iota(jnp.uint32, _ROW)[None, :]
  key_data = jnp.stack([jax.random.key_data(keys[i]) for i in order])[array_of_row]
  hashed = jax.vmap(jax.vmap(lambda k1, k2, count: threefry_2x32((k1, k2), count)))(
      jnp.broadcast_to(key_data[:, :1], counters.shape),
      jnp.broadcast_to(key_data[:, 1:], counters.shape),
      jnp.stack([jnp.zeros_like(counters), counters], axis=-1))
  bits = hashed[..., 0] ^ hashed[..., 1]
  normal_rows = int(first_row[sum(layout[i][1] == "normal" for i in order)])
  draws = []
  for rows, draw in ((bits[:normal_rows], jax.random.normal),
                     (bits[normal_rows:], functools.partial(jax.random.truncated_normal,
                                                            lower=-2, upper=2))):
    if rows.size:
      key = jax.random.wrap_key_data(rows.reshape(-1), impl=_bits_as_key(rows.size))
      draws.append(draw(key, shape=rows.shape, dtype=jnp.float32))
  # The barrier keeps XLA from folding the float map's constant sqrt(2) into the stddev,
  # which would move last bits: each draw is multiplied by its stddev as a separate op.
  scaled = (lax.optimization_barrier(jnp.concatenate(draws))
            * jnp.stack([stddevs[i] for i in order])[array_of_row][:, None])
  return scaled.reshape(-1)


def _check_shortcut(shortcut: str | None) -> None:
  """Raises ValueError unless `shortcut` is one of `SHORTCUTS` or None (a plain block)."""
  if shortcut not in SHORTCUTS + (None,):
    raise ValueError(f"Unknown shortcut option {shortcut!r}; valid: {SHORTCUTS} (Sec. 3.3), "
                     "or None for a plain block.")


class Block(nnx.Module):
  """A residual unit as `ResNet` builds and calls it; a new block type is a subclass.

  `ResNet` builds each block as `block_cls(in_features, width, stride, *,
  activated_input, conv, norm, rngs)`, its other options bound with
  `functools.partial`. `activated_input` says whether the block's input is
  already a BN-ReLU output: true of the stem's output, and of the output of a
  block whose class sets `activated_output`. After a last block whose output is
  not activated (a raw sum), `ResNet` adds a final BN-ReLU.

  A subclass sets `activated_output` and implements `intermediates`. This base
  builds the convs of the layer table (`convs`, `out_features`) and the
  shortcut's 1x1 projection where the option asks for one (`projection`, Sec. 3.3).
  """

  activated_output: ClassVar[bool]

  def __init__(self, in_features: int, width: int, stride: int, *,
               layers: Callable[[int, int], Sequence[Layer]], shortcut: str | None,
               conv: Callable[..., nnx.Module], rngs: nnx.Rngs):
    _check_shortcut(shortcut)
    table = tuple(layers(width, stride))
    self.shortcut = shortcut
    self.stride = math.prod(layer.stride for layer in table)
    self.in_features, self.out_features = in_features, table[-1].features
    self.conv_inputs = [in_features] + [layer.features for layer in table[:-1]]
    self.convs = nnx.List([
        conv(c_in, layer.features, (layer.kernel, layer.kernel), strides=layer.stride,
             padding=padding(layer.kernel), rngs=rngs)
        for c_in, layer in zip(self.conv_inputs, table)])
    self.reshapes = self.stride != 1 or in_features != self.out_features
    projects = shortcut == "C" or (shortcut == "B" and self.reshapes)
    self.projection = conv(in_features, self.out_features, (1, 1), strides=self.stride,
                           padding=padding(1), rngs=rngs) if projects else None

  def identity(self, x: jax.Array) -> jax.Array:
    """Option A: subsample by the stride and zero-pad the new channels."""
    x = x[:, ::self.stride, ::self.stride, :]
    extra = self.out_features - self.in_features
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra))) if extra else x

  def intermediates(self, x: jax.Array) -> dict[str, Any]:
    """The block's named outputs on NHWC `x`: "output", the block's output, and
    "residual_branch", each layer's output of F (the last is F(x))."""
    raise NotImplementedError(f"{type(self).__name__} must implement intermediates.")

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.intermediates(x)["output"]


class PostActivationBlock(Block):
  """The paper's residual unit: y = ReLU(F(x) + shortcut(x)) (Eq. 1, 2; Fig. 2).

  Each conv of F is followed by BN (Sec. 3.4) and all but the last by ReLU. A
  new block type overrides `residual_branch`, e.g. squeeze-and-excitation:

      class SEBlock(PostActivationBlock):
        def __init__(self, in_features, width, stride, *, rngs, **kwargs):
          super().__init__(in_features, width, stride, rngs=rngs, **kwargs)
          self.squeeze = nnx.Linear(self.out_features, self.out_features // 16, rngs=rngs)
          self.excite = nnx.Linear(self.out_features // 16, self.out_features, rngs=rngs)

        def residual_branch(self, x):
          outputs = super().residual_branch(x)
          gate = nnx.sigmoid(self.excite(nnx.relu(self.squeeze(outputs[-1].mean((1, 2))))))
          return outputs + (outputs[-1] * gate[:, None, None, :],)

      ResNet(block_cls=functools.partial(SEBlock, layers=bottleneck, shortcut="B"), ...)

  Its output is activated (the ReLU after the addition). Its residual branch and
  shortcut read the input as it is, whatever `activated_input` says.
  """

  activated_output: ClassVar[bool] = True

  def __init__(self, in_features: int, width: int, stride: int, *,
               conv: Callable[..., nnx.Module], norm: Callable[..., nnx.Module], rngs: nnx.Rngs,
               layers: Callable[[int, int], Sequence[Layer]] = basic,
               shortcut: str | None = "A", activated_input: bool = False,
               zero_init_last_bn: bool = False):
    del activated_input  # Read as it is either way (see the class doc).
    super().__init__(in_features, width, stride, layers=layers, shortcut=shortcut, conv=conv,
                     rngs=rngs)
    last_scale = nnx.initializers.zeros if zero_init_last_bn else nnx.initializers.ones
    self.norms = nnx.List([
        norm(c.out_features, rngs=rngs,
             scale_init=last_scale if i == len(self.convs) - 1 else nnx.initializers.ones)
        for i, c in enumerate(self.convs)])
    self.projection_norm = (norm(self.out_features, rngs=rngs)
                            if self.projection is not None else None)

  def residual_branch(self, x: jax.Array) -> tuple[jax.Array, ...]:
    """Each layer's output, after its BN and before any ReLU or addition; the last is F(x)."""
    outputs, y = [], x
    for conv, norm in zip(self.convs, self.norms):
      y = norm(conv(nnx.relu(y) if outputs else y))
      outputs.append(y)
    return tuple(outputs)

  def intermediates(self, x: jax.Array) -> dict[str, Any]:
    outputs = {"residual_branch": self.residual_branch(x)}
    y = outputs["residual_branch"][-1]
    if self.shortcut is not None:
      y = y + (self.projection_norm(self.projection(x)) if self.projection is not None
               else self.identity(x))
    outputs["output"] = nnx.relu(y)
    return outputs


class PreActivationBlock(Block):
  """He et al., 2016: x_{l+1} = x_l + F(x_l) (their Eq. 3; Fig. 4e, "full pre-activation").

  BN-ReLU before every conv; the addition is the unit's output (no ReLU after
  it). As in the authors' code, a unit that changes the shape applies its first
  BN-ReLU before the split, so its shortcut (subsampling or projection, no BN)
  reads the activated input; every other unit's shortcut is the raw x_l. The
  net's first unit follows the stem's BN-ReLU ("activation right after conv1 and
  before splitting into two paths", their Sec. 4): `ResNet` passes it
  `activated_input=True`, which drops its own input BN-ReLU. Its output is the
  raw sum, so a net of these ends in a BN-ReLU ("an extra activation right after
  [the last unit's] element-wise addition").
  """

  activated_output: ClassVar[bool] = False

  def __init__(self, in_features: int, width: int, stride: int, *,
               conv: Callable[..., nnx.Module], norm: Callable[..., nnx.Module], rngs: nnx.Rngs,
               layers: Callable[[int, int], Sequence[Layer]] = basic,
               shortcut: str | None = "A", activated_input: bool = False):
    super().__init__(in_features, width, stride, layers=layers, shortcut=shortcut, conv=conv,
                     rngs=rngs)
    self.input_norm = None if activated_input else norm(in_features, rngs=rngs)
    self.norms = nnx.List([norm(c.out_features, rngs=rngs) for c in self.convs[:-1]])

  def residual_branch(self, x: jax.Array) -> tuple[jax.Array, ...]:
    """Each conv's output (before the next BN-ReLU); the last is F(x). x is activated."""
    outputs = [self.convs[0](x)]
    for conv, norm in zip(self.convs[1:], self.norms):
      outputs.append(conv(nnx.relu(norm(outputs[-1]))))
    return tuple(outputs)

  def intermediates(self, x: jax.Array) -> dict[str, Any]:
    activated = x if self.input_norm is None else nnx.relu(self.input_norm(x))
    outputs = {"residual_branch": self.residual_branch(activated)}
    y = outputs["residual_branch"][-1]
    if self.shortcut is not None:
      shortcut_input = activated if self.reshapes else x
      y = y + (self.projection(shortcut_input) if self.projection is not None
               else self.identity(shortcut_input))
    outputs["output"] = y
    return outputs


class ResNet(nnx.Module):
  """A stem, stages of blocks, global average pooling and an optional linear classifier.

  Args:
    block_cls: a `Block` class, called as `block_cls(in_features, width, stride,
      *, activated_input, conv, norm, rngs)`; its other options bound with
      `functools.partial`.
    stage_sizes: blocks per stage; every stage after the first halves the
      feature map in its first block.
    stage_widths: each stage's width (a bottleneck's output is 4x its width).
    imagenet_stem: 7x7/2 conv, BN-ReLU, 3x3/2 max pool (Table 1); else a 3x3
      conv and BN-ReLU (the CIFAR nets, Sec. 4.2). Stem width: `stage_widths[0]`.
    num_classes: classifier outputs; 0 for a headless model whose call returns
      the pooled features.
    conv: the convolution class, with `nnx.Conv`'s signature; bound here to no
      bias, He initialisation, explicit symmetric padding and `dtype`.
    norm: the batch norm class, with `nnx.BatchNorm`'s signature; bound here to
      momentum 0.9 and epsilon 1e-5.
    dtype: compute dtype; parameters and BN statistics stay float32.

  Attributes (besides the layers): `dtype`; `num_features`, the width of the
  pooled features; `feature_info`, a `FeatureInfo` (name, channels, stride) per
  backbone feature map of `intermediates`, in forward order: "stem" (stride 2 on
  ImageNet nets, 1 on CIFAR nets) and "stage1" ... "stageK" (each stage after the
  first doubling the stride).
  """

  def __init__(self, *, block_cls: Callable[..., nnx.Module], stage_sizes: Sequence[int],
               stage_widths: Sequence[int], imagenet_stem: bool, num_classes: int,
               conv: Callable[..., nnx.Module] = nnx.Conv,
               norm: Callable[..., nnx.Module] = nnx.BatchNorm,
               dtype: Any = jnp.float32, rngs: nnx.Rngs):
    draws = _Draws()
    conv = functools.partial(conv, use_bias=False, kernel_init=draws.he_normal, dtype=dtype,
                             param_dtype=jnp.float32)
    norm = functools.partial(norm, momentum=0.9, epsilon=1e-5, dtype=dtype,
                             param_dtype=jnp.float32)
    self.imagenet_stem, self.stage_sizes, self.dtype = imagenet_stem, tuple(stage_sizes), dtype
    features = stage_widths[0]
    kernel, stride = (7, 2) if imagenet_stem else (3, 1)
    self.stem_conv = conv(3, features, (kernel, kernel), strides=stride,
                          padding=padding(kernel), rngs=rngs)
    self.stem_norm = norm(features, rngs=rngs)
    feature_info = [FeatureInfo("stem", features, stride)]
    if imagenet_stem:
      stride *= 2  # The 3x3/2 max pool.

    blocks = []
    activated = True  # The stem ends in BN-ReLU.
    for stage, (num_blocks, width) in enumerate(zip(stage_sizes, stage_widths)):
      for index in range(num_blocks):
        block = block_cls(features, width, 2 if stage > 0 and index == 0 else 1,
                          activated_input=activated, conv=conv, norm=norm, rngs=rngs)
        blocks.append(block)
        features, activated = block.out_features, block.activated_output
        stride *= block.stride
      feature_info.append(FeatureInfo(f"stage{stage + 1}", features, stride))
    self.blocks = nnx.List(blocks)
    self.feature_info = tuple(feature_info)
    self.num_features = features
    # The pooled features are activated: after a last block that ends in a raw sum, a BN-ReLU.
    self.final_norm = None if activated else norm(features, rngs=rngs)
    self.head = self._classifier(num_classes, rngs, kernel_init=draws.lecun_normal)
    draws.fill(self)

  def reset_classifier(self, num_classes: int, *, rngs: nnx.Rngs) -> None:
    """Replaces the classifier by a new one with `num_classes` outputs, or by none (0).

    The one way the classifier is built, the constructor's included: an `nnx.Linear`
    from the `num_features` pooled features, computing in the model's `dtype` with
    float32 parameters, flax's initialisation drawn from `rngs`. So a headless
    model given a head from the `nnx.Rngs` object it was built with equals the
    model built with that class count. Everything else (weights, BN statistics,
    mode) is kept; with 0, the model is headless and its call returns the pooled
    features.
    Fine-tuning a pretrained net on new classes: `model.reset_classifier(10, rngs=...)`.
    """
    self.head = self._classifier(num_classes, rngs, kernel_init=lecun_normal)

  def _classifier(self, num_classes: int, rngs: nnx.Rngs, kernel_init: Callable[..., Any]):
    """`reset_classifier`'s head, its kernel drawn by `kernel_init` (the constructor's draws
    the kernel with the conv kernels, `_Draws`; the same values as `lecun_normal`)."""
    if num_classes < 0:
      raise ValueError(f"num_classes must be positive (or 0 for a headless model), "
                       f"got {num_classes}.")
    # Marked data: a head of None (headless) would otherwise make the attribute static.
    return nnx.data(nnx.Linear(self.num_features, num_classes, dtype=self.dtype,
                               param_dtype=jnp.float32, kernel_init=kernel_init, rngs=rngs)
                    if num_classes else None)

  def intermediates(self, x: jax.Array) -> dict[str, jax.Array]:
    """Every named output of the forward pass on NHWC images `x`, in forward order.

    "stem_norm": the stem conv after its BN, before ReLU.
    "stem": the stem's BN-ReLU output, Table 1's conv1 (C1). On an ImageNet net
      the 3x3/2 max pool follows (Table 1 counts it in conv2_x), and its output
      is the first block's input.
    "block{i}.branch{j}": of block i (from 1: `model.blocks[i - 1]`), the j-th
      output of its residual branch F ("residual_branch" of `Block.intermediates`;
      the last is F(x)). For the paper's blocks, layer j's output after its BN and
      before any ReLU or addition (see the block class).
    "block{i}": block i's output, the next block's input.
    "stage1" ... "stageK": each stage's output, that of its last block (Table 1's
      conv2_x to conv5_x: C2 to C5 of an ImageNet net). A pre-activation net's
      are the raw sums, before the final BN-ReLU.
    "pooled": the globally averaged features the classifier reads.
    "logits": float32 classifier outputs (absent on a headless model).

    `feature_info` lists the feature maps a backbone takes ("stem" and the
    stages) with their channels and strides. Under jit, XLA computes only what is
    used of the result.
    """
    out = {"stem_norm": self.stem_norm(self.stem_conv(x))}
    x = out["stem"] = nnx.relu(out["stem_norm"])
    if self.imagenet_stem:
      x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    stage_of_last_block = {end: stage for stage, end
                           in enumerate(itertools.accumulate(self.stage_sizes), start=1)}
    for i, block in enumerate(self.blocks, start=1):
      block_out = block.intermediates(x)
      for j, y in enumerate(block_out["residual_branch"], start=1):
        out[f"block{i}.branch{j}"] = y
      x = out[f"block{i}"] = block_out["output"]
      if i in stage_of_last_block:
        out[f"stage{stage_of_last_block[i]}"] = x
    if self.final_norm is not None:
      x = nnx.relu(self.final_norm(x))
    out["pooled"] = jnp.mean(x, axis=(1, 2))
    if self.head is not None:
      out["logits"] = self.head(out["pooled"]).astype(jnp.float32)
    return out

  def __call__(self, x: jax.Array) -> jax.Array:
    """Logits; the pooled features on a headless model."""
    out = self.intermediates(x)
    return out["logits"] if self.head is not None else out["pooled"]


# Table 1: the layer table and blocks per stage of the ImageNet networks.
IMAGENET_DEPTHS = {
    18: (basic, (2, 2, 2, 2)),
    34: (basic, (3, 4, 6, 3)),
    50: (bottleneck, (3, 4, 6, 3)),
    101: (bottleneck, (3, 4, 23, 3)),
    152: (bottleneck, (3, 8, 36, 3)),
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
           dtype: Any = jnp.float32, conv: Callable[..., nnx.Module] = nnx.Conv,
           norm: Callable[..., nnx.Module] = nnx.BatchNorm) -> ResNet:
  """Builds a network of the paper by name, e.g. `create("cifar_resnet110", ...)`.

  The model starts in training mode (see the module doc): call `.eval()` before
  inference.

  Args:
    name: one of `NAMES`, or `cifar_resnet{6n+2}` / `cifar_plain{6n+2}` for any n.
    num_classes: size of the classifier; 0 for a headless backbone whose call
      returns the pooled features.
    rngs: parameter initialisation keys.
    shortcut: "A", "B" or "C" for residual nets; default "A" on CIFAR (Sec. 4.2)
      and "B" on ImageNet (Sec. 3.3). Plain nets take none.
    stride_on_1x1: bottlenecks subsample in the first 1x1 conv (the paper), or in
      the 3x3 conv when False ("ResNet v1.5", torchvision's).
    preact: `PreActivationBlock`s (He et al., 2016, "Identity Mappings"). With
      bottlenecks, the default stride placement is the authors' CIFAR code's;
      fb.resnet.torch's ImageNet pre-activation nets use `stride_on_1x1=False`.
    zero_init_last_bn: start each block's last BN scale at zero (off, as the paper).
    dtype: compute dtype (e.g. jnp.bfloat16); parameters and BN stats stay float32.
    conv, norm: the convolution and batch norm classes (see `ResNet`).
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
    # The blocks check it too, but only after the stem is built: fail before any computation.
    _check_shortcut(shortcut)
  if num_classes < 0:
    raise ValueError(f"num_classes must be positive (or 0 for a headless model), "
                     f"got {num_classes}.")
  if zero_init_last_bn and preact:
    raise ValueError("zero_init_last_bn needs post-activation blocks: a pre-activation "
                     "block ends in a conv, not a BN. Drop one of the two overrides.")
  if is_cifar:
    if depth < 8 or (depth - 2) % 6:
      raise _invalid_name(name, f"CIFAR depth must be 6n+2 with n >= 1, got {depth}")
    # Sec. 4.2: 3 stages of 2n layers with 16/32/64 filters on 32/16/8 maps.
    layers, stage_sizes, stage_widths = basic, ((depth - 2) // 6,) * 3, (16, 32, 64)
  elif depth in IMAGENET_DEPTHS:
    layers, stage_sizes = IMAGENET_DEPTHS[depth]
    stage_widths = (64, 128, 256, 512)
    if layers is bottleneck:
      layers = functools.partial(bottleneck, stride_on_1x1=stride_on_1x1)
  else:
    raise _invalid_name(name, f"ImageNet depth must be one of {tuple(IMAGENET_DEPTHS)}")
  block_options = {"layers": layers, "shortcut": shortcut if kind == "resnet" else None}
  if preact:
    block_cls = functools.partial(PreActivationBlock, **block_options)
  else:
    block_cls = functools.partial(PostActivationBlock, zero_init_last_bn=zero_init_last_bn,
                                  **block_options)
  return ResNet(block_cls=block_cls, stage_sizes=stage_sizes, stage_widths=stage_widths,
                imagenet_stem=not is_cifar, num_classes=num_classes, conv=conv, norm=norm,
                dtype=dtype, rngs=rngs)


def count_params(model: nnx.Module) -> int:
  """Number of trainable parameters (BN scales and biases included, statistics not)."""
  return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))
