"""The host side of a streaming dataset over encoded images (`Records`): tf.data reads and
decodes this process's examples of each step and applies ImageNet's transforms (section 3.4).

TensorFlow is bound at import (`sources.tensorflow()`): only the paths that decode images
import this module (`StreamingDataset.from_records`).
"""
import functools
from typing import Iterator

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from resnet_jax.data import core, decoding, imagenet, mean_cache, sources, streaming
from resnet_jax.data.sources import Records, fingerprint

tf = sources.tensorflow()


class RecordReader:
  """tf.data over encoded images with ImageNet's transforms: the `streaming.HostReader` of
  `StreamingDataset.from_records`, for every protocol of `core.EVAL_PROTOCOLS`.

  Training examples are this process's blocks of the deal (`core.local_train_ids`), read in the
  order `streaming.epoch_orders` gives; each is augmented with the stateless seed (run seed,
  position in the run). Evaluation reads every example once; multi-scale batches each hold the
  images of one aspect bucket (`imagenet.multiscale_aspect`), from the images' sizes, read once
  and cached (`mean_cache`).
  """
  eval_protocols = core.EVAL_PROTOCOLS

  def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, train: Records,
               evaluation: Records):
    self._config, self._mesh = config, mesh
    self._train, self._evaluation = train, evaluation
    self.train_ids = core.local_train_ids(mesh, len(train), config.seed)  # This process's.

  def train_batches(self, per_device: int, start_step: int) -> Iterator[dict]:
    seed, mesh = self._config.seed, self._mesh
    global_batch = per_device * core.num_data_devices(mesh)
    first_device, last_device = core.local_devices_range(mesh)
    local_batch = per_device * (last_device - first_device)

    def steps():  # Example ids and stateless augmentation seeds (run seed, position in the run).
      for step, ids in streaming.epoch_orders(self.train_ids, mesh, per_device, seed, start_step):
        positions = step * global_batch + first_device * per_device + np.arange(local_batch)
        yield ids, np.stack([np.full(local_batch, seed), positions], axis=1)

    signature = (tf.TensorSpec([local_batch], tf.int64), tf.TensorSpec([local_batch, 2], tf.int64))
    examples = tf.data.Dataset.from_generator(steps, output_signature=signature).unbatch()
    fetch = _fetcher(self._train)

    def load(index, element_seed):
      contents, label = fetch(index)
      image, offset = imagenet.train_view_from_bytes(contents, element_seed, self._config.augment)
      return {"images": image, "offsets": offset, "labels": label, "mask": True}

    dataset = examples.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    batches = dataset.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    orders = (ids for _, ids in streaming.epoch_orders(self.train_ids, mesh, per_device, seed, start_step))
    yield from decoding.naming_corrupt(batches.as_numpy_iterator(), orders, self._train)

  def eval_batches(self, per_device: int, protocol: str) -> Iterator[dict]:
    evaluation = self._evaluation
    if protocol == "multiscale":
      # Each batch holds images of one aspect bucket, so its views share a shape; every process
      # knows the batches' order from the sizes of all images.
      aspects = self._eval_aspects
      ids, valid = streaming.eval_local_rows(len(evaluation), self._mesh, per_device, aspects)
      sizes_of = {aspect: imagenet.multiscale_sizes(aspect) for aspect in np.unique(aspects)}
      columns = (ids.reshape(-1), valid.reshape(-1),
                 np.stack([sizes_of[aspect] for aspect in aspects[ids.reshape(-1)]]))
    else:
      ids, valid = streaming.eval_local_rows(len(evaluation), self._mesh, per_device)
      columns = (ids.reshape(-1), valid.reshape(-1))
    fetch = _fetcher(evaluation)

    def load(index, is_valid, *view_sizes):
      contents, label = fetch(index)
      image = decoding.decode(contents)
      views, offset = imagenet.eval_views(image, protocol, *view_sizes)
      return {"images": views, "offsets": offset, "labels": label, "mask": is_valid}

    dataset = tf.data.Dataset.from_tensor_slices(columns)
    dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    batches = dataset.batch(ids.shape[1]).prefetch(tf.data.AUTOTUNE).as_numpy_iterator()
    yield from decoding.naming_corrupt(batches, ids, evaluation)

  @functools.cached_property
  def _eval_aspects(self) -> np.ndarray:
    """The multi-scale aspect bucket of every evaluation image, from their sizes (cached)."""
    config, evaluation = self._config, self._evaluation
    shapes = mean_cache.load_or_compute(
        f"{config.eval_split} {fingerprint(evaluation)}", lambda: image_shapes(evaluation),
        config.cache_dir, shape=(len(evaluation), 2), dtype=np.int32, kind="shapes",
        what="the evaluation images' sizes")
    distinct, index = np.unique(shapes, axis=0, return_inverse=True)
    return np.array([imagenet.multiscale_aspect(*shape) for shape in distinct])[index.reshape(-1)]


def image_shapes(records: Records) -> np.ndarray:
  """int32 [N, 2]: (height, width) of every image of `records`; a JPEG's from its header."""
  logging.info("Reading the sizes of %d evaluation images", len(records))
  fetch = _fetcher(records)
  chunk = 1024
  share = _process_share(np.arange(len(records)))
  shapes = tf.data.Dataset.from_tensor_slices(share).map(
      lambda index: imagenet.image_shape(fetch(index)[0]), num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=True).batch(chunk)
  batches = decoding.naming_corrupt(shapes.prefetch(tf.data.AUTOTUNE).as_numpy_iterator(),
                                    np.split(share, range(chunk, len(share), chunk)), records)
  shapes = np.concatenate([np.zeros((0, 2), np.int32), *batches]).astype(np.int32)
  if jax.process_count() == 1:
    return shapes
  # Every process needs every image's size (the batches' order); shares differ by one at most.
  padded = np.zeros((-(-len(records) // jax.process_count()), 2), np.int32)
  padded[:len(shapes)] = shapes
  gathered = multihost_utils.process_allgather(padded)
  result = np.empty((len(records), 2), np.int32)
  for process, process_shapes in enumerate(gathered):
    result[process::jax.process_count()] = process_shapes[:len(result[process::jax.process_count()])]
  return result


def _process_share(ids: np.ndarray) -> np.ndarray:
  """This process's share of `ids` for a computation every process takes part in."""
  return ids[jax.process_index()::jax.process_count()]


def mean_image(config: ml_collections.ConfigDict, train: Records) -> np.ndarray:
  """The per-pixel mean (float32 [224, 224, 3]) of the centre views of up to MEAN_SAMPLE evenly
  spaced training images, cached in `config.cache_dir` (`mean_cache`) under what names those
  images' data and the view."""
  ids = np.linspace(0, len(train) - 1, min(len(train), imagenet.MEAN_SAMPLE)).round()
  ids = np.unique(ids.astype(np.int64))

  def compute():
    logging.info("Computing the per-pixel mean of the centre views of %d training images",
                 len(ids))
    fetch = _fetcher(train)
    share = _process_share(ids)  # Each process reads a share; the sums are gathered.
    views = tf.data.Dataset.from_tensor_slices(share).map(
        lambda index: imagenet.center_view(decoding.decode(fetch(index)[0]))[0],
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(256)
    # Sums of uint8 pixels, exact as integers: at most 255 * MEAN_SAMPLE < 2**31 per pixel.
    total = np.zeros((imagenet.CROP, imagenet.CROP, 3), np.int64)
    batches = decoding.naming_corrupt(
        views.prefetch(tf.data.AUTOTUNE).as_numpy_iterator(),
        (share[start:start + 256] for start in range(0, len(share), 256)), train)
    for batch in batches:
      total += batch.sum(axis=0, dtype=np.int64)
    if jax.process_count() > 1:
      total = multihost_utils.process_allgather(total.astype(np.int32)).sum(axis=0, dtype=np.int64)
    return total / len(ids)

  view = f"centre {imagenet.CROP} of shorter side {imagenet.EVAL_SHORTER_SIDE}"
  key = f"{fingerprint(train, ids)} {len(ids)} sampled {view} {decoding.DECODER}"
  return mean_cache.load_or_compute(key, compute, config.cache_dir,
                                    shape=(imagenet.CROP, imagenet.CROP, 3))


def _fetcher(records: Records):
  """A tf function: example id -> (encoded image bytes, int32 label), read together."""
  if records.data_source is not None:
    def read(index):
      example = records.data_source[int(index)]
      return np.bytes_(example["image"]), np.int32(example["label"])

    def fetch(index):
      contents, label = tf.numpy_function(read, [index], (tf.string, tf.int32), stateful=False)
      return tf.ensure_shape(contents, []), tf.ensure_shape(label, [])
    return fetch
  labels = tf.constant(records.labels.astype(np.int32))
  if records.paths is not None:
    paths = tf.constant(records.paths)
    return lambda index: (tf.io.read_file(tf.gather(paths, index)), tf.gather(labels, index))
  encoded = tf.constant(records.encoded)
  return lambda index: (tf.gather(encoded, index), tf.gather(labels, index))
