"""Where examples come from: TFDS datasets, image folders, and the 45k/5k CIFAR split.

A source lists a split's examples before any pixel is decoded (`Records`: labels plus either
file paths or encoded image bytes, or a TFDS random-access source that is only opened), so every
process can pick its own examples and decode only those (`decoding`, `record_reader`).

TensorFlow is imported by `tensorflow()` alone, which hides the GPUs from it. The modules that
decode images (`decoding`, `imagenet`, `record_reader`) bind `tf = sources.tensorflow()` once,
at their import, and only the paths that decode import them: `import resnet_jax.data`, the
synthetic and the in-memory (`from_arrays`) pipelines never import TensorFlow.
"""
import concurrent.futures
import dataclasses
import functools
import hashlib
import os
from typing import Any

import numpy as np
from absl import logging
from etils import epath

from resnet_jax.data.core import DatasetNotFoundError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
VAL5K_SIZE = 5000
# Fixed for every run (independent of the training seed) so all runs validate on the same 5k.
VAL5K_SEED = 0


@functools.cache
def tensorflow() -> Any:
  """The `tensorflow` module, with GPUs hidden so TF never takes accelerator memory."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")
  return tf


@functools.cache
def tensorflow_datasets() -> Any:
  tensorflow()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds


@dataclasses.dataclass(frozen=True)
class Records:
  """Examples of one split: `labels` with `paths` (file names) or `encoded` (image bytes); or
  `data_source` alone, a TFDS random-access source of {"image": bytes, "label": int} whose
  examples are read, label and image together, only when the pipeline fetches them. A TFDS
  split's `identity` names its data (`tfds_split`)."""
  labels: np.ndarray | None = None
  paths: np.ndarray | None = None
  encoded: np.ndarray | None = None
  data_source: Any = None
  identity: str | None = None

  def __len__(self) -> int:
    return len(self.labels) if self.data_source is None else len(self.data_source)

  def name(self, index: int) -> str:
    return self.paths[index] if self.paths is not None else f"example {index} of the split"

  def subset(self, ids: np.ndarray) -> "Records":
    if self.data_source is not None:
      raise ValueError("subset() of a TFDS data source: index it with ids instead")
    pick = lambda array: None if array is None else array[ids]
    return Records(self.labels[ids], pick(self.paths), pick(self.encoded), identity=self.identity)


def fingerprint(records: Records, ids: np.ndarray | None = None) -> str:
  """What names the data of examples `ids` (default: all) of `records`, for a cache of what is
  computed from them: a TFDS split's identity; for image files, their count and a digest of
  every file name (from their common folder on) and of the size and modification time of the
  files `ids`, so that files replaced in place, added, removed or renamed give another."""
  if records.paths is None:
    return records.identity
  paths = sorted(records.paths)
  common = next((i for i, (a, b) in enumerate(zip(paths[0], paths[-1])) if a != b), len(paths[0]))
  start = paths[0].rfind("/", 0, common) + 1
  picked = records.paths if ids is None else records.paths[ids]
  if "://" in picked[0]:  # A request per file: many at a time.
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
      stats = [(stat.length, stat.mtime)
               for stat in pool.map(lambda path: epath.Path(path).stat(), picked)]
  else:  # In nanoseconds, which epath's stat rounds to seconds.
    stats = [(stat.st_size, stat.st_mtime_ns) for stat in map(os.stat, picked)]
  digest = hashlib.sha256()
  digest.update("\n".join(path[start:] for path in paths).encode())
  digest.update(repr(stats).encode())
  return f"{len(paths)} files {digest.hexdigest()[:24]}"


def train_val_split(labels: np.ndarray, val_size: int = VAL5K_SIZE, seed: int = VAL5K_SEED):
  """The paper's 45k/5k split (section 4.2) of a training set: returns sorted (train_ids, val_ids).

  Stratified: examples are grouped by class in a seeded random order and every (N/val_size)-th
  one goes to validation, so each class gives the same share (500 per CIFAR-10 class).
  """
  order = np.random.default_rng(seed).permutation(len(labels))
  order = order[np.argsort(labels[order], kind="stable")]
  picks = np.floor(np.arange(val_size) * len(labels) / val_size).astype(np.int64)
  val_ids = np.sort(order[picks])
  train_ids = np.setdiff1d(np.arange(len(labels)), val_ids)
  return train_ids, val_ids


def _derived_split(split: str) -> tuple[str, int] | None:
  """`train45k` / `val5k` are carved out of `train`: returns (base split, part index)."""
  return {"train45k": ("train", 0), "val5k": ("train", 1)}.get(split)


# ----------------------------------------------------------------------------- image folders


def absolute(path: epath.PathLike) -> epath.Path:
  """`path` as an epath.Path; a relative local path made absolute (a URI already is)."""
  path = epath.Path(path)
  # epath's resolve() would prefix the working directory to a URI like gs://bucket/x.
  return path if "://" in str(path) else path.resolve()


def folder_classes(root: epath.PathLike) -> list[str]:
  """Class names (sorted sub-folders of root/train, or of the first split found)."""
  root = epath.Path(root)
  if not root.is_dir():
    raise DatasetNotFoundError(
        f"image folder {root} does not exist; expected the layout {root}/<split>/<class>/<image>")
  splits = sorted(p for p in root.iterdir() if p.is_dir())
  base = root / "train" if (root / "train").is_dir() else (splits[0] if splits else None)
  if base is None:
    raise DatasetNotFoundError(f"image folder {root} has no split folders; expected {root}/<split>/<class>/<image>")
  return sorted(p.name for p in base.iterdir() if p.is_dir())


def folder_records(root: epath.PathLike, split: str) -> Records:
  """Lists root/<split>/<class>/<image> without decoding; labels index `folder_classes(root)`."""
  derived = _derived_split(split)
  if derived:
    base = folder_records(root, derived[0])
    return base.subset(train_val_split(base.labels)[derived[1]])
  root = epath.Path(root)
  split_dir = root / split
  if not split_dir.is_dir():
    available = sorted(p.name for p in root.iterdir() if p.is_dir())
    raise DatasetNotFoundError(
        f"image folder {root} has no split {split!r} (found {available}); set dataset.train_split "
        "and dataset.eval_split to folder names, or 'train45k'/'val5k' to carve them from 'train'")
  classes = folder_classes(root)
  logging.info("Listing the images of %d classes under %s", len(classes), split_dir)
  paths, labels = [], []
  for label, name in enumerate(classes):
    class_dir = split_dir / name
    if not class_dir.is_dir():
      continue
    files = sorted(str(p) for p in class_dir.iterdir() if p.name.lower().endswith(IMAGE_EXTENSIONS))
    paths.extend(files)
    labels.extend([label] * len(files))
  if not paths:
    raise DatasetNotFoundError(f"no {'/'.join(IMAGE_EXTENSIONS)} images under {split_dir}/<class>/")
  logging.info("Found %d images under %s", len(paths), split_dir)
  return Records(labels=np.asarray(labels, np.int32), paths=np.asarray(paths))


# ----------------------------------------------------------------------------- TFDS


def tfds_builder(name: str, data_dir: str | None) -> Any:
  """The TFDS builder of a prepared dataset; `DatasetNotFoundError` otherwise (never downloads)."""
  tfds = tensorflow_datasets()
  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    manual = (f" (imagenet2012 is prepared from the ILSVRC2012 tar files placed in "
              f"{epath.Path(builder.data_dir).parents[1]}/downloads/manual)"
              if name == "imagenet2012" else "")
    raise DatasetNotFoundError(
        f"TFDS dataset {name!r} is not prepared in {builder.data_dir} "
        f"(dataset.data_dir={data_dir!r}), and this pipeline never downloads. Fix it by one of: "
        f"(1) preparing it: `python -m resnet_jax.tools.prepare {name} --data_dir=<dir>`{manual}; "
        f"(2) pointing dataset.data_dir at a directory where it is prepared; "
        f"(3) using dataset.name='image_folder' with dataset.data_dir=<root>/<split>/<class>/<image>.")
  return builder


def tfds_split(name: str, data_dir: str | None, split: str) -> tuple[str, int, tuple]:
  """(identity, size, image shape) of a prepared TFDS split, from its metadata alone (no record
  read): the identity names its data (dataset, version, folder, split and size); the shape has
  None for a side whose images differ."""
  builder = tfds_builder(name, data_dir)
  derived = _derived_split(split)
  size = builder.info.splits[derived[0] if derived else split].num_examples
  if derived:
    size = VAL5K_SIZE if derived[1] else size - VAL5K_SIZE
  identity = f"TFDS {name} {builder.info.version} {split} of {size} in {builder.data_dir}"
  return identity, size, tuple(builder.info.features["image"].shape)


def tfds_records(name: str, data_dir: str | None, split: str) -> Records:
  """Encoded images and labels of a small TFDS split, read without decoding."""
  derived = _derived_split(split)
  if derived:
    base = tfds_records(name, data_dir, derived[0])
    return dataclasses.replace(base.subset(train_val_split(base.labels)[derived[1]]),
                               identity=tfds_split(name, data_dir, split)[0])
  tfds = tensorflow_datasets()
  builder = tfds_builder(name, data_dir)
  identity = tfds_split(name, data_dir, split)[0]
  logging.info("Reading the %d encoded images of TFDS %s:%s from %s",
               builder.info.splits[split].num_examples, name, split, builder.data_dir)
  decoders = {"image": tfds.decode.SkipDecoding()}
  if builder.info.file_format.value == "array_record":  # as_dataset reads tfrecord only.
    examples = list(builder.as_data_source(split=split, decoders=decoders))
    return Records(labels=np.asarray([example["label"] for example in examples], np.int32),
                   encoded=np.asarray([example["image"] for example in examples], object),
                   identity=identity)
  dataset = builder.as_dataset(split=split, batch_size=-1, shuffle_files=False, decoders=decoders)
  arrays = tfds.as_numpy(dataset)
  return Records(labels=arrays["label"].astype(np.int32), encoded=arrays["image"],
                 identity=identity)


def tfds_random_access(name: str, data_dir: str | None, split: str) -> Records:
  """A large TFDS split as a random-access source (needs the array_record file format).

  Opening it reads the split's metadata, never its records: start-up costs the same for
  ImageNet's 140 GB as for a tiny split. Each label is read with its image, when fetched.
  """
  tfds = tensorflow_datasets()
  builder = tfds_builder(name, data_dir)
  formats = {str(builder.info.file_format)} | {str(f) for f in builder.info.alternative_file_formats}
  if not any("array_record" in f.lower() for f in formats):
    raise DatasetNotFoundError(
        f"TFDS dataset {name!r} in {builder.data_dir} is stored as {sorted(formats)}; the streaming "
        "pipeline reads examples by index (resumable, step-indexed) and needs array_record. Fix: "
        f"prepare it again into another data_dir with `python -m resnet_jax.tools.prepare {name} "
        "--data_dir=<dir> --file_format=array_record`, or use an image folder.")
  source = builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()},
                                  file_format="array_record")
  logging.info("Opened TFDS %s:%s in %s for random access: %d examples", name, split,
               builder.data_dir, len(source))
  return Records(data_source=source, identity=tfds_split(name, data_dir, split)[0])
