"""Streaming input pipelines for data too large for the accelerators (ImageNet, section 3.4).

Why tf.data and not Grain: measured on the same array_record records with the same decode and
augmentation, Grain's worker processes spend about 1.4x the CPU per image (BENCHMARKS.md, "Input
pipelines"; `python -m resnet_jax.tools.input_benchmark`). tf.data's C++ runtime decodes and crops JPEGs
in parallel outside Python's GIL (`decode_and_crop_jpeg` decodes only the crop window). We keep
Grain's good idea: the pipeline is step-indexed. The examples of step s are a
pure function of (seed, s): each epoch reads a seeded permutation of this process's examples, and
each example's augmentation uses a stateless seed (run seed, position in the run). So an
iterator's whole state is the next step (`get_state()` -> {"step": ...}), and a resumed run
continues exactly where it stopped, with no shuffle buffers to save.

Multi-host: examples are dealt, by a fixed seeded permutation, into one block per device of the
mesh axis "data"; each process reads and decodes only the blocks of its own devices and supplies
their rows of every global batch. A background thread keeps two batches on the devices ahead of
the training loop. Pixels travel as uint8; the device subtracts the mean (the paper's per-pixel
mean image, or its per-channel average: `dataset.mean`), adds the per-image RGB offset (lighting
noise) and produces float32.
"""
import functools
import queue
import threading
import weakref
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from resnet_jax.data import core, mean_cache
from resnet_jax.data.sources import Records, fingerprint, naming_corrupt

PREFETCH_BATCHES = 2
SYNTHETIC_POOL = 64  # Distinct synthetic images; examples cycle over them.
SYNTHETIC_MEAN = 127.5


@jax.jit
def normalize(images, mean, offsets):
  """float32 pixels of uint8 `images` [B, H, W, 3]: less `mean`, plus each image's offset [B, 3]."""
  return images.astype(jnp.float32) - mean + offsets[:, None, None, :]


class PrefetchIterator:
  """Training inputs of a `StreamingDataset` (`core.TrainIterator`): global batches, prefetched
  to the devices by a background thread; `batch` returns them as they are.

  Checkpointing: `get_state()` returns {"step": int} (JSON, as checkpoints save it);
  `set_state(state)` (or `train_iterator(batch_size, start_step=step)`) continues from that step.
  """

  def __init__(self, make_batches: Callable[[int], Iterator[dict]], to_device: Callable[[dict], core.Batch],
               start_step: int = 0):
    self._make_batches = make_batches
    self._to_device = to_device
    self._step = start_step
    self._thread = None

  def __iter__(self):
    return self

  def __next__(self) -> core.Batch:
    if self._thread is None:
      self._start()
    item = self._queue.get()
    if isinstance(item, BaseException):
      self.close()
      raise item
    self._step += 1
    return item

  def batch(self, inputs: core.Batch, step: jax.Array) -> core.Batch:
    del step  # The iterator's own step chose the batch (get_state / set_state keep it).
    return inputs

  def get_state(self) -> dict:
    return {"step": self._step}

  def set_state(self, state: dict) -> None:
    self.close()
    self._step = int(state["step"])

  def close(self) -> None:
    if self._thread is not None:
      self._stop_thread()
      self._thread = None

  def _start(self) -> None:
    self._queue, stop = queue.Queue(PREFETCH_BATCHES), threading.Event()
    self._thread = threading.Thread(target=self._work, args=(self._queue, stop, self._step), daemon=True)
    self._thread.start()
    # Also stops the thread at interpreter exit: a thread still inside JAX then aborts the process.
    self._stop_thread = weakref.finalize(self, _stop, stop, self._thread)

  def _work(self, out: queue.Queue, stop: threading.Event, start_step: int) -> None:
    def put(item) -> bool:
      while not stop.is_set():
        try:
          out.put(item, timeout=0.1)
          return True
        except queue.Full:
          pass
      return False

    try:
      for local in self._make_batches(start_step):
        if not put(self._to_device(local)):
          return
    except BaseException as error:  # pylint: disable=broad-except
      put(error)


def _stop(stop: threading.Event, thread: threading.Thread) -> None:
  stop.set()
  thread.join()


class StreamingDataset:
  """A dataset streamed from the host (`core.Dataset`): `train_iterator` and `eval_batches`."""

  def __init__(self, info: core.DatasetInfo, mesh: Mesh, train_batches, eval_batches, protocols,
               mean: np.ndarray):
    self.info = info
    self.mesh = mesh
    self.eval_protocols = protocols
    # float32 [H, W, 3] (per pixel, of the training views) or [1, 1, 3] (per channel).
    self.mean = np.asarray(mean, np.float32)
    self._means = {}  # (height, width) -> the mean of a view of that size, on the devices.
    self._train_batches = train_batches  # (per_device, start_step) -> this process's rows, as dicts
    self._eval_batches = eval_batches  # (per_device, protocol) -> this process's rows, as dicts
    self._train_block = info.train_size // core.num_data_devices(mesh)

  def steps_per_epoch(self, batch_size: int) -> int:
    return self._train_block // core.check_batch_size(batch_size, self.mesh)

  def mean_of(self, height: int, width: int) -> jax.Array:
    """The mean subtracted from a view of `height` x `width`: the mean image resized to it."""
    if (height, width) not in self._means:
      mean = self.mean
      if mean.shape[:2] not in ((1, 1), (height, width)):
        mean = jax.image.resize(mean, (height, width, 3), "bilinear")
      self._means[height, width] = jax.device_put(
          mean, jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()))
    return self._means[height, width]

  def _to_device(self, local: dict, global_batch: int) -> core.Batch:
    put = lambda array: core.to_global(self.mesh, np.asarray(array), global_batch)
    offsets = put(local["offsets"])
    to_pixels = lambda view: normalize(put(view), self.mean_of(*view.shape[1:3]), offsets)
    if isinstance(local["images"], tuple):
      images = tuple(map(to_pixels, local["images"]))
    else:
      images = to_pixels(local["images"])
    return core.Batch(images=images, labels=put(local["labels"].astype(np.int32)),
                      mask=put(local["mask"]))

  def train_iterator(self, batch_size: int, start_step: int = 0) -> PrefetchIterator:
    per_device = core.check_batch_size(batch_size, self.mesh)
    if per_device > self._train_block:
      raise ValueError(f"batch size {batch_size} exceeds the {self.info.train_size} training examples")
    make = functools.partial(self._train_batches, per_device)
    return PrefetchIterator(make, lambda local: self._to_device(local, batch_size), start_step)

  def eval_batches(self, batch_size: int, protocol: str = "center") -> Iterator[core.Batch]:
    """Every evaluation example once, padded and masked. "10crop" and "multiscale" give
    `images` as a tuple of views (10 of [B, 224, 224, 3]; 5 of [B, H, W, 3], the whole images
    resized to shorter side s in MULTISCALE_SIDES, each batch of one aspect bucket: see
    `imagenet.MULTISCALE_ASPECTS`); average the softmax scores over the views."""
    core.check_protocol(protocol, self.info, self.eval_protocols)
    per_device = core.check_batch_size(batch_size, self.mesh)
    for local in self._eval_batches(per_device, protocol):
      yield self._to_device(local, batch_size)


def _train_ids(num_examples: int, mesh: Mesh, seed: int) -> np.ndarray:
  """This process's training examples: its devices' blocks of a fixed seeded deal."""
  devices = core.num_data_devices(mesh)
  block = num_examples // devices
  first, last = core.local_devices_range(mesh)
  order = np.random.default_rng([seed, 1]).permutation(num_examples)
  return order[first * block:last * block]


def _epoch_orders(ids: np.ndarray, mesh: Mesh, per_device: int, seed: int, start_step: int):
  """(step, example ids of this process's rows of that step), from `start_step` on, forever."""
  first_device, last_device = core.local_devices_range(mesh)
  local_batch = per_device * (last_device - first_device)
  steps_per_epoch = len(ids) // local_batch
  step, epoch_cached, order = start_step, None, None
  while True:
    epoch, position = divmod(step, steps_per_epoch)
    if epoch != epoch_cached:
      order = ids[np.random.default_rng([seed, 2, first_device, epoch]).permutation(len(ids))]
      epoch_cached = epoch
    yield step, order[position * local_batch:(position + 1) * local_batch]
    step += 1


def _eval_local_rows(num_examples: int, mesh: Mesh, per_device: int, groups: np.ndarray | None = None):
  """(ids, valid) [num_batches, local rows] of this process's rows of every evaluation batch.

  With `groups` (a value per example), every batch holds examples of one group: the groups in
  sorted order, the examples of each dealt to the devices and padded to whole batches alone.
  """
  devices = core.num_data_devices(mesh)
  if groups is None:
    ids, valid = core.eval_row_ids(core.eval_chunks(num_examples, devices), per_device)
  else:
    batches = []
    for group in np.unique(groups):
      members = np.flatnonzero(groups == group)
      positions, group_valid = core.eval_row_ids(core.eval_chunks(len(members), devices), per_device)
      batches.append((members[positions], group_valid))
    ids, valid = (np.concatenate(arrays) for arrays in zip(*batches))
  first, last = core.local_devices_range(mesh)
  rows = slice(first * per_device, last * per_device)
  return ids[:, rows], valid[:, rows]


def image_shapes(records: Records) -> np.ndarray:
  """int32 [N, 2]: (height, width) of every image of `records`; a JPEG's from its header."""
  from resnet_jax.data import imagenet  # pylint: disable=g-import-not-at-top
  from resnet_jax.data.sources import tensorflow  # pylint: disable=g-import-not-at-top
  tf = tensorflow()
  logging.info("Reading the sizes of %d evaluation images", len(records))
  fetch = _fetcher(records)
  chunk = 1024
  share = _process_share(np.arange(len(records)))
  shapes = tf.data.Dataset.from_tensor_slices(share).map(
      lambda index: imagenet.image_shape(fetch(index)[0]), num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=True).batch(chunk)
  batches = naming_corrupt(shapes.prefetch(tf.data.AUTOTUNE).as_numpy_iterator(),
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
  from resnet_jax.data import imagenet  # pylint: disable=g-import-not-at-top
  from resnet_jax.data.sources import tensorflow  # pylint: disable=g-import-not-at-top
  tf = tensorflow()
  ids = np.linspace(0, len(train) - 1, min(len(train), imagenet.MEAN_SAMPLE)).round()
  ids = np.unique(ids.astype(np.int64))

  def compute():
    logging.info("Computing the per-pixel mean of the centre views of %d training images",
                 len(ids))
    fetch = _fetcher(train)
    share = _process_share(ids)  # Each process reads a share; the sums are gathered.
    views = tf.data.Dataset.from_tensor_slices(share).map(
        lambda index: imagenet.center_view(tf.io.decode_image(
            fetch(index)[0], channels=3, expand_animations=False))[0],
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(256)
    # Sums of uint8 pixels, exact as integers: at most 255 * MEAN_SAMPLE < 2**31 per pixel.
    total = np.zeros((imagenet.CROP, imagenet.CROP, 3), np.int64)
    batches = naming_corrupt(views.prefetch(tf.data.AUTOTUNE).as_numpy_iterator(),
                             (share[start:start + 256] for start in range(0, len(share), 256)), train)
    for batch in batches:
      total += batch.sum(axis=0, dtype=np.int64)
    if jax.process_count() > 1:
      total = multihost_utils.process_allgather(total.astype(np.int32)).sum(axis=0, dtype=np.int64)
    return total / len(ids)

  view = f"centre {imagenet.CROP} of shorter side {imagenet.EVAL_SHORTER_SIDE}"
  return mean_cache.load_or_compute(f"{fingerprint(train, ids)} {len(ids)} sampled {view}", compute,
                                    config.cache_dir, shape=(imagenet.CROP, imagenet.CROP, 3))


def from_records(config: ml_collections.ConfigDict, mesh: Mesh, train: Records, evaluation: Records, *,
                 name: str, num_classes: int) -> StreamingDataset:
  """A tf.data pipeline over encoded images with ImageNet's transforms (section 3.4), its mean
  `mean_image` (cached) or that image's channel means (`config.mean`)."""
  from resnet_jax.data import imagenet  # pylint: disable=g-import-not-at-top
  from resnet_jax.data.sources import tensorflow  # pylint: disable=g-import-not-at-top
  tf = tensorflow()
  train_ids = _train_ids(len(train), mesh, config.seed)
  seed = config.seed

  def train_batches(per_device, start_step):
    global_batch = per_device * core.num_data_devices(mesh)
    first_device, last_device = core.local_devices_range(mesh)
    local_batch = per_device * (last_device - first_device)

    def steps():  # Example ids and stateless augmentation seeds (run seed, position in the run).
      for step, ids in _epoch_orders(train_ids, mesh, per_device, seed, start_step):
        positions = step * global_batch + first_device * per_device + np.arange(local_batch)
        yield ids, np.stack([np.full(local_batch, seed), positions], axis=1)

    signature = (tf.TensorSpec([local_batch], tf.int64), tf.TensorSpec([local_batch, 2], tf.int64))
    examples = tf.data.Dataset.from_generator(steps, output_signature=signature).unbatch()
    fetch = _fetcher(train)

    def load(index, element_seed):
      contents, label = fetch(index)
      image, offset = imagenet.train_view_from_bytes(contents, element_seed, config.augment)
      return {"images": image, "offsets": offset, "labels": label, "mask": True}

    dataset = examples.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    batches = dataset.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    orders = (ids for _, ids in _epoch_orders(train_ids, mesh, per_device, seed, start_step))
    yield from naming_corrupt(batches.as_numpy_iterator(), orders, train)

  @functools.cache
  def eval_aspects():
    """The multi-scale aspect bucket of every evaluation image, from their sizes (cached)."""
    shapes = mean_cache.load_or_compute(
        f"{config.eval_split} {fingerprint(evaluation)}", lambda: image_shapes(evaluation),
        config.cache_dir, shape=(len(evaluation), 2), dtype=np.int32, kind="shapes",
        what="the evaluation images' sizes")
    distinct, index = np.unique(shapes, axis=0, return_inverse=True)
    return np.array([imagenet.multiscale_aspect(*shape) for shape in distinct])[index.reshape(-1)]

  def eval_batches(per_device, protocol):
    if protocol == "multiscale":
      # Each batch holds images of one aspect bucket, so its views share a shape; every process
      # knows the batches' order from the sizes of all images.
      aspects = eval_aspects()
      ids, valid = _eval_local_rows(len(evaluation), mesh, per_device, aspects)
      sizes_of = {aspect: imagenet.multiscale_sizes(aspect) for aspect in np.unique(aspects)}
      columns = (ids.reshape(-1), valid.reshape(-1),
                 np.stack([sizes_of[aspect] for aspect in aspects[ids.reshape(-1)]]))
    else:
      ids, valid = _eval_local_rows(len(evaluation), mesh, per_device)
      columns = (ids.reshape(-1), valid.reshape(-1))
    fetch = _fetcher(evaluation)
    transform = imagenet.EVAL_PROTOCOLS[protocol]

    def load(index, is_valid, *view_sizes):
      contents, label = fetch(index)
      views, offset = transform(tf.io.decode_image(contents, channels=3, expand_animations=False),
                                *view_sizes)
      if protocol == "10crop":
        views = tuple(tf.unstack(views))
      return {"images": views, "offsets": offset, "labels": label, "mask": is_valid}

    dataset = tf.data.Dataset.from_tensor_slices(columns)
    dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    batches = dataset.batch(ids.shape[1]).prefetch(tf.data.AUTOTUNE).as_numpy_iterator()
    yield from naming_corrupt(batches, ids, evaluation)

  info = core.DatasetInfo(name=name, num_classes=num_classes, image_shape=(imagenet.CROP, imagenet.CROP, 3),
                          train_size=len(train), eval_size=len(evaluation))
  logging.info("Streaming %s through tf.data: %d training examples (this process reads %d) and %d "
               "evaluation examples, read and decoded as the steps need them", name, len(train),
               len(train_ids), len(evaluation))
  mean = mean_image(config, train)
  if config.mean == "per_channel":
    mean = mean.mean(axis=(0, 1), keepdims=True)
  return StreamingDataset(info, mesh, train_batches, eval_batches, tuple(imagenet.EVAL_PROTOCOLS),
                          mean)


def _fetcher(records: Records):
  """A tf function: example id -> (encoded image bytes, int32 label), read together."""
  from resnet_jax.data.sources import tensorflow  # pylint: disable=g-import-not-at-top
  tf = tensorflow()
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


def synthetic(config: ml_collections.ConfigDict, mesh: Mesh, *, name: str) -> StreamingDataset:
  """Large synthetic images (benchmarks, smoke runs): pure NumPy, no TensorFlow.

  Example i shows noise image i mod 64 and carries a random label; nothing is augmented.
  """
  rng = np.random.default_rng(config.seed)
  shape = (config.image_size, config.image_size, 3)
  pool = rng.integers(0, 256, (SYNTHETIC_POOL,) + shape, np.uint8)
  train_labels = rng.integers(0, config.num_classes, config.synthetic_train_size, np.int32)
  eval_labels = rng.integers(0, config.num_classes, config.synthetic_eval_size, np.int32)
  train_ids = _train_ids(len(train_labels), mesh, config.seed)

  def local_batch_of(ids, labels, mask):
    offsets = np.zeros((len(ids), 3), np.float32)
    return {"images": pool[ids % SYNTHETIC_POOL], "offsets": offsets, "labels": labels[ids], "mask": mask}

  def train_batches(per_device, start_step):
    for _, ids in _epoch_orders(train_ids, mesh, per_device, config.seed, start_step):
      yield local_batch_of(ids, train_labels, np.ones(len(ids), bool))

  def eval_batches(per_device, protocol):
    del protocol  # Only "center".
    for ids, valid in zip(*_eval_local_rows(len(eval_labels), mesh, per_device)):
      yield local_batch_of(ids, eval_labels, valid)

  info = core.DatasetInfo(name=name, num_classes=config.num_classes, image_shape=shape,
                          train_size=len(train_labels), eval_size=len(eval_labels), synthetic=True)
  return StreamingDataset(info, mesh, train_batches, eval_batches, ("center",),
                          np.full((1, 1, 3), SYNTHETIC_MEAN, np.float32))
