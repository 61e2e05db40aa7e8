"""Streaming input pipelines for data too large for the accelerators (ImageNet, section 3.4).

A `StreamingDataset` reads and decodes each batch on the host (its `HostReader`: tf.data over
encoded images, `record_reader.RecordReader`, or NumPy noise, `SyntheticReader`) and puts it on
the devices. The pipeline is step-indexed: the examples of step s are a pure function of
(seed, s): each epoch reads a seeded permutation of this process's examples, and each example's
augmentation uses a stateless seed (run seed, position in the run). So an iterator's whole
state is the next step (`get_state()` -> {"step": ...}), and a resumed run continues exactly
where it stopped, with no shuffle buffers to save.

Multi-host: examples are dealt, by a fixed seeded permutation (`core.local_train_ids`), into one
block per device of the mesh axis "data"; each process reads and decodes only the blocks of its
own devices and supplies their rows of every global batch. A background thread keeps two
batches on the devices ahead of the training loop. Pixels travel as uint8; the device subtracts
the mean (the paper's per-pixel mean image, its per-channel average, or none: `dataset.mean`), adds
the per-image RGB offset (lighting noise) and produces float32.
"""
import queue
import threading
import weakref
from typing import Iterator, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from resnet_jax.data import core
from resnet_jax.data.sources import Records

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

  def __init__(self, dataset: "StreamingDataset", batch_size: int, start_step: int = 0):
    dataset.per_device_batch_size(batch_size)  # A bad size fails here.
    self._dataset, self._batch_size = dataset, batch_size
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
      for batch in self._dataset.train_batches(self._batch_size, start_step):
        if not put(batch):
          return
    except BaseException as error:  # pylint: disable=broad-except
      put(error)


def _stop(stop: threading.Event, thread: threading.Thread) -> None:
  stop.set()
  thread.join()


class HostReader(Protocol):
  """The host side of a `StreamingDataset`: this process's rows of each batch, as a dict of NumPy
  arrays: "images" (uint8 [b, H, W, 3], or a tuple of such views), "offsets" (float32 [b, 3],
  added once the mean is subtracted), "labels" (integer [b]) and "mask" (bool [b], False on
  padding rows), b being `per_device` times the number of this process's devices on "data"."""
  eval_protocols: tuple[str, ...]

  def train_batches(self, per_device: int, start_step: int) -> Iterator[dict]:
    """The rows of every training step from `start_step` on, forever: those of step s are a pure
    function of (seed, s)."""

  def eval_batches(self, per_device: int, protocol: str) -> Iterator[dict]:
    """The rows of every evaluation batch of `protocol`: every example once."""


class StreamingDataset:
  """A dataset streamed from the host (`core.Dataset`): `reader` reads this process's rows of each
  batch; the dataset assembles them into global batches on the devices and normalizes them
  there. `from_records` and `synthetic` build one."""

  def __init__(self, info: core.DatasetInfo, mesh: Mesh, reader: HostReader, mean: np.ndarray):
    self.info = info
    self.mesh = mesh
    self.reader = reader
    self.eval_protocols = reader.eval_protocols
    # float32 [H, W, 3] (per pixel, of the training views) or [1, 1, 3] (per channel).
    self.mean = np.asarray(mean, np.float32)
    self._means = {}  # (height, width) -> the mean of a view of that size, on the devices.
    self._train_block = info.train_size // core.num_data_devices(mesh)

  @classmethod
  def from_records(cls, config: ml_collections.ConfigDict, mesh: Mesh, train: Records,
                   evaluation: Records, *, name: str, num_classes: int) -> "StreamingDataset":
    """A tf.data pipeline over encoded images with ImageNet's transforms (section 3.4)
    (`record_reader.RecordReader`), its mean `record_reader.mean_image` (cached), that image's
    channel means, or none (`config.mean`)."""
    # TensorFlow: imported only by the paths that decode images.
    from resnet_jax.data import imagenet, record_reader  # pylint: disable=g-import-not-at-top
    reader = record_reader.RecordReader(config, mesh, train, evaluation)
    info = core.DatasetInfo(name=name, num_classes=num_classes,
                            image_shape=(imagenet.CROP, imagenet.CROP, 3), train_size=len(train),
                            eval_size=len(evaluation))
    logging.info("Streaming %s through tf.data: %d training examples (this process reads %d) and "
                 "%d evaluation examples, read and decoded as the steps need them", name,
                 len(train), len(reader.train_ids), len(evaluation))
    return cls(info, mesh, reader,
               core.subtracted_mean(config.mean, lambda: record_reader.mean_image(config, train)))

  @classmethod
  def synthetic(cls, config: ml_collections.ConfigDict, mesh: Mesh, *, name: str) -> "StreamingDataset":
    """Large synthetic images (benchmarks, smoke runs): `SyntheticReader`, no TensorFlow; their
    mean is that of uniform noise, SYNTHETIC_MEAN in every pixel (none with `config.mean` "none")."""
    reader = SyntheticReader(config, mesh)
    info = core.DatasetInfo(name=name, num_classes=config.num_classes, image_shape=reader.image_shape,
                            train_size=len(reader.train_labels), eval_size=len(reader.eval_labels),
                            synthetic=True)
    return cls(info, mesh, reader, core.subtracted_mean(
        config.mean, lambda: np.full((1, 1, 3), SYNTHETIC_MEAN, np.float32)))

  def steps_per_epoch(self, batch_size: int) -> int:
    return self._train_block // core.check_batch_size(batch_size, self.mesh)

  def per_device_batch_size(self, batch_size: int) -> int:
    """Each device's share of a global training batch of `batch_size`; a clear ValueError when
    it does not split evenly over "data" or exceeds the training examples."""
    per_device = core.check_batch_size(batch_size, self.mesh)
    if per_device > self._train_block:
      raise ValueError(f"batch size {batch_size} exceeds the {self.info.train_size} training examples")
    return per_device

  def mean_of(self, height: int, width: int) -> jax.Array:
    """The mean subtracted from a view of `height` x `width`: the mean image resized to it."""
    if (height, width) not in self._means:
      mean = self.mean
      if mean.shape[:2] not in ((1, 1), (height, width)):
        mean = jax.image.resize(mean, (height, width, 3), "bilinear")
      self._means[height, width] = jax.device_put(
          mean, jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()))
    return self._means[height, width]

  def train_iterator(self, batch_size: int, start_step: int = 0) -> PrefetchIterator:
    return PrefetchIterator(self, batch_size, start_step)

  def train_batches(self, batch_size: int, start_step: int = 0) -> Iterator[core.Batch]:
    """The training batches from step `start_step` on, forever, read and put on the devices by
    the calling thread (`train_iterator` prefetches them on a thread of its own)."""
    per_device = self.per_device_batch_size(batch_size)
    for local in self.reader.train_batches(per_device, start_step):
      yield self._to_device(local, batch_size)

  def eval_batches(self, batch_size: int, protocol: str = "center") -> Iterator[core.Batch]:
    """Every evaluation example once, padded and masked. "10crop" and "multiscale" give
    `images` as a tuple of views (10 of [B, 224, 224, 3]; 5 of [B, H, W, 3], the whole images
    resized to shorter side s in MULTISCALE_SIDES, each batch of one aspect bucket: see
    `imagenet.MULTISCALE_ASPECTS`); average the softmax scores over the views."""
    core.check_protocol(protocol, self.info, self.eval_protocols)
    per_device = core.check_batch_size(batch_size, self.mesh)
    for local in self.reader.eval_batches(per_device, protocol):
      yield self._to_device(local, batch_size)

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


class SyntheticReader:
  """Large synthetic images (benchmarks, smoke runs), the `HostReader` of
  `StreamingDataset.synthetic`: pure NumPy, no TensorFlow. Example i shows noise image
  i mod SYNTHETIC_POOL and carries a random label; nothing is augmented."""
  eval_protocols = ("center",)

  def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh):
    rng = np.random.default_rng(config.seed)
    self.image_shape = (config.image_size, config.image_size, 3)
    self._pool = rng.integers(0, 256, (SYNTHETIC_POOL,) + self.image_shape, np.uint8)
    self.train_labels = rng.integers(0, config.num_classes, config.synthetic_train_size, np.int32)
    self.eval_labels = rng.integers(0, config.num_classes, config.synthetic_eval_size, np.int32)
    self._mesh, self._seed = mesh, config.seed
    self.train_ids = core.local_train_ids(mesh, len(self.train_labels), config.seed)  # This process's.

  def train_batches(self, per_device: int, start_step: int) -> Iterator[dict]:
    for _, ids in epoch_orders(self.train_ids, self._mesh, per_device, self._seed, start_step):
      yield self._rows(ids, self.train_labels, np.ones(len(ids), bool))

  def eval_batches(self, per_device: int, protocol: str) -> Iterator[dict]:
    del protocol  # Only "center".
    for ids, valid in zip(*eval_local_rows(len(self.eval_labels), self._mesh, per_device)):
      yield self._rows(ids, self.eval_labels, valid)

  def _rows(self, ids: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> dict:
    offsets = np.zeros((len(ids), 3), np.float32)
    return {"images": self._pool[ids % SYNTHETIC_POOL], "offsets": offsets, "labels": labels[ids],
            "mask": mask}


def epoch_orders(ids: np.ndarray, mesh: Mesh, per_device: int, seed: int, start_step: int):
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


def eval_local_rows(num_examples: int, mesh: Mesh, per_device: int, groups: np.ndarray | None = None):
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
