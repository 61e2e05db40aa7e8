"""Types shared by every input pipeline, and how batches map onto devices and hosts.

Layout used everywhere: the mesh axis "data" has D devices. A global batch of B
examples is split into D equal rows-blocks, one per device; each process builds
only the blocks of the devices it can address (`local_rows`) and
`jax.make_array_from_process_local_data` assembles the global array.
"""
import dataclasses
from typing import Any, Callable, Iterator, Protocol

import flax
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


class DatasetNotFoundError(ValueError):
  """A dataset is not available locally; the message says where we looked and how to fix it."""


# Evaluation protocols of the streaming (ImageNet-sized) datasets, Sec. 3.4: the centre crop,
# the standard 10-crop, and the fully convolutional multi-scale average (`imagenet.eval_views`
# makes each one's views).
EVAL_PROTOCOLS = ("center", "10crop", "multiscale")


class CorruptImageError(ValueError):
  """An image does not decode; the message names it."""


class ImageSizeError(ValueError):
  """An image held on the devices differs in size from the others; the message names it."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  train_size: int
  eval_size: int
  synthetic: bool = False


@flax.struct.dataclass
class Batch:
  """`images`: float32 [B, H, W, C], mean-subtracted; for multi-view evaluation a tuple of such
  arrays, one per view. `labels`: int32 [B]. `mask`: bool [B], False on padding rows."""
  images: jax.Array | tuple[jax.Array, ...]
  labels: jax.Array
  mask: jax.Array


class TrainIterator(Protocol):
  """A dataset's training inputs, from `Dataset.train_iterator(batch_size, start_step)`.

  `next()` gives what the jitted step takes as its data argument, and `batch(inputs, step)`,
  called inside the jitted step with the train state's step (the number of updates done),
  turns that into the step's `Batch`. An on-device dataset gives itself, and `batch` samples
  and augments there; a streaming dataset gives a prefetched `Batch`, which `batch` returns.
  `get_state()` is what a checkpoint saves (None: the step alone fixes the position) and
  `set_state` restores it; `close()` stops any background work.
  """

  def __iter__(self) -> "TrainIterator": ...
  def __next__(self) -> Any: ...
  def batch(self, inputs: Any, step: jax.Array) -> Batch: ...
  def get_state(self) -> dict | None: ...
  def set_state(self, state: dict) -> None: ...
  def close(self) -> None: ...


class Dataset(Protocol):
  """What `data.create` returns: an `OnDeviceDataset` or a `StreamingDataset`.

  `mean` is what the pipeline subtracts from every image's pixels (`subtracted_mean`): float32
  [H, W, C] (per pixel; a view of another size gets it resized bilinearly) or [1, 1, C],
  the same on every process (`np.asarray(dataset.mean)` reads it on any).
  """
  info: DatasetInfo
  eval_protocols: tuple[str, ...]
  mean: np.ndarray | jax.Array

  def steps_per_epoch(self, batch_size: int) -> int: ...
  def train_iterator(self, batch_size: int, start_step: int = 0) -> TrainIterator: ...
  def eval_batches(self, batch_size: int, protocol: str = "center") -> Iterator[Batch]: ...


def subtracted_mean(kind: str, per_pixel: Callable[[], np.ndarray]) -> np.ndarray:
  """The float32 mean a pipeline subtracts by `dataset.mean` `kind` (`config.MEANS`): the
  training split's per-pixel mean image `per_pixel()` ([H, W, C], or [1, 1, C] for data whose
  every pixel has the same mean), its channel means [1, 1, C], or "none": zeros [1, 1, 3],
  `per_pixel` never called (so no training image is read)."""
  if kind == "none":
    return np.zeros((1, 1, 3), np.float32)
  image = np.asarray(per_pixel(), np.float32)
  return image.mean(axis=(0, 1), keepdims=True) if kind == "per_channel" else image


def host_copy(replicated: jax.Array | np.ndarray) -> np.ndarray:
  """The value of an array replicated over the mesh (a dataset's `mean`), read on this host: from
  this process's own copy, since an array over several processes' devices cannot be read whole."""
  if isinstance(replicated, jax.Array):
    replicated = replicated.addressable_data(0)
  return np.asarray(replicated)


def check_protocol(protocol: str, info: DatasetInfo, protocols: tuple[str, ...]) -> None:
  """A clear ValueError unless `protocol` is one of the dataset's evaluation protocols."""
  if protocol not in protocols:
    raise ValueError(f"eval_protocol {protocol!r} is not available for {info.name}, whose "
                     f"{info.image_shape[0]}x{info.image_shape[1]} images are evaluated by "
                     f"{', '.join(map(repr, protocols))}; use one of those.")


def views(batch: Batch) -> tuple[jax.Array, ...]:
  """The batch's views as a tuple (one view for single-view batches)."""
  return batch.images if isinstance(batch.images, tuple) else (batch.images,)


def make_mesh(devices=None) -> Mesh:
  """The one-axis ("data") mesh over `devices` (default: every device) that runs data parallelism.

  Its axis type is Auto, chosen rather than left to `jax.make_mesh`'s default: data parallelism
  needs no sharding in the types. Batches arrive sharded on "data" and the state replicated, and
  the compiler propagates that through the step and inserts the all-reduces (why not Explicit:
  docs/running_at_scale.md, "The mesh"). The models and the data pipelines themselves work under
  either axis type (tests/test_data.py, tests/test_ops.py).
  """
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


def platform(mesh: Mesh) -> str:
  """The platform ("cpu", "gpu", "tpu") of the mesh's devices: what its steps are built and
  compiled for, whatever the host's default backend (a CPU host compiles for a TPU slice)."""
  platforms = {device.platform for device in mesh.devices.flat}
  if len(platforms) != 1:
    raise ValueError(f"the mesh mixes device platforms {sorted(platforms)}; use one kind.")
  return platforms.pop()


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def num_data_devices(mesh: Mesh) -> int:
  if DATA_AXIS not in mesh.shape:
    raise ValueError(f"the mesh needs an axis named {DATA_AXIS!r}; it has axes {tuple(mesh.shape)}")
  return mesh.shape[DATA_AXIS]


def check_batch_size(batch_size: int, mesh: Mesh | jax.sharding.AbstractMesh,
                     name: str = "global batch size") -> int:
  """The per-device batch size of `batch_size` split over the mesh's "data" axis; a ValueError
  naming the fix (and `batch_size` by `name`) when it does not split evenly. An AbstractMesh
  checks a run for devices not at hand."""
  devices = num_data_devices(mesh)
  if batch_size <= 0 or batch_size % devices:
    fix = max(devices, round(batch_size / devices) * devices)
    raise ValueError(f"{name} {batch_size} does not divide across {devices} devices; use a "
                     f"multiple of {devices} (e.g. {fix}).")
  return batch_size // devices


def local_devices_range(mesh: Mesh) -> tuple[int, int]:
  """[first, last) positions on the "data" axis whose blocks this process builds."""
  devices = num_data_devices(mesh)
  index_map = batch_sharding(mesh).addressable_devices_indices_map((devices,))
  positions = sorted({index[0].start or 0 for index in index_map.values()})
  if positions != list(range(positions[0], positions[-1] + 1)):
    raise ValueError(f"this process's devices are not contiguous on the {DATA_AXIS!r} axis: "
                     f"{positions}; build the mesh with jax.make_mesh")
  return positions[0], positions[-1] + 1


def local_train_ids(mesh: Mesh, num_examples: int, seed: int) -> np.ndarray:
  """This process's training examples, in order: the blocks of its devices when a fixed seeded
  permutation of examples 0..N-1 is dealt to the D devices of "data", N // D each.

  The permutation mixes classes across devices (sources list examples class by class), and the
  N mod D examples it leaves out, never used, are chosen at random.
  """
  block = num_examples // num_data_devices(mesh)
  first, last = local_devices_range(mesh)
  return np.random.default_rng([seed, 1]).permutation(num_examples)[first * block:last * block]


def local_rows(mesh: Mesh, num_rows: int) -> slice:
  """Rows of a [num_rows, ...] array sharded over "data" that this process supplies."""
  per_device = num_rows // num_data_devices(mesh)
  first, last = local_devices_range(mesh)
  return slice(first * per_device, last * per_device)


def to_global(mesh: Mesh, local_array: np.ndarray, global_rows: int) -> jax.Array:
  """Assembles process-local rows into one global array sharded on the "data" axis."""
  return jax.make_array_from_process_local_data(
      batch_sharding(mesh), local_array, (global_rows,) + local_array.shape[1:])


def eval_chunks(num_examples: int, num_devices: int) -> list[np.ndarray]:
  """Splits example ids 0..N-1 into one contiguous chunk per device (sizes differ by at most 1)."""
  return np.array_split(np.arange(num_examples), num_devices)


def eval_row_ids(chunks: list[np.ndarray], per_device: int) -> tuple[np.ndarray, np.ndarray]:
  """Example id and validity of every row of every evaluation batch, in batch order.

  Each device walks its own chunk `per_device` examples at a time; the last batch is padded
  (id of the chunk's first example, valid=False), so every example appears exactly once.
  Returns (ids, valid), each [num_batches, len(chunks) * per_device].
  """
  longest = max(len(chunk) for chunk in chunks)
  num_batches = max(1, -(-longest // per_device))
  ids, valid = [], []
  for chunk in chunks:
    padded = np.full(num_batches * per_device, chunk[0] if len(chunk) else 0, np.int64)
    padded[:len(chunk)] = chunk
    ids.append(padded.reshape(num_batches, per_device))
    valid.append((np.arange(num_batches * per_device) < len(chunk)).reshape(num_batches, per_device))
  return np.concatenate(ids, axis=1), np.concatenate(valid, axis=1)
