"""Published weights for our ResNets: Keras Applications, torchvision and akamaster's CIFAR nets.

`from_keras` copies a Keras Applications ResNet-50/101/152 (the paper's
architecture, stride in each bottleneck's first 1x1 conv). `from_torchvision`
reads a torchvision ResNet-18/34/50/101/152 state dict (a mapping, a `.pth` or a
`.npz` file) into the "v1.5" network (stride in the 3x3 conv), and
`to_torchvision` writes such a network back as a torchvision state dict.
`from_akamaster` reads the CIFAR-10 ResNet-20 to 1202 of akamaster/pytorch_resnet_cifar10
(his `.th` checkpoints) into our CIFAR nets. `Preprocessing` is what a model's weights
expect of their input (each source's is a constant here), and `Trained` a model with it, as
loaders that know it return them (`resnet_jax.training.runs.load_model`, for a run of our
trainer).

This module imports no Keras, TensorFlow or PyTorch at import time: `from_keras`
reads the Keras model it is given through `layers`, `get_layer` and `get_weights`
only; `from_torchvision` and `from_akamaster` read tensors duck-typed and import
torch only to open a torch file.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from resnet_jax import models

@dataclasses.dataclass(frozen=True, eq=False)
class Preprocessing:
  """What a model's weights expect of their input, made from RGB pixels in [0, 255].

  `preprocessing(pixels)` is `(pixels - mean) / std` on float NHWC `pixels`, their channels
  first reversed to BGR where `bgr` is set (Caffe's order, which Keras's ImageNet weights
  read). `mean` and `std` are in pixel units, in the channel order the model reads, and
  broadcast against an image: channel values [3], or a per-pixel mean image [H, W, 3] (the
  paper's, Secs. 3.4 and 4.2), which is resized bilinearly to images of another size as
  our pipelines resize it.
  """

  mean: np.ndarray
  std: np.ndarray | float = 1.0
  bgr: bool = False

  def __call__(self, pixels: jax.Array) -> jax.Array:
    pixels = jnp.asarray(pixels, jnp.float32)
    if self.bgr:
      pixels = pixels[..., ::-1]
    mean = jnp.asarray(self.mean, jnp.float32)
    if mean.ndim == 3 and mean.shape[:2] not in ((1, 1), pixels.shape[-3:-1]):
      mean = jax.image.resize(mean, pixels.shape[-3:-1] + mean.shape[-1:], "bilinear")
    normalised = pixels - mean
    # A unit std is skipped, so that a mean-only preprocessing is the trainer's subtraction.
    if np.any(np.asarray(self.std) != 1):
      normalised = normalised / jnp.asarray(self.std, jnp.float32)
    return normalised


class Trained(NamedTuple):
  """A trained model, in eval mode, and the preprocessing its weights expect:
  `trained.model(trained.preprocessing(pixels))` scores RGB pixels in [0, 255]."""

  model: models.ResNet
  preprocessing: Preprocessing


# torchvision's ImageNet normalisation, of RGB images scaled to [0, 1]: here in pixel units.
TORCHVISION_PREPROCESSING = Preprocessing(
    mean=255 * np.array([0.485, 0.456, 0.406], np.float32),
    std=255 * np.array([0.229, 0.224, 0.225], np.float32))
# akamaster/pytorch_resnet_cifar10's CIFAR-10 input (trainer.py: ToTensor, then Normalize):
# RGB scaled to [0, 1], normalised by the ImageNet statistics, not CIFAR-10's own. The same
# numbers as TORCHVISION_PREPROCESSING, named for the weights that expect them.
AKAMASTER_PREPROCESSING = Preprocessing(
    mean=255 * np.array([0.485, 0.456, 0.406], np.float32),
    std=255 * np.array([0.229, 0.224, 0.225], np.float32))
# keras.applications.resnet.preprocess_input ("caffe" mode): BGR less the ImageNet BGR means.
KERAS_PREPROCESSING = Preprocessing(mean=np.array([103.939, 116.779, 123.68], np.float32),
                                    bgr=True)

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


def _loaded(model: models.ResNet) -> models.ResNet:
  """`model`, built shapes-only, once every variable has a value: in eval mode."""
  leftover = [jax.tree_util.keystr(path)
              for path, leaf in jax.tree.leaves_with_path(nnx.state(model))
              if isinstance(leaf, jax.ShapeDtypeStruct)]
  assert not leftover, f"Unassigned variables: {leftover}"
  model.eval()
  return model


_KERAS_CONSTRUCTORS = {"resnet50": "ResNet50", "resnet101": "ResNet101",
                       "resnet152": "ResNet152"}
# The networks of Keras's weights files (`from_keras(path, name)`).
KERAS_NAMES = tuple(_KERAS_CONSTRUCTORS)


def _load_keras(path: str | os.PathLike, name: str | None) -> Any:
  """The Keras model a local `.keras` file holds, or the `name` network with an `.h5`'s weights."""
  path = os.fspath(path)
  if not epath.Path(path).is_file():
    raise ValueError(f"Keras file {path!r} does not exist.")
  if not path.endswith(".keras") and name not in _KERAS_CONSTRUCTORS:
    raise ValueError(f"A Keras weights file needs the network's name: from_keras({path!r}, "
                     f"name=...) with one of {tuple(_KERAS_CONSTRUCTORS)}; got {name!r}.")
  try:
    import keras  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise ValueError(f"Reading {path!r} needs Keras ({error}); install tensorflow or keras, "
                     "or pass a Keras model.") from error
  try:
    if path.endswith(".keras"):
      return keras.models.load_model(path, compile=False)
    return getattr(keras.applications, _KERAS_CONSTRUCTORS[name])(
        weights=path, classifier_activation=None)
  except Exception as error:  # pylint: disable=broad-except
    raise ValueError(f"Keras could not read {path!r}: {error}".splitlines()[0]) from error


def from_keras(keras_model_or_path: Any, name: str | None = None, *,
               dtype: Any = jnp.float32) -> models.ResNet:
  """Our ResNet-50/101/152 with the weights of a Keras Applications ResNet (v1).

  The route for published ImageNet weights into JAX, from local files only:

    # Keras's published ImageNet weights file (1000 classes), or a `.keras` model file:
    model = pretrained.from_keras("resnet50_weights_tf_dim_ordering_tf_kernels.h5",
                                  "resnet50")
    # or a Keras model you built:
    model = pretrained.from_keras(keras.applications.ResNet50(weights=None, classes=10))
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
    keras_model_or_path: `keras.applications.ResNet50/101/152(include_top=True,
      ...)`, any weights, any input size, read duck-typed; or the path of a
      `.keras` file holding one; or the path of a weights file (`.h5`) of one
      with 1000 classes, read into `keras.applications`'s network `name` (these
      two import keras; nothing downloads).
    name: "resnet50", "resnet101" or "resnet152", for a weights file only.
    dtype: compute dtype of the returned model; its parameters are float32.

  Returns:
    A `models.ResNet` in eval mode. It returns logits: Keras's default softmax
    classifier activation is not applied.

  Raises:
    ValueError: for any other Keras model (ResNetV2, include_top=False,
      channels_first, an unknown depth, a non-ResNet), or a file that is missing
      or that Keras cannot read.
  """
  keras_model = keras_model_or_path
  if isinstance(keras_model_or_path, (str, os.PathLike)):
    keras_model = _load_keras(keras_model_or_path, name)
  stage_sizes = _stage_sizes(keras_model)
  depths = {sizes: depth for depth, (layers, sizes) in models.IMAGENET_DEPTHS.items()
            if layers is models.bottleneck}
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

  return _loaded(model)


TORCHVISION_NAMES = tuple(f"resnet{depth}" for depth in models.IMAGENET_DEPTHS)

# Which of our axes each torch axis is: conv HWIO -> OIHW, Linear (in, out) -> (out, in).
_TORCH_AXES = {"conv": (3, 2, 0, 1), "linear": (1, 0), "vector": (0,)}


def _torch_tensors(modules: list[tuple[str, nnx.Module]]) -> list[tuple[str, nnx.Variable, str]]:
  """(torch key, our variable, layout) for each variable of (torch module name, our module)s:
  a conv's weight, a batch norm's affine parameters and running statistics, a Linear's
  weight and bias."""
  tensors = []
  for prefix, module in modules:
    if isinstance(module, nnx.Conv):
      tensors.append((f"{prefix}.weight", module.kernel, "conv"))
    elif isinstance(module, nnx.BatchNorm):
      tensors += [(f"{prefix}.weight", module.scale, "vector"),
                  (f"{prefix}.bias", module.bias, "vector"),
                  (f"{prefix}.running_mean", module.mean, "vector"),
                  (f"{prefix}.running_var", module.var, "vector")]
    else:
      tensors += [(f"{prefix}.weight", module.kernel, "linear"),
                  (f"{prefix}.bias", module.bias, "vector")]
  return tensors


def _torchvision_tensors(model: models.ResNet) -> list[tuple[str, nnx.Variable, str]]:
  """(torchvision key, our variable, layout) for every variable of a v1.5 ImageNet ResNet."""
  modules = [("conv1", model.stem_conv), ("bn1", model.stem_norm)]
  blocks = iter(model.blocks)
  for stage, size in enumerate(model.stage_sizes, start=1):
    for index in range(size):
      block, prefix = next(blocks), f"layer{stage}.{index}"
      for j, (conv, norm) in enumerate(zip(block.convs, block.norms), start=1):
        modules += [(f"{prefix}.conv{j}", conv), (f"{prefix}.bn{j}", norm)]
      if block.projection is not None:
        modules += [(f"{prefix}.downsample.0", block.projection),
                    (f"{prefix}.downsample.1", block.projection_norm)]
  modules.append(("fc", model.head))
  return _torch_tensors(modules)


def _to_numpy(value: Any) -> np.ndarray:
  """A copy: `Tensor.numpy()` shares the tensor's memory, and jax may keep using a
  numpy buffer without copying it, so torch's in-place updates (a train-mode BN's
  running statistics) would otherwise change our model."""
  if hasattr(value, "detach"):  # A torch.Tensor, read without importing torch.
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()  # numpy has no bfloat16.
    value = value.numpy()
  return np.array(value)


def _read_state_dict(source: Any, reader: str,
                     torch_suffixes: tuple[str, ...]) -> Mapping[str, Any]:
  """`source` if a mapping, else what the file at that path holds: a `.npz`, or a torch file
  with one of `torch_suffixes`. Errors name `reader`, the public function reading it."""
  if isinstance(source, Mapping):
    return source
  suffixes = torch_suffixes + (".npz",)
  if not isinstance(source, (str, os.PathLike)):
    raise ValueError(f"{reader} takes a state dict (a mapping of names to arrays) "
                     f"or a {'/'.join(suffixes)} path, got {type(source).__name__}.")
  path, file = os.fspath(source), epath.Path(source)
  suffix = file.suffix.lower()
  if suffix not in suffixes:
    raise ValueError(f"Cannot read {path!r}: {reader} reads {', '.join(torch_suffixes)} "
                     "(PyTorch) or .npz (numpy) state dicts.")
  if not file.is_file():
    raise ValueError(f"State dict file {path!r} does not exist.")
  if suffix == ".npz":
    try:
      with file.open("rb") as stream, np.load(stream, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}
    except Exception as error:
      raise ValueError(f"Cannot read {path!r} as a .npz state dict: {error}") from error
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise ValueError(f"Reading {path!r} needs PyTorch, which is not installed; without it, "
                     "save the state dict as .npz (np.savez(path, **{k: v.numpy() for k, v "
                     "in state_dict.items()})) and pass that.") from error
  try:
    with file.open("rb") as stream:
      state = torch.load(stream, map_location="cpu", weights_only=True)
  except Exception as error:
    raise ValueError(f"Cannot read {path!r} as a PyTorch state dict: {error}") from error
  if not isinstance(state, Mapping):
    raise ValueError(f"{path!r} holds a {type(state).__name__}, not a state dict; save "
                     "model.state_dict(), not the model.")
  return state


def _first(keys: list[str]) -> str:
  return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def _missing_and_unexpected(state: Mapping[str, Any],
                            keys: list[str]) -> tuple[list[str], list[str]]:
  """The `keys` that `state` lacks, and the keys of `state` that are none of `keys` nor a BN's
  `num_batches_tracked` (which torch's momentum batch norm never reads)."""
  known = set(keys) | {key.replace(".running_mean", ".num_batches_tracked") for key in keys
                       if key.endswith(".running_mean")}
  return [key for key in keys if key not in state], [key for key in state if key not in known]


def _torch_value(state: Mapping[str, Any], key: str, variable: nnx.Variable, layout: str,
                 expecting: str, error: Callable[[str], ValueError]
                 ) -> tuple[np.ndarray, tuple[int, ...]]:
  """`state[key]` as a numpy array in torch's axes, and which of ours each of them is
  (`_TORCH_AXES`); `error(reason)`, naming `expecting`, where its shape is not `variable`'s."""
  value, axes = _to_numpy(state[key]), _TORCH_AXES[layout]
  expected = tuple(variable.shape[axis] for axis in axes)
  if value.shape != expected:
    raise error(f"key {key!r} has shape {value.shape}, {expecting} expects {expected}")
  return value, axes


def from_torchvision(state_dict_or_path: Mapping[str, Any] | str | os.PathLike, name: str, *,
                     dtype: Any = jnp.float32) -> models.ResNet:
  """Our ResNet with the weights of a torchvision ResNet-18/34/50/101/152.

  The route for torchvision's ImageNet weights (or any checkpoint in its layout)
  into JAX, e.g.

    # In a process with torchvision:
    torch.save(torchvision.models.resnet50(weights="IMAGENET1K_V2").state_dict(),
               "resnet50.pth")
    # Here (torch needed for a .pth; a .npz of the same tensors needs none):
    model = pretrained.from_torchvision("resnet50.pth", "resnet50")
    logits = model(images)  # NHWC, normalised as torchvision's weights expect.

  torchvision's weights expect RGB images scaled to [0, 1] and normalised by the
  ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225) per channel,
  in NHWC here where torch takes NCHW. torchvision's bottlenecks are "v1.5"
  (stride in the 3x3 conv), so 50/101/152 become `models.create(name,
  stride_on_1x1=False)`; its `downsample` is our option B projection. Both use
  batch norm epsilon 1e-5, so the copy is exact. `num_batches_tracked` is
  ignored (torchvision's momentum-0.1 BN never reads it). Training the result
  onwards: our BN momentum 0.9 is torch's 0.1, but torch updates the running
  variance with the unbiased batch variance where flax uses the biased one.

  Args:
    state_dict_or_path: a torchvision state dict, as a mapping of key to torch
      tensor or numpy array; or a path to one saved with `torch.save` (`.pth`,
      `.pt`; needs torch) or `np.savez` (`.npz`). Nothing is ever downloaded.
    name: "resnet18", "resnet34", "resnet50", "resnet101" or "resnet152".
    dtype: compute dtype of the returned model; its parameters are float32.

  Returns:
    A `models.ResNet` in eval mode; the class count is `fc.weight`'s.

  Raises:
    ValueError: for an unknown name, a file that does not exist or cannot be
      read, missing or unexpected keys, or a tensor of the wrong shape.
  """
  if name not in TORCHVISION_NAMES:
    raise ValueError(f"Unknown torchvision ResNet {name!r}; valid: {', '.join(TORCHVISION_NAMES)}.")
  state = _read_state_dict(state_dict_or_path, "from_torchvision", (".pth", ".pt"))
  fc = state.get("fc.weight")
  num_classes = fc.shape[0] if fc is not None and len(fc.shape) == 2 else 1

  # Shapes only: every array is overwritten below, so skip the random init.
  model = nnx.eval_shape(lambda: models.create(
      name, num_classes=num_classes, stride_on_1x1=False, dtype=dtype, rngs=nnx.Rngs(0)))
  tensors = _torchvision_tensors(model)
  missing, unexpected = _missing_and_unexpected(state, [key for key, _, _ in tensors])
  if missing:
    hint = ("; strip the 'module.' prefix of a DataParallel model's keys"
            if all(key.startswith("module.") for key in state) else "")
    raise ValueError(f"State dict is not a torchvision {name}: {len(missing)} missing keys "
                     f"({_first(missing)}){hint}.")
  if unexpected:
    raise ValueError(f"State dict is not a torchvision {name}: {len(unexpected)} unexpected "
                     f"keys ({_first(unexpected)}).")
  for key, variable, layout in tensors:
    value, axes = _torch_value(state, key, variable, layout, f"torchvision's {name}",
                               lambda reason: ValueError(f"State dict {reason}."))
    variable.set_value(jnp.asarray(value.transpose(np.argsort(axes)), jnp.float32))

  return _loaded(model)


def _not_torchvision(reason: str) -> ValueError:
  return ValueError(f"torchvision has no layout for this model: {reason}. to_torchvision takes "
                    "an ImageNet ResNet-18/34/50/101/152 with option B shortcuts, "
                    "post-activation blocks and, in bottlenecks, the stride in the 3x3 conv "
                    "(models.create(name, ..., stride_on_1x1=False)).")


def _stride(conv: nnx.Conv) -> int:
  strides = conv.strides
  return strides if isinstance(strides, int) else max(strides)


def to_torchvision(model: models.ResNet) -> dict[str, np.ndarray]:
  """The torchvision state dict of our v1.5 ImageNet ResNet: `from_torchvision`'s inverse.

  For JAX-trained weights in PyTorch, or a torchvision-layout file written
  without torch, e.g.

    model = models.create("resnet50", num_classes=1000, stride_on_1x1=False, rngs=...)
    ...  # train
    state = pretrained.to_torchvision(model)
    np.savez("resnet50.npz", **state)  # from_torchvision("resnet50.npz", "resnet50"), or:
    net = torchvision.models.resnet50()
    net.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})

  Its keys are exactly those of torchvision's `state_dict()`, so
  `load_state_dict(strict=True)` accepts it. Each BN's `num_batches_tracked` is
  an int64 zero: our models do not count batches, and torchvision's BN (momentum
  0.1) never reads the count.

  Args:
    model: a ResNet as `models.create("resnet{18,34,50,101,152}", num_classes=...,
      stride_on_1x1=False)` builds it (any num_classes > 0; the 18 and 34 have no
      bottleneck, so stride_on_1x1 does not matter there), in either mode.

  Returns:
    A dict of torchvision key to float32 arrays in torch's layouts (conv OIHW,
    Linear (out, in)), in torchvision's key order.

  Raises:
    ValueError: for a model torchvision has no layout for: CIFAR nets, plain
      nets, shortcuts A or C, pre-activation or custom blocks, bottlenecks with
      the stride in the 1x1 conv, headless models, other depths or widths.
  """
  if not model.imagenet_stem:
    raise _not_torchvision("it is a CIFAR network (3x3 stem, no max pool)")
  if model.head is None:
    raise _not_torchvision("it is headless (num_classes=0); torchvision always has fc")
  for block in model.blocks:
    if type(block) is not models.PostActivationBlock:  # pylint: disable=unidiomatic-typecheck
      raise _not_torchvision(f"its blocks are {type(block).__name__}s, not the paper's "
                             "post-activation blocks")
    if block.shortcut != "B":
      raise _not_torchvision(f"its shortcut is {block.shortcut!r}; torchvision's downsample "
                             "is option 'B'")
    if len(block.convs) == 3 and _stride(block.convs[0]) != 1:
      raise _not_torchvision("its bottlenecks subsample in the first 1x1 conv "
                             "(stride_on_1x1=True); torchvision's in the 3x3 (v1.5)")
  depths = {(len(layers(64, 1)), sizes): depth
            for depth, (layers, sizes) in models.IMAGENET_DEPTHS.items()}
  depth = depths.get((len(model.blocks[0].convs), model.stage_sizes))
  if depth is None:
    raise _not_torchvision(f"blocks per stage {model.stage_sizes} of "
                           f"{len(model.blocks[0].convs)} convs match no torchvision depth")
  num_classes = model.head.out_features
  reference = _torchvision_tensors(nnx.eval_shape(lambda: models.create(
      f"resnet{depth}", num_classes=num_classes, stride_on_1x1=False, rngs=nnx.Rngs(0))))
  state = {}
  for (key, variable, layout), (_, expected, _) in zip(_torchvision_tensors(model), reference):
    if variable.shape != expected.shape:
      raise _not_torchvision(f"our {key} has shape {variable.shape} where torchvision's "
                             f"resnet{depth} has {expected.shape}")
    value = np.asarray(variable.get_value()).transpose(_TORCH_AXES[layout])
    state[key] = np.array(value, np.float32, order="C")  # Writable: torch may update it in place.
    if key.endswith(".running_var"):
      state[key.replace(".running_var", ".num_batches_tracked")] = np.zeros((), np.int64)
  return state


_AKAMASTER_BLOCK = re.compile(r"layer(\d+)\.(\d+)\.conv1\.weight")
_AKAMASTER_LAYOUT = ("conv1.weight, bn1.*, layer{1,2,3}.{i}.conv{1,2}.weight, "
                     "layer{1,2,3}.{i}.bn{1,2}.*, linear.weight, linear.bias")


def _not_akamaster(reason: str) -> ValueError:
  return ValueError(f"Not a CIFAR ResNet of akamaster/pytorch_resnet_cifar10: {reason}. "
                    f"from_akamaster reads his resnet.py's state dicts, keys "
                    f"{_AKAMASTER_LAYOUT}, optionally under 'module.' and {{'state_dict': ...}}.")


def _akamaster_modules(
    model: models.ResNet) -> list[tuple[str, nnx.Module, np.ndarray | None, np.ndarray | None]]:
  """(his module name, our module, input channel order, output channel order) for every
  module of a CIFAR ResNet; an order of None is the identity.

  An order lists, for each of our channels, the index of his channel that holds it. Only
  the residual stream is reordered: where his option A shortcut enters a wider stage it
  puts the previous stage's channels in the middle (`planes // 4` zero channels before,
  as many after), ours puts them first. So each block's last conv and BN write the stream
  in the stream's order, its first conv (and any projection) reads it in that order, and
  the classifier reads the last stage's.
  """
  stream = np.arange(model.stem_conv.out_features)  # Our stream channel c is his stream[c].
  modules = [("conv1", model.stem_conv, None, None), ("bn1", model.stem_norm, None, None)]
  blocks = iter(model.blocks)
  for stage, size in enumerate(model.stage_sizes, start=1):
    for index in range(size):
      block, prefix = next(blocks), f"layer{stage}.{index}"
      reads = stream
      if block.projection is not None:  # Option B writes every channel: his order is ours.
        stream = np.arange(block.out_features)
      elif block.reshapes:  # Option A: his F.pad(x, (..., planes // 4, planes // 4)).
        before = block.out_features // 4
        stream = np.concatenate([before + stream, np.arange(before),
                                 np.arange(before + block.in_features, block.out_features)])
      (conv1, conv2), (bn1, bn2) = block.convs, block.norms
      modules += [(f"{prefix}.conv1", conv1, reads, None), (f"{prefix}.bn1", bn1, None, None),
                  (f"{prefix}.conv2", conv2, None, stream), (f"{prefix}.bn2", bn2, None, stream)]
      if block.projection is not None:
        modules += [(f"{prefix}.shortcut.0", block.projection, reads, stream),
                    (f"{prefix}.shortcut.1", block.projection_norm, None, stream)]
  modules.append(("linear", model.head, stream, None))
  return modules


def _akamaster_state(state: Mapping[str, Any]) -> Mapping[str, Any]:
  """The state dict itself: out of his checkpoint's {'state_dict': ..., 'best_prec1': ...}
  and without DataParallel's 'module.' prefix."""
  if isinstance(state.get("state_dict"), Mapping):
    state = state["state_dict"]
  if state and all(key.startswith("module.") for key in state):
    state = {key.removeprefix("module."): value for key, value in state.items()}
  return state


def from_akamaster(state_dict_or_path: Mapping[str, Any] | str | os.PathLike,
                   name: str | None = None, *, dtype: Any = jnp.float32) -> models.ResNet:
  """Our CIFAR ResNet with the weights of akamaster/pytorch_resnet_cifar10's.

  That repository publishes ResNet-20/32/44/56/110/1202 trained by the paper's
  CIFAR-10 recipe (Sec. 4.2), e.g. `resnet20-12fca82f.th`; from a local copy:

    model = pretrained.from_akamaster("resnet20-12fca82f.th")
    logits = model(pretrained.AKAMASTER_PREPROCESSING(images))  # NHWC RGB in [0, 255].

  His network is the paper's CIFAR net (3x3 stem, three stages of 16/32/64
  filters, basic blocks, global average pooling, a Linear classifier; BN epsilon
  1e-5, as ours), and his option A shortcut (Sec. 3.3, the default of his code
  and of ours) subsamples and zero-pads as ours does, but places the new zero
  channels differently: half before the old ones and half after, where ours
  appends them all. The copy is exact all the same: the channels of the residual
  stream are reordered as the weights are copied (see `_akamaster_modules`),
  which keeps our one model and costs nothing at run time, where a model with
  his padding would be a second shortcut variant to maintain. His `option='B'`
  blocks (a 1x1 conv and BN projection where the shape changes) are our option
  B and load as such; `num_batches_tracked`, which his published files lack,
  is ignored where present. His `avg_pool2d` over the map's width is our global
  average on square maps, as CIFAR's 32x32 images give.

  His weights expect RGB images scaled to [0, 1] and normalised by the ImageNet
  mean and std (his trainer.py): `AKAMASTER_PREPROCESSING` of [0, 255] pixels.

  Args:
    state_dict_or_path: his checkpoint, `{'state_dict': ..., 'best_prec1': ...}`
      as his trainer saves it (`.th`, read with torch, `weights_only`), or the
      state dict itself; as a mapping of key to torch tensor or numpy array, or
      a path (`.th`, `.pth`, `.pt` need torch; a `.npz` of the same tensors
      needs none). Keys may carry DataParallel's `module.` prefix. Nothing is
      ever downloaded.
    name: optionally the network it must be, e.g. "cifar_resnet20"; the depth
      is read from the keys (any 6n+2), and a different one is an error.
    dtype: compute dtype of the returned model; its parameters are float32.

  Returns:
    A `models.ResNet` in eval mode, `models.create("cifar_resnet{depth}",
    shortcut=...)` with his option; the class count is `linear.weight`'s.

  Raises:
    ValueError: for a file that does not exist or cannot be read, keys not of
      his layout (missing, unexpected, or stages of unequal depth), a tensor of
      the wrong shape, or a `name` other than the depth the keys give.
  """
  state = _akamaster_state(_read_state_dict(state_dict_or_path, "from_akamaster",
                                            (".th", ".pth", ".pt")))
  blocks: dict[int, int] = {}
  for key in state:
    if match := _AKAMASTER_BLOCK.fullmatch(key):
      stage, index = int(match.group(1)), int(match.group(2))
      blocks[stage] = max(blocks.get(stage, 0), index + 1)
  if sorted(blocks) != [1, 2, 3]:
    raise _not_akamaster(f"its keys ({_first(list(state))}) hold blocks of stages "
                         f"{sorted(blocks)}, not of stages 1, 2 and 3")
  if len(set(blocks.values())) != 1:
    raise _not_akamaster(f"its stages have {blocks[1]}, {blocks[2]} and {blocks[3]} blocks, "
                         "not n each (depth 6n+2)")
  depth = 6 * blocks[1] + 2
  if name is not None and name != f"cifar_resnet{depth}":
    raise ValueError(f"The state dict is a cifar_resnet{depth} ({blocks[1]} blocks per stage), "
                     f"not the {name!r} asked for; pass name='cifar_resnet{depth}' or none.")
  shortcut = "B" if "layer2.0.shortcut.0.weight" in state else "A"
  linear = state.get("linear.weight")
  num_classes = linear.shape[0] if linear is not None and len(linear.shape) == 2 else 1

  # Shapes only: every array is overwritten below, so skip the random init.
  model = nnx.eval_shape(lambda: models.create(
      f"cifar_resnet{depth}", num_classes=num_classes, shortcut=shortcut, dtype=dtype,
      rngs=nnx.Rngs(0)))
  copies = [(key, variable, layout, reads, writes)
            for prefix, module, reads, writes in _akamaster_modules(model)
            for key, variable, layout in _torch_tensors([(prefix, module)])]
  missing, unexpected = _missing_and_unexpected(state, [key for key, *_ in copies])
  if missing:
    raise _not_akamaster(f"{len(missing)} keys of a cifar_resnet{depth} with option "
                         f"{shortcut} shortcuts are missing ({_first(missing)})")
  if unexpected:
    raise _not_akamaster(f"{len(unexpected)} keys are not a cifar_resnet{depth}'s with option "
                         f"{shortcut} shortcuts ({_first(unexpected)})")
  for key, variable, layout, reads, writes in copies:
    value, axes = _torch_value(state, key, variable, layout, f"a cifar_resnet{depth}",
                               _not_akamaster)
    # Torch's axes: a conv's (out, in, ...), a Linear's (out, in), a BN vector's (out,).
    orders = {"conv": (writes, reads), "linear": (None, reads), "vector": (writes,)}[layout]
    for axis, order in enumerate(orders):
      if order is not None:
        value = np.take(value, order, axis=axis)
    variable.set_value(jnp.asarray(value.transpose(np.argsort(axes)), jnp.float32))

  return _loaded(model)
