"""`create(config, mesh)`: picks the source and the pipeline (on-device or streaming) for a config."""
import functools
from typing import Callable

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from resnet_jax.data import config as config_lib
from resnet_jax.data import core
from resnet_jax.data import mean_cache
from resnet_jax.data import on_device
from resnet_jax.data import sources
from resnet_jax.data.streaming import StreamingDataset

# Datasets of images no larger than this (CIFAR-sized) that also fit in this many bytes per
# device are held on the devices; anything larger streams from the host.
ON_DEVICE_MAX_SIDE = 64
ON_DEVICE_MAX_BYTES_PER_DEVICE = 4 << 30


def held_on_device(image_shape: tuple[int, int, int], num_train: int, mesh: Mesh) -> bool:
  """Whether a training split of `num_train` uint8 images of `image_shape` is held on the
  devices (an `OnDeviceDataset`) rather than streamed."""
  fits = num_train * int(np.prod(image_shape)) <= (ON_DEVICE_MAX_BYTES_PER_DEVICE
                                                   * core.num_data_devices(mesh))
  return max(image_shape[:2]) <= ON_DEVICE_MAX_SIDE and fits


def synthetic_name(image_size: int, num_classes: int) -> str:
  return f"synthetic({image_size}x{image_size}x3,{num_classes} classes)"


def create(config: ml_collections.ConfigDict, mesh: Mesh, *, train: bool = True,
           eval_protocol: str | None = None) -> core.Dataset:
  """An `OnDeviceDataset` or a `StreamingDataset` for `config` (the trainer's `config.dataset`).

  Start-up: an on-device dataset decodes both splits onto the devices and computes or loads its
  per-pixel mean; a streaming one only lists its examples: a TFDS split is opened by index (its
  size read from metadata, no record read), and each label is read with its image when a step
  needs it. Every phase that can take long logs an INFO line.

  `train` False builds the evaluation side alone (an evaluator's): the training split is only
  listed, or its size read from metadata, and its images are read only to compute a per-pixel
  mean that is not cached; such a dataset has no training batches. `eval_protocol`, when given,
  is checked as soon as the pipeline is known, before any image is decoded.

  Raises ValueError for an invalid config or protocol, `DatasetNotFoundError` when the data is
  missing and `CorruptImageError` / `ImageSizeError` for an image the devices cannot hold, all
  before anything is compiled.
  """
  config = config_lib.resolve(config)
  core.num_data_devices(mesh)
  num_classes = config_lib.num_classes(config)
  if config.name == "synthetic":
    return _synthetic(config, mesh, eval_protocol)
  # TensorFlow: imported by the paths that decode images alone.
  from resnet_jax.data import decoding  # pylint: disable=g-import-not-at-top
  if config.name == "image_folder":
    root = sources.absolute(config.data_dir)
    num_folders = len(sources.folder_classes(root))
    if num_folders > num_classes:
      raise ValueError(
          f"image folder {root} has {num_folders} class folders but dataset.num_classes is "
          f"{num_classes}; set --config.dataset.num_classes={num_folders}, or remove the extra "
          "folders.")
    train_files = sources.folder_records(root, config.train_split)
    eval_files = sources.folder_records(root, config.eval_split)
    read_train, read_eval = lambda: train_files, lambda: eval_files
    name, num_train = f"image_folder({root})", len(train_files)
    shape = decoding.peek_shape(train_files)
    # What the mean is computed from: the files, by name, size and modification time.
    identity = lambda: f"image_folder {config.train_split} {sources.fingerprint(train_files)}"
  else:  # TFDS: the splits are read only once the protocol is checked.
    name = config.name
    reader = sources.tfds_random_access if name == "imagenet2012" else sources.tfds_records
    read_train = lambda: reader(name, config.data_dir, config.train_split)
    read_eval = lambda: reader(name, config.data_dir, config.eval_split)
    train_identity, num_train, shape = sources.tfds_split(name, config.data_dir, config.train_split)
    identity = lambda: train_identity
  if name == "imagenet2012" or not held_on_device(shape, num_train, mesh):
    from resnet_jax.data import imagenet  # pylint: disable=g-import-not-at-top
    _check_protocol(eval_protocol, name, num_classes, (imagenet.CROP, imagenet.CROP, 3),
                    core.EVAL_PROTOCOLS)
    return StreamingDataset.from_records(config, mesh, read_train(), read_eval(), name=name,
                                         num_classes=num_classes)
  _check_protocol(eval_protocol, name, num_classes, shape, on_device.OnDeviceDataset.eval_protocols)
  key = f"{identity()} {'x'.join(map(str, shape))} {decoding.DECODER}"

  def mean(placed_train_images: Callable[[], jax.Array]) -> np.ndarray:
    return core.subtracted_mean(config.mean, lambda: mean_cache.load_or_compute(
        key, lambda: on_device.per_pixel_mean(placed_train_images()), config.cache_dir,
        shape=shape))
  # Evaluation images must have the training images' size too: one model sees both.
  loader = lambda records: lambda ids: decoding.decode_all(records, ids, shape)
  build = functools.partial(on_device.build, mesh, name=name, num_classes=num_classes,
                            seed=config.seed, augment=config.augment)
  evaluation = read_eval()
  if train:
    train_split = read_train()
    return build(train_split.labels, loader(train_split), evaluation.labels, loader(evaluation),
                 mean=lambda images: mean(lambda: images))

  def place_train() -> jax.Array:  # For a mean not cached: the images the trainer placed.
    train_split = read_train()
    return on_device.place_train(mesh, train_split.labels, loader(train_split), config.seed)[0]
  return build(np.zeros(0, np.int32), lambda ids: np.zeros((0, *shape), np.uint8),
               evaluation.labels, loader(evaluation), mean=lambda _: mean(place_train))


def _check_protocol(protocol: str | None, name: str, num_classes: int, shape: tuple[int, ...],
                    protocols: tuple[str, ...]) -> None:
  if protocol is not None:
    core.check_protocol(protocol, core.DatasetInfo(name, num_classes, shape, 0, 0), protocols)


def _synthetic(config: ml_collections.ConfigDict, mesh: Mesh, eval_protocol: str | None):
  """Uniform-noise images with random labels: for benchmarks and smoke runs only."""
  name = synthetic_name(config.image_size, config.num_classes)
  shape = (config.image_size, config.image_size, 3)
  _check_protocol(eval_protocol, name, config.num_classes, shape, ("center",))
  if not held_on_device(shape, config.synthetic_train_size, mesh):
    return StreamingDataset.synthetic(config, mesh, name=name)
  rng = np.random.default_rng(config.seed)
  make = lambda size: (rng.integers(0, 256, (size,) + shape, np.uint8),
                       rng.integers(0, config.num_classes, size, np.int32))
  train_images, train_labels = make(config.synthetic_train_size)
  eval_images, eval_labels = make(config.synthetic_eval_size)
  return on_device.from_arrays(
      mesh, train_images, train_labels, eval_images, eval_labels, name=name,
      num_classes=config.num_classes, seed=config.seed, augment=config.augment, synthetic=True,
      mean=lambda images: core.subtracted_mean(config.mean,
                                               lambda: on_device.per_pixel_mean(images)))
