"""Writes the files TFDS's builders read, from local images, so they can prepare TFDS datasets
offline: the CIFAR binary version (what `cifar-10-binary.tar.gz` / `cifar-100-binary.tar.gz`
hold) from an image folder, and ILSVRC2012-shaped tar files of generated images.

    folder = write_cifar_binaries("cifar10-jpeg", "manual", dataset="cifar10")
    # manual/cifar-10-batches-bin/: data_batch_1..5.bin, test_batch.bin, batches.meta.txt
    files = write_ilsvrc2012_tars("manual", num_classes=10, train_per_class=4, val_images=10)
    # manual/ILSVRC2012_img_train.tar, manual/ILSVRC2012_img_val.tar

Then `python -m resnet_jax.tools.prepare <dataset> --manual_dir=manual --data_dir=DIR` runs TFDS's
own builder on them. TensorFlow (decoding and encoding JPEGs) is imported only when called.
"""
import dataclasses
import importlib.resources
import io
import tarfile
from typing import Sequence

import numpy as np
from etils import epath

from resnet_jax.data import decoding, sources

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab",
    "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox", "girl",
    "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion", "lizard",
    "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree",
    "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain",
    "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose",
    "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone",
    "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale",
    "willow_tree", "wolf", "woman", "worm")
CIFAR100_SUPERCLASSES = (
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes",
    "large_omnivores_and_herbivores", "medium_mammals", "non-insect_invertebrates", "people",
    "reptiles", "small_mammals", "trees", "vehicles_1", "vehicles_2")
# The superclass (coarse label) of each CIFAR-100 class, in CIFAR100_CLASSES order.
CIFAR100_SUPERCLASS_OF = (
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11, 6, 11, 5, 10, 7, 6, 13, 15,
    3, 15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5, 5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4,
    2, 0, 17, 4, 18, 17, 10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13,
    16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13)

# (folder inside the archive, classes, training files, test files) of each binary version.
CIFAR_LAYOUTS = {
    "cifar10": ("cifar-10-batches-bin", CIFAR10_CLASSES,
                tuple(f"data_batch_{i}.bin" for i in range(1, 6)), ("test_batch.bin",)),
    "cifar100": ("cifar-100-binary", CIFAR100_CLASSES, ("train.bin",), ("test.bin",)),
}


def cifar_record_size(dataset: str) -> int:
  """Bytes per image in the binary version: the label byte(s), then 3072 bytes of R, G, B planes."""
  return (1 if dataset == "cifar10" else 2) + 32 * 32 * 3


def write_cifar_binaries(image_root: epath.PathLike, out_dir: epath.PathLike,
                         dataset: str = "cifar10") -> epath.Path:
  """Writes `image_root/{train,test}/<class>/<image>` as the CIFAR binary version; returns the
  folder written: `out_dir/cifar-10-batches-bin` or `out_dir/cifar-100-binary`.

  Class folders are named as the official classes (`CIFAR10_CLASSES`, `CIFAR100_CLASSES`; a
  split may lack some) and images are 32x32. Examples keep the folder's order (classes by name,
  files by name); CIFAR-10's training set is cut into five batch files of near-equal size.
  CIFAR-100 records carry the official superclass of each class as their coarse label.
  """
  if dataset not in CIFAR_LAYOUTS:
    raise ValueError(f"dataset must be one of {sorted(CIFAR_LAYOUTS)}, got {dataset!r}")
  folder_name, classes, train_files, test_files = CIFAR_LAYOUTS[dataset]
  folder = epath.Path(out_dir) / folder_name
  folder.mkdir(parents=True, exist_ok=True)
  found = sources.folder_classes(image_root)
  unknown = sorted(set(found) - set(classes))
  if unknown:
    raise ValueError(f"{image_root} has class folders {unknown} that are not {dataset} classes")
  for split, files in (("train", train_files), ("test", test_files)):
    records = sources.folder_records(image_root, split)
    images = decoding.decode_all(records, np.arange(len(records)))
    if images.shape[1:] != (32, 32, 3):
      raise ValueError(f"{image_root}/{split} holds {images.shape[1]}x{images.shape[2]} images; "
                       "CIFAR images are 32x32")
    labels = np.asarray([classes.index(found[label]) for label in records.labels], np.uint8)
    if dataset == "cifar100":
      labels = np.stack([np.asarray(CIFAR100_SUPERCLASS_OF, np.uint8)[labels], labels], axis=1)
    planes = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    rows = np.concatenate([labels.reshape(len(images), -1), planes], axis=1)
    for name, part in zip(files, np.array_split(rows, len(files))):
      (folder / name).write_bytes(part.tobytes())
  if dataset == "cifar10":
    (folder / "batches.meta.txt").write_text("\n".join(classes) + "\n")
  else:
    (folder / "coarse_label_names.txt").write_text("\n".join(CIFAR100_SUPERCLASSES) + "\n")
    (folder / "fine_label_names.txt").write_text("\n".join(classes) + "\n")
  return folder


@dataclasses.dataclass(frozen=True)
class IlsvrcFiles:
  """What `write_ilsvrc2012_tars` wrote."""
  train_tar: epath.Path
  val_tar: epath.Path
  synsets: tuple[str, ...]  # the training classes, each with `train_per_class` images
  val_synsets: tuple[str, ...]  # the class of each validation image, in file-name order


def imagenet_validation_synsets() -> list[str]:
  """The synset of each ILSVRC2012 validation image in file-name order, as TFDS ships it."""
  labels = (importlib.resources.files("tensorflow_datasets") /
            "datasets/imagenet2012/validation_labels.txt")
  return labels.read_text().split()


def write_ilsvrc2012_tars(manual_dir: epath.PathLike, num_classes: int = 10,
                          train_per_class: int = 4, val_images: int = 10, image_size: int = 80,
                          seed: int = 0) -> IlsvrcFiles:
  """Writes ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar of generated JPEGs, laid out as
  the originals, for TFDS's imagenet2012 builder (which reads them from its manual_dir).

  The train tar holds one `<synset>.tar` per class of `<synset>_<k>.JPEG` images; the val tar
  holds `ILSVRC2012_val_<8 digits>.JPEG`, to which TFDS gives the labels of its bundled
  validation label file in file-name order. So the classes are the first `num_classes` distinct
  synsets of that file, and each validation image is drawn as its class there: `val_images` can be
  at most the length of the file's prefix that uses only those classes (10 for 10 classes).
  Images are `image_size` pixels high and up to 1.5x as wide; each class has its own colour, so a
  network can learn them. The same arguments write the same bytes.
  """
  tf = sources.tensorflow()
  val_labels = imagenet_validation_synsets()
  synsets: list[str] = []
  for synset in val_labels:
    if synset not in synsets and len(synsets) < num_classes:
      synsets.append(synset)
  usable = next((i for i, synset in enumerate(val_labels) if synset not in synsets),
                len(val_labels))
  if not 1 <= num_classes <= 1000 or not 0 <= val_images <= usable:
    raise ValueError(f"num_classes must be in [1, 1000] and val_images in [0, {usable}] "
                     f"(for {num_classes} classes), got {num_classes} and {val_images}")
  rng = np.random.default_rng(seed)
  colours = rng.uniform(40, 215, size=(num_classes, 3))

  def jpeg(synset: str) -> bytes:
    width = int(rng.integers(image_size, image_size * 3 // 2 + 1))
    ramp = np.linspace(-30, 30, width)[None, :, None]
    noise = rng.normal(0, 12, size=(image_size, width, 3))
    pixels = np.clip(colours[synsets.index(synset)] + ramp + noise, 0, 255).astype(np.uint8)
    return tf.io.encode_jpeg(pixels, quality=90).numpy()

  manual_dir = epath.Path(manual_dir)
  manual_dir.mkdir(parents=True, exist_ok=True)
  train_tar = manual_dir / "ILSVRC2012_img_train.tar"
  with train_tar.open("wb") as file, tarfile.open(fileobj=file, mode="w") as outer:
    for synset in synsets:
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode="w") as archive:
        _add(archive, [(f"{synset}_{k}.JPEG", jpeg(synset)) for k in range(train_per_class)])
      _add(outer, [(f"{synset}.tar", inner.getvalue())])
  val_tar = manual_dir / "ILSVRC2012_img_val.tar"
  with val_tar.open("wb") as file, tarfile.open(fileobj=file, mode="w") as archive:
    _add(archive, [(f"ILSVRC2012_val_{i + 1:08d}.JPEG", jpeg(synset))
                   for i, synset in enumerate(val_labels[:val_images])])
  return IlsvrcFiles(train_tar, val_tar, tuple(synsets), tuple(val_labels[:val_images]))


def _add(archive: tarfile.TarFile, members: Sequence[tuple[str, bytes]]) -> None:
  for name, contents in members:
    info = tarfile.TarInfo(name)
    info.size = len(contents)
    archive.addfile(info, io.BytesIO(contents))
