"""Dataset config (`config.dataset`): its fields, each documented at its default in
`default_config`, and their validation (`resolve`)."""
import ml_collections

DATASETS = ("cifar10", "cifar100", "imagenet2012", "image_folder", "synthetic")
# What the pipelines subtract: the paper's per-pixel mean image of the training set (Secs. 3.4,
# 4.2), its channel means, which most later ImageNet recipes use with scale augmentation, or
# nothing: raw pixels in [0, 255], for weights that bring their own preprocessing.
MEANS = ("per_pixel", "per_channel", "none")
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet2012": 1000}


def default_config(name: str = "cifar10") -> ml_collections.ConfigDict:
  """Defaults for dataset `name`; trainer configs override only what differs."""
  _check_name(name)
  imagenet_like = name == "imagenet2012"
  config = ml_collections.ConfigDict()
  # One of DATASETS: "cifar10" | "cifar100" | "imagenet2012" | "image_folder" | "synthetic".
  # Synthetic datasets say so: `info.synthetic` is True and `info.name` reads like
  # "synthetic(32x32x3,10 classes)".
  config.name = name
  # TFDS data_dir (None: TFDS's default), or the image folder root laid out
  # <root>/<split>/<class>/<image> (classes sorted by name give the labels); a local path or a
  # URI that etils.epath and tf.io.gfile read (gs://...). Nothing is ever downloaded: a missing
  # TFDS dataset raises `DatasetNotFoundError` saying how to fix it; an image that does not
  # decode raises `CorruptImageError` naming it. The first training image's size picks the
  # pipeline: up to 64 pixels a side (and 4 GiB of images per device) the folder is held on the
  # devices, and every image of both splits must have that size, else `ImageSizeError` stops
  # the run at start-up naming the first odd image and its size; larger images stream, and may
  # differ in size.
  config.data_dir = ml_collections.config_dict.placeholder(str)
  # "train", or "train45k" (paper section 4.2: the training set minus a fixed, stratified 5k;
  # image folders too); for image folders any split folder name.
  config.train_split = "train"
  # "test" / "validation" (ImageNet), or "val5k" (the 5k held out of "train45k").
  config.eval_split = "validation" if imagenet_like else "test"
  # Sampling and augmentation seed; a run's batches are a pure function of (seed, step).
  # None: the trainer's run seed (`config.seed`, which also initialises the model), else 0.
  config.seed = ml_collections.config_dict.placeholder(int)
  # Side of synthetic images (> 64 streams them like ImageNet). Real data keeps its own size:
  # CIFAR-sized images as they are, larger ones cropped to 224 (section 3.4).
  config.image_size = 224 if imagenet_like else 32
  # The class count of synthetic data and image folders (a folder may hold fewer class
  # folders, never more). TFDS datasets have their own.
  config.num_classes = NUM_CLASSES.get(name, 10)
  # Synthetic split sizes.
  config.synthetic_train_size = 50_000
  config.synthetic_eval_size = 10_000
  # Training augmentation (CIFAR: pad 4 + random crop + flip; ImageNet: scale augmentation +
  # 224 crop + flip + PCA lighting). Evaluation is never augmented.
  config.augment = True
  # Where the per-pixel mean and the evaluation images' sizes are cached, local or gs://
  # (default $RESNET_JAX_CACHE_DIR, else ~/.cache/resnet_jax), each under what it was computed
  # from: an image folder's file names, sizes and modification times, a TFDS split's name,
  # version, folder and size, and the image size; a file that is unreadable or of another shape
  # is computed again, with a WARNING naming it.
  config.cache_dir = ml_collections.config_dict.placeholder(str)
  # One of MEANS: "per_pixel" (the paper: the training split's mean image, CIFAR's over every
  # image, ImageNet's the mean 224 centre view of up to 50,000 images, resized to views of other
  # sizes; computed once and cached), "per_channel" (that image's channel means) or "none"
  # (nothing subtracted: pixels in [0, 255], no training image read; the evaluator gives such
  # pixels to weights trained elsewhere, which carry their own `pretrained.Preprocessing`).
  config.mean = "per_pixel"
  return config


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` completed with the defaults of its dataset; a clear ValueError when it is invalid."""
  name = config.get("name")
  _check_name(name)
  full = default_config(name)
  unknown = sorted(set(config.keys()) - set(full.keys()))
  if unknown:
    raise ValueError(f"unknown dataset config field(s) {unknown}; valid fields: {sorted(full.keys())}")
  for key in config.keys():
    full[key] = config[key]
  if full.seed is None:
    full.seed = 0
  if name in ("cifar10", "cifar100") and full.train_split not in ("train", "train45k"):
    raise ValueError(f"dataset.train_split for {name} must be 'train' or 'train45k', got {full.train_split!r}")
  if name in ("cifar10", "cifar100") and full.eval_split not in ("test", "val5k"):
    raise ValueError(f"dataset.eval_split for {name} must be 'test' or 'val5k', got {full.eval_split!r}")
  if (full.train_split == "train45k") != (full.eval_split == "val5k") and name != "synthetic":
    raise ValueError("train45k and val5k go together (the paper's 45k/5k split of the training set); "
                     f"got train_split={full.train_split!r}, eval_split={full.eval_split!r}")
  if full.mean not in MEANS:
    raise ValueError(f"dataset.mean must be one of {', '.join(MEANS)}, got {full.mean!r}")
  if name == "image_folder" and not full.data_dir:
    raise ValueError("dataset.data_dir must name the image folder root (<root>/<split>/<class>/<image>)")
  for field in ("image_size", "num_classes", "synthetic_train_size", "synthetic_eval_size"):
    if full[field] <= 0:
      raise ValueError(f"dataset.{field} must be positive, got {full[field]}")
  return full


def num_classes(config: ml_collections.ConfigDict) -> int:
  """The class count of the dataset `config` names, known without reading it: a TFDS dataset's
  own, else `config.num_classes` (synthetic data, image folders)."""
  return NUM_CLASSES.get(config.name, config.num_classes)


def _check_name(name) -> None:
  if name not in DATASETS:
    raise ValueError(f"unknown dataset name {name!r}; valid names: {', '.join(DATASETS)}")
