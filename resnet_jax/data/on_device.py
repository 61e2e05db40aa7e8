"""CIFAR-sized datasets held on the accelerators, sampled and augmented inside the jitted step.

The training split lives on the devices once, as uint8 [D, n, H, W, C] sharded over the mesh
axis "data": device d holds its own n = N // D examples (a fixed seeded shuffle decides which;
the N mod D left over are never used). Each step every device takes B / D examples from its own
block, so no data crosses devices and no host code runs between steps.

Batch of step s = pure function of (seed, s, D): in epoch e = s // steps_per_epoch device d
reads its block in the order permutation(fold_in(order_key, e, d)); its crops and flips come
from fold_in(augment_key, s, d), where (order_key, augment_key) = split(key(seed)). A resumed run therefore sees exactly the batches of an uninterrupted one.

Augmentation (paper section 4.2): 4 zero pixels padded on each side, a random 32x32 crop and a
random horizontal flip. Padding is applied after mean subtraction, so the network sees zeros
there (as fb.resnet.torch does). No TensorFlow here: this path trains from plain arrays.
"""
import functools
from typing import Callable, Iterator

import flax
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, PartitionSpec

from resnet_jax.data import core

PAD = 4


def augment(key: jax.Array, images: jax.Array) -> jax.Array:
  """Random crop of the zero-padded images and random horizontal flip; [B, H, W, C] -> same."""
  batch, height, width, channels = images.shape
  crop_key, flip_key = jax.random.split(key)
  offsets = jax.random.randint(crop_key, (batch, 2), 0, 2 * PAD + 1)
  flips = jax.random.bernoulli(flip_key, 0.5, (batch,))
  padded = jnp.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)))
  crop = lambda image, offset: jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))
  crops = jax.vmap(crop)(padded, offsets)
  return jnp.where(flips[:, None, None, None], crops[:, :, ::-1], crops)


@functools.partial(jax.jit, static_argnames=("batch_size", "seed", "augment_images", "mesh"))
def _train_batch(images, labels, mean, step, *, batch_size, seed, augment_images, mesh):
  per_device = batch_size // labels.shape[0]
  order_key, augment_key = jax.random.split(jax.random.key(seed))

  def device_batch(block_images, block_labels, mean, step):  # Runs on each device, on its own block.
    device = jax.lax.axis_index(core.DATA_AXIS)
    block_size = block_labels.shape[1]
    epoch, position = jnp.divmod(step, block_size // per_device)
    order = jax.random.permutation(jax.random.fold_in(jax.random.fold_in(order_key, epoch), device), block_size)
    ids = jax.lax.dynamic_slice_in_dim(order, position * per_device, per_device)
    batch_images = block_images[0, ids].astype(jnp.float32) - mean
    if augment_images:
      step_key = jax.random.fold_in(jax.random.fold_in(augment_key, step), device)
      batch_images = augment(step_key, batch_images)
    return core.Batch(batch_images, block_labels[0, ids], jnp.ones(per_device, bool))

  spec = PartitionSpec(core.DATA_AXIS)
  return jax.shard_map(device_batch, mesh=mesh, in_specs=(spec, spec, PartitionSpec(), PartitionSpec()),
                       out_specs=spec)(images, labels, mean, jnp.asarray(step, jnp.int32))


@functools.partial(jax.jit, static_argnames=("per_device", "mesh"))
def _eval_batch(images, labels, mask, mean, index, *, per_device, mesh):
  def device_batch(block_images, block_labels, block_mask, mean, index):
    block_size = block_labels.shape[1]
    rows = index * per_device + jnp.arange(per_device)
    valid = rows < block_size
    rows = jnp.minimum(rows, block_size - 1)
    return core.Batch(block_images[0, rows].astype(jnp.float32) - mean, block_labels[0, rows],
                      block_mask[0, rows] & valid)

  spec = PartitionSpec(core.DATA_AXIS)
  return jax.shard_map(device_batch, mesh=mesh, in_specs=(spec, spec, spec, PartitionSpec(), PartitionSpec()),
                       out_specs=spec)(images, labels, mask, mean, jnp.asarray(index, jnp.int32))


class FusedIterator:
  """Training inputs of an `OnDeviceDataset` (`core.TrainIterator`): `next()` gives the dataset
  itself, and `batch` samples and augments the step's examples inside the jitted step, so no
  host work runs between steps. The train state's step is the whole position: no other state."""

  def __init__(self, dataset: "OnDeviceDataset", batch_size: int):
    dataset.per_device_batch_size(batch_size)  # A bad size fails here.
    self._dataset, self._batch_size = dataset, batch_size

  def __iter__(self) -> "FusedIterator":
    return self

  def __next__(self) -> "OnDeviceDataset":
    return self._dataset

  def batch(self, inputs: "OnDeviceDataset", step: jax.Array) -> core.Batch:
    return inputs.train_batch(step, self._batch_size)

  def get_state(self) -> None:
    return None

  def set_state(self, state: dict) -> None:
    del state  # The batch of a step depends on nothing else.

  def close(self) -> None:
    pass


@flax.struct.dataclass
class OnDeviceDataset:
  """A whole dataset on the devices (`core.Dataset`). A pytree: `train_iterator` passes it into
  the jitted step, which calls `train_batch` there."""
  train_images: jax.Array  # uint8 [D, n, H, W, C]
  train_labels: jax.Array  # int32 [D, n]
  eval_images: jax.Array  # uint8 [D, m, H, W, C], chunk d padded to m = ceil(N_eval / D)
  eval_labels: jax.Array  # int32 [D, m]
  eval_mask: jax.Array  # bool [D, m], False on padding
  mean: jax.Array  # float32 [H, W, C] or [1, 1, C]: `core.subtracted_mean`
  info: core.DatasetInfo = flax.struct.field(pytree_node=False)
  mesh: Mesh = flax.struct.field(pytree_node=False)
  seed: int = flax.struct.field(pytree_node=False)
  augment: bool = flax.struct.field(pytree_node=False, default=True)
  eval_protocols = ("center",)  # Images this small are evaluated whole.

  def steps_per_epoch(self, batch_size: int) -> int:
    return self.train_labels.shape[1] // self.per_device_batch_size(batch_size)

  def train_batch(self, step: jax.Array, batch_size: int) -> core.Batch:
    """The (augmented) batch of training step `step`, sharded on "data". Traceable."""
    self.per_device_batch_size(batch_size)
    return _train_batch(self.train_images, self.train_labels, self.mean, step, batch_size=batch_size,
                        seed=self.seed, augment_images=self.augment, mesh=self.mesh)

  def train_iterator(self, batch_size: int, start_step: int = 0) -> FusedIterator:
    del start_step  # `batch` takes the step from the train state.
    return FusedIterator(self, batch_size)

  def num_eval_batches(self, batch_size: int) -> int:
    return -(-self.eval_labels.shape[1] // core.check_batch_size(batch_size, self.mesh))

  def eval_batches(self, batch_size: int, protocol: str = "center") -> Iterator[core.Batch]:
    """Every evaluation example exactly once (padding rows have mask False); not augmented."""
    core.check_protocol(protocol, self.info, self.eval_protocols)
    per_device = core.check_batch_size(batch_size, self.mesh)
    for index in range(self.num_eval_batches(batch_size)):
      yield _eval_batch(self.eval_images, self.eval_labels, self.eval_mask, self.mean, index,
                        per_device=per_device, mesh=self.mesh)

  def per_device_batch_size(self, batch_size: int) -> int:
    """Each device's share of a global training batch of `batch_size`; a clear ValueError when
    it does not split evenly over "data" or exceeds the examples each device holds."""
    per_device = core.check_batch_size(batch_size, self.mesh)
    if per_device > self.train_labels.shape[1]:
      raise ValueError(f"batch size {batch_size} exceeds the {self.train_labels.shape[1] * self.train_labels.shape[0]} "
                       "training examples held on the devices")
    return per_device


def place_train(mesh: Mesh, labels: np.ndarray, load: Callable[[np.ndarray], np.ndarray], seed: int):
  """Puts the training split on the devices as [D, n, ...] blocks (`core.local_train_ids` deals
  the examples); this process loads only its own.

  `labels` covers the whole split, `load(ids)` returns the uint8 images of examples `ids`.
  """
  devices = core.num_data_devices(mesh)
  shard_size = len(labels) // devices
  first, last = core.local_devices_range(mesh)
  ids = core.local_train_ids(mesh, len(labels), seed)
  images = load(ids)
  images = images.reshape((last - first, shard_size) + images.shape[1:])
  local_labels = labels[ids].astype(np.int32).reshape(last - first, shard_size)
  return core.to_global(mesh, images, devices), core.to_global(mesh, local_labels, devices)


def place_eval(mesh: Mesh, labels: np.ndarray, load: Callable[[np.ndarray], np.ndarray]):
  """Puts the evaluation split on the devices as padded [D, m, ...] blocks plus a validity mask."""
  devices = core.num_data_devices(mesh)
  chunks = core.eval_chunks(len(labels), devices)
  ids, valid = core.eval_row_ids(chunks, per_device=len(chunks[0]))  # One batch of whole chunks.
  first, last = core.local_devices_range(mesh)
  shard_size = len(chunks[0])
  local_ids = ids.reshape(devices, shard_size)[first:last].reshape(-1)
  local_valid = valid.reshape(devices, shard_size)[first:last]
  images = load(local_ids)
  images = images.reshape((last - first, shard_size) + images.shape[1:])
  local_labels = labels[local_ids].astype(np.int32).reshape(last - first, shard_size)
  return (core.to_global(mesh, images, devices), core.to_global(mesh, local_labels, devices),
          core.to_global(mesh, local_valid, devices))


def abstract(mesh: Mesh, info: core.DatasetInfo, *, seed: int, augment: bool) -> OnDeviceDataset:
  """The shapes, dtypes and shardings of the `OnDeviceDataset` that `build` makes for `info` on
  `mesh`, without its data: what a step is compiled for before the data exists
  (`resnet_jax.training.compile`)."""
  devices = core.num_data_devices(mesh)
  sharded = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype,
                                                      sharding=core.batch_sharding(mesh))
  train_block, eval_block = info.train_size // devices, -(-info.eval_size // devices)
  return OnDeviceDataset(
      train_images=sharded((devices, train_block, *info.image_shape), jnp.uint8),
      train_labels=sharded((devices, train_block), jnp.int32),
      eval_images=sharded((devices, eval_block, *info.image_shape), jnp.uint8),
      eval_labels=sharded((devices, eval_block), jnp.int32),
      eval_mask=sharded((devices, eval_block), jnp.bool_),
      mean=jax.ShapeDtypeStruct(info.image_shape, jnp.float32,
                                sharding=jax.sharding.NamedSharding(mesh, PartitionSpec())),
      info=info, mesh=mesh, seed=seed, augment=augment)


def per_pixel_mean(train_images: jax.Array) -> np.ndarray:
  """float32 [H, W, C] mean over every example held in `train_images` [D, n, H, W, C]."""
  logging.info("Computing the per-pixel mean of %d training images",
               train_images.shape[0] * train_images.shape[1])
  return np.asarray(jax.jit(lambda x: jnp.mean(x, axis=(0, 1), dtype=jnp.float32))(train_images))


def from_arrays(mesh: Mesh, train_images: np.ndarray, train_labels: np.ndarray, eval_images: np.ndarray,
                eval_labels: np.ndarray, *, name: str, num_classes: int, seed: int = 0, augment: bool = True,
                synthetic: bool = False,
                mean: np.ndarray | Callable[[jax.Array], np.ndarray] | None = None
                ) -> OnDeviceDataset:
  """An `OnDeviceDataset` from in-memory uint8 arrays (every process passes the full arrays).

  `mean` (float32 [H, W, C] or [1, 1, C], or a function of the placed training images, as
  `build` takes it) defaults to the per-pixel mean of `train_images`.
  """
  train_images, eval_images = np.asarray(train_images), np.asarray(eval_images)
  if train_images.dtype != np.uint8 or eval_images.dtype != np.uint8:
    raise ValueError(f"images must be uint8 (got {train_images.dtype} and {eval_images.dtype})")
  return build(mesh, np.asarray(train_labels), lambda ids: train_images[ids], np.asarray(eval_labels),
               lambda ids: eval_images[ids], name=name, num_classes=num_classes, seed=seed, augment=augment,
               synthetic=synthetic, mean=mean)


def build(mesh: Mesh, train_labels: np.ndarray, load_train, eval_labels: np.ndarray, load_eval, *, name: str,
          num_classes: int, seed: int, augment: bool, synthetic: bool = False,
          mean: np.ndarray | Callable[[jax.Array], np.ndarray] | None = None) -> OnDeviceDataset:
  """Places both splits; `mean` is an array, a function of the placed train images, or None (computed)."""
  for split, labels in (("training", train_labels), ("evaluation", eval_labels)):
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
      raise ValueError(f"{split} labels must lie in [0, {num_classes}) for num_classes="
                       f"{num_classes}; found labels from {labels.min()} to {labels.max()}")
  first, last = core.local_devices_range(mesh)
  logging.info("Loading %s onto the devices: %d training and %d evaluation images (this process "
               "loads the blocks of %d of the %d devices)", name, len(train_labels), len(eval_labels),
               last - first, core.num_data_devices(mesh))
  train_images, train_labels_global = place_train(mesh, train_labels, load_train, seed)
  eval_images, eval_labels_global, eval_mask = place_eval(mesh, eval_labels, load_eval)
  if mean is None:
    mean = per_pixel_mean(train_images)
  elif callable(mean):
    mean = mean(train_images)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  info = core.DatasetInfo(name=name, num_classes=num_classes, image_shape=tuple(train_images.shape[2:]),
                          train_size=len(train_labels), eval_size=len(eval_labels), synthetic=synthetic)
  return OnDeviceDataset(train_images=train_images, train_labels=train_labels_global, eval_images=eval_images,
                         eval_labels=eval_labels_global, eval_mask=eval_mask,
                         mean=jax.device_put(np.asarray(mean, np.float32), replicated), info=info, mesh=mesh,
                         seed=seed, augment=augment)
