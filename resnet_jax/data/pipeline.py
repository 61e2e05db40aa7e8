"""`create(config, mesh)`: picks the source and the pipeline (on-device or streaming) for a config."""
import ml_collections
import numpy as np
from jax.sharding import Mesh

from resnet_jax.data import config as config_lib
from resnet_jax.data import core
from resnet_jax.data import mean_cache
from resnet_jax.data import on_device

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


def create(config: ml_collections.ConfigDict, mesh: Mesh) -> core.Dataset:
  """An `OnDeviceDataset` or a `StreamingDataset` for `config` (the trainer's `config.dataset`).

  Raises ValueError for an invalid config, `DatasetNotFoundError` when the data is missing and
  `CorruptImageError` / `ImageSizeError` for an image the devices cannot hold, all before
  anything is compiled.
  """
  config = config_lib.resolve(config)
  core.num_data_devices(mesh)
  if config.name == "synthetic":
    return _synthetic(config, mesh)
  from resnet_jax.data import sources  # pylint: disable=g-import-not-at-top
  if config.name == "imagenet2012":
    from resnet_jax.data import streaming  # pylint: disable=g-import-not-at-top
    train = sources.tfds_random_access(config.name, config.data_dir, config.train_split)
    evaluation = sources.tfds_random_access(config.name, config.data_dir, config.eval_split)
    return streaming.from_records(config, mesh, train, evaluation, name=config.name, num_classes=1000,
                                  cache_key=_tfds_cache_key(config, len(train)))
  if config.name == "image_folder":
    root = sources.absolute(config.data_dir)
    num_folders, num_classes = len(sources.folder_classes(root)), config.num_classes
    if num_folders > num_classes:
      raise ValueError(
          f"image folder {root} has {num_folders} class folders but dataset.num_classes is "
          f"{num_classes}; set --config.dataset.num_classes={num_folders}, or remove the extra "
          "folders.")
    train = sources.folder_records(root, config.train_split)
    evaluation = sources.folder_records(root, config.eval_split)
    name = f"image_folder({root})"
    cache_key = f"image_folder-{root}-{config.train_split}-{len(train)}"
  else:
    train = sources.tfds_records(config.name, config.data_dir, config.train_split)
    evaluation = sources.tfds_records(config.name, config.data_dir, config.eval_split)
    name, num_classes = config.name, config_lib.NUM_CLASSES[config.name]
    cache_key = _tfds_cache_key(config, len(train))
  shape = sources.peek_shape(train)
  if not held_on_device(shape, len(train), mesh):
    from resnet_jax.data import streaming  # pylint: disable=g-import-not-at-top
    return streaming.from_records(config, mesh, train, evaluation, name=name, num_classes=num_classes,
                                  cache_key=cache_key)
  def mean(train_images):
    image = mean_cache.load_or_compute(
        cache_key, lambda: on_device.per_pixel_mean(train_images), config.cache_dir)
    return image.mean(axis=(0, 1), keepdims=True) if config.mean == "per_channel" else image
  # Evaluation images must have the training images' size too: one model sees both.
  loader = lambda records: lambda ids: sources.decode_all(records, ids, shape)
  return on_device.build(mesh, train.labels, loader(train), evaluation.labels, loader(evaluation),
                         name=name, num_classes=num_classes, seed=config.seed, augment=config.augment,
                         mean=mean)


def _tfds_cache_key(config: ml_collections.ConfigDict, train_size: int) -> str:
  """What a TFDS split's cached mean is named by."""
  return f"{config.name}-{config.data_dir or 'default'}-{config.train_split}-{train_size}"


def _synthetic(config: ml_collections.ConfigDict, mesh: Mesh):
  """Uniform-noise images with random labels: for benchmarks and smoke runs only."""
  name = synthetic_name(config.image_size, config.num_classes)
  shape = (config.image_size, config.image_size, 3)
  if not held_on_device(shape, config.synthetic_train_size, mesh):
    from resnet_jax.data import streaming  # pylint: disable=g-import-not-at-top
    return streaming.synthetic(config, mesh, name=name)
  rng = np.random.default_rng(config.seed)
  make = lambda size: (rng.integers(0, 256, (size,) + shape, np.uint8),
                       rng.integers(0, config.num_classes, size, np.int32))
  train_images, train_labels = make(config.synthetic_train_size)
  eval_images, eval_labels = make(config.synthetic_eval_size)
  return on_device.from_arrays(mesh, train_images, train_labels, eval_images, eval_labels, name=name,
                               num_classes=config.num_classes, seed=config.seed, augment=config.augment,
                               synthetic=True)
