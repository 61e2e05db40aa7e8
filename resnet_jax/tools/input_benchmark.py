"""Input-pipeline throughput: `python -m resnet_jax.tools.input_benchmark [--cifar10_dir DIR]`.

Measures (1) the CIFAR on-device fast path: sampling + augmentation inside jit, batch 128, on
one device; (2) the ImageNet training input as the trainer reads it for `name=imagenet2012`:
TFDS's array_record records read by index, then tf.data's JPEG decode of the crop window, scale
augmentation, 224 crop, flip, lighting and transfer (`data.create(...).train_iterator`); beside
it, the same records, decode and augmentation (`imagenet.train_view_from_bytes`, so the same
pixels) in a Grain pipeline of worker processes, and tf.data again over the same JPEGs as an
image folder.

The ImageNet data is made here, offline: ILSVRC2012-shaped tars of generated JPEGs about
500x375 (ImageNet's typical size; `source_files.write_ilsvrc2012_tars`), which TFDS's own
imagenet2012 builder turns into array_record (`prepare.prepare`) in a temporary directory.

The pipelines are timed in alternating repeats, each on a fresh iterator whose first batches
(start-up, buffers) stay out of the timing. Per core: images per CPU-second of this process and
its live descendants (Grain's workers), read from /proc (Linux) over the timed batches; other
jobs on a shared machine move it far less than the wall-clock rate beside it.
"""
import dataclasses
import functools
import os
import statistics
import tempfile
import time
from typing import Callable, Iterator

import jax
import numpy as np
from absl import flags
from etils import epath

from resnet_jax import data
from resnet_jax.data import sources, streaming
from resnet_jax.tools import prepare, source_files
from resnet_jax.training import cli

IMAGE_HEIGHT = 375  # Widths 375 to 562: ImageNet's typical 500x375 and its neighbours.


def cifar_on_device(cifar10_dir: str | None, steps: int = 200, batch_size: int = 128) -> float:
  mesh = data.core.make_mesh(jax.devices()[:1])
  config = data.default_config("image_folder" if cifar10_dir else "synthetic")
  config.data_dir = cifar10_dir
  ds = data.create(config, mesh)
  step_fn = jax.jit(lambda d, s: d.train_batch(s, batch_size).images.sum())
  step_fn(ds, 0).block_until_ready()
  start = time.perf_counter()
  for step in range(1, steps + 1):
    out = step_fn(ds, step)
  out.block_until_ready()
  return steps * batch_size / (time.perf_counter() - start)


def write_imagenet(root: epath.PathLike, num_classes: int, per_class: int,
                   image_height: int = IMAGE_HEIGHT) -> epath.Path:
  """A small imagenet2012 in array_record under root/tfds (TFDS's data_dir); returns it."""
  root = epath.Path(root)
  source_files.write_ilsvrc2012_tars(root / "manual", num_classes=num_classes,
                                     train_per_class=per_class, val_images=num_classes,
                                     image_size=image_height)
  prepare.prepare("imagenet2012", str(root / "tfds"), str(root / "manual"))
  return root / "tfds"


def write_folder(data_dir: epath.PathLike, root: epath.PathLike) -> epath.Path:
  """The training JPEGs of `data_dir`'s imagenet2012 as an image folder root/train/<label>/."""
  root = epath.Path(root)
  records = sources.tfds_random_access("imagenet2012", str(data_dir), "train")
  for index in range(len(records)):
    example = records.data_source[index]
    folder = root / "train" / f"{int(example['label']):04d}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{index}.jpg").write_bytes(example["image"])
  return root


def tf_data_batches(name: str, data_dir: epath.PathLike, batch_size: int) -> Iterator[jax.Array]:
  """The trainer's training input (`data.create(...).train_iterator`): its batches' images."""
  config = data.default_config(name)
  config.data_dir = str(data_dir)
  if name == "image_folder":
    config.eval_split, config.num_classes = "train", 1000  # Evaluation is not timed.
  iterator = data.create(config, data.core.make_mesh(jax.devices()[:1])).train_iterator(batch_size)
  try:
    for batch in iterator:
      yield batch.images
  finally:
    iterator.close()


@dataclasses.dataclass(frozen=True)
class TrainView:
  """Grain's per-example work: a record at a position of the run -> the training view."""
  seed: int

  def __call__(self, position: int, record: dict) -> dict:
    image, offset = _train_view()(record["image"], np.array([self.seed, position], np.int64))
    return {"images": image.numpy(), "offsets": offset.numpy(), "labels": np.int32(record["label"])}


@functools.cache
def _train_view() -> Callable:
  """`imagenet.train_view_from_bytes` as one TensorFlow graph, built once per worker process."""
  from resnet_jax.data import imagenet  # pylint: disable=g-import-not-at-top
  tf = sources.tensorflow()
  return tf.function(lambda contents, seed: imagenet.train_view_from_bytes(contents, seed),
                     input_signature=[tf.TensorSpec([], tf.string), tf.TensorSpec([2], tf.int64)])


def grain_batches(data_dir: epath.PathLike, batch_size: int, workers: int,
                  seed: int = 0) -> Iterator[jax.Array]:
  """The same records, decode and augmentation in Grain: a seeded shuffle per epoch, `workers`
  processes of one reading thread each, then the trainer's transfer and float conversion."""
  import grain  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():  # Grain reads its options from absl flags: their defaults.
    flags.FLAGS.mark_as_parsed()
  records = sources.tfds_random_access("imagenet2012", str(data_dir), "train")
  config = data.default_config("imagenet2012")
  config.data_dir = str(data_dir)
  # The trainer's mean image (computed and cached by `data.create`, as the trainer's start does).
  mean = jax.device_put(data.create(config, data.core.make_mesh(jax.devices()[:1])).mean)
  dataset = (grain.MapDataset.source(records.data_source).seed(seed).shuffle().repeat()
             .map_with_index(TrainView(seed)).batch(batch_size, drop_remainder=True))
  iterator = iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
                  .mp_prefetch(grain.MultiprocessingOptions(num_workers=workers)))
  try:
    for batch in iterator:
      yield streaming.normalize(jax.device_put(batch["images"]), mean,
                                jax.device_put(batch["offsets"]))
  finally:
    iterator.close()


def tree_cpu_s() -> float:
  """CPU seconds (user + system) used so far by this process and its live descendants."""
  ticks, total, pending = os.sysconf("SC_CLK_TCK"), 0, [os.getpid()]
  while pending:
    pid = pending.pop()
    try:
      stat = epath.Path(f"/proc/{pid}/stat").read_text()
      for task in epath.Path(f"/proc/{pid}/task").iterdir():
        pending.extend(int(child) for child in (task / "children").read_text().split())
    except (FileNotFoundError, ProcessLookupError):  # It exited meanwhile.
      continue
    fields = stat.rsplit(")", 1)[1].split()  # proc(5): fields 14 and 15, utime and stime.
    total += int(fields[11]) + int(fields[12])
  return total / ticks


@dataclasses.dataclass
class Timing:
  """Images per wall-clock second and per CPU-second of each timed repeat."""
  wall: list[float] = dataclasses.field(default_factory=list)
  per_cpu_s: list[float] = dataclasses.field(default_factory=list)


def time_pipelines(pipelines: dict[str, Callable[[], Iterator[jax.Array]]], batch_size: int,
                   repeats: int, steps: int, warmup: int) -> dict[str, Timing]:
  """Alternating repeats: per pipeline a fresh iterator, `warmup` batches, then `steps` timed."""
  timings = {name: Timing() for name in pipelines}
  for _ in range(repeats):
    for name, make in pipelines.items():
      batches = make()
      for _ in range(warmup):
        next(batches).block_until_ready()
      start, cpu_start = time.perf_counter(), tree_cpu_s()
      for _ in range(steps):
        next(batches).block_until_ready()
      wall, cpu = time.perf_counter() - start, tree_cpu_s() - cpu_start
      batches.close()
      timings[name].wall.append(steps * batch_size / wall)
      # The kernel counts CPU time in whole clock ticks: a repeat that used less than one counts
      # as one, which makes its rate a lower bound rather than a division by zero.
      tick = 1 / os.sysconf("SC_CLK_TCK")
      timings[name].per_cpu_s.append(steps * batch_size / max(cpu, tick))
  return timings


def imagenet_pipelines(root: epath.PathLike, num_classes: int = 32, per_class: int = 8,
                       batch_size: int = 64, repeats: int = 5, steps: int = 6, warmup: int = 3,
                       workers: int | None = None,
                       image_height: int = IMAGE_HEIGHT) -> dict[str, Timing]:
  """Builds the data under `root` and times the three ImageNet pipelines of the module doc."""
  workers = workers or len(os.sched_getaffinity(0))
  data_dir = write_imagenet(root, num_classes, per_class, image_height)
  folder = write_folder(data_dir, epath.Path(root) / "folder")
  pipelines = {
      "tf.data, array_record": lambda: tf_data_batches("imagenet2012", data_dir, batch_size),
      "Grain, array_record": lambda: grain_batches(data_dir, batch_size, workers),
      "tf.data, image folder": lambda: tf_data_batches("image_folder", folder, batch_size),
  }
  return time_pipelines(pipelines, batch_size, repeats, steps, warmup)


def format_timings(timings: dict[str, Timing]) -> str:
  baseline = statistics.median(next(iter(timings.values())).per_cpu_s)
  lines = [f"{'pipeline':<24} {'images/s':>9} {'min-max':>11} {'per core':>9} {'min-max':>11} "
           f"{'cores':>5} {'per core vs first':>17}"]
  for name, t in timings.items():
    wall, per_core = statistics.median(t.wall), statistics.median(t.per_cpu_s)
    lines.append(f"{name:<24} {wall:9.1f} {min(t.wall):5.0f}-{max(t.wall):<5.0f} {per_core:9.1f} "
                 f"{min(t.per_cpu_s):5.0f}-{max(t.per_cpu_s):<5.0f} {wall / per_core:5.2f} "
                 f"{per_core / baseline:16.2f}x")
  return "\n".join(lines)


def _define_flags() -> None:
  flags.DEFINE_string("cifar10_dir", str(epath.Path(__file__).resolve().parents[3]
                                         / "shared/data/cifar10-jpeg"),
                      "CIFAR-10 as an image folder (DIR/train/<class>/); synthetic images where "
                      "it is not.")
  flags.DEFINE_integer("classes", 32, "ImageNet classes written.")
  flags.DEFINE_integer("per_class", 8, "ImageNet training images per class.")
  flags.DEFINE_integer("batch", 64, "ImageNet batch size.")
  flags.DEFINE_integer("repeats", 5, "Alternating repeats per pipeline.")
  flags.DEFINE_integer("steps", 6, "Timed ImageNet batches per repeat.")


def main(argv: list[str]) -> None:
  del argv  # No positional arguments (cli.run).
  options = flags.FLAGS
  cifar10_dir = options.cifar10_dir if epath.Path(options.cifar10_dir, "train").is_dir() else None
  cores = len(os.sched_getaffinity(0))
  print(f"devices: {jax.devices()}; {cores} cores")
  print(f"CIFAR on-device (sample+augment in jit, batch 128, "
        f"{'real CIFAR-10' if cifar10_dir else 'synthetic'}): "
        f"{cifar_on_device(cifar10_dir):,.0f} images/s")
  with tempfile.TemporaryDirectory(prefix="resnet_jax_bench_") as root:
    timings = imagenet_pipelines(root, options.classes, options.per_class, options.batch,
                                 options.repeats, options.steps)
  print(f"ImageNet training input, {options.classes * options.per_class} JPEGs of {IMAGE_HEIGHT} x "
        f"{IMAGE_HEIGHT}-{IMAGE_HEIGHT * 3 // 2}, batch {options.batch}, {options.repeats} "
        f"alternating repeats of {options.steps} batches; Grain with {cores} worker processes; "
        "per core = images per CPU-second, cores = CPU-s per wall-s:")
  print(format_timings(timings))


if __name__ == "__main__":
  cli.run(main, _define_flags)
