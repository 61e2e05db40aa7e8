"""Dataset config defaults and validation (fields documented in `resnet_jax/data/__init__.py`)."""
import ml_collections

DATASETS = ("cifar10", "cifar100", "imagenet2012", "image_folder", "synthetic")
# What the pipelines subtract: the paper's per-pixel mean image of the training set (Secs. 3.4,
# 4.2), or its channel means, which most later ImageNet recipes use with scale augmentation.
MEANS = ("per_pixel", "per_channel")
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet2012": 1000}


def default_config(name: str = "cifar10") -> ml_collections.ConfigDict:
  """Defaults for dataset `name`; trainer configs override only what differs."""
  _check_name(name)
  imagenet_like = name == "imagenet2012"
  config = ml_collections.ConfigDict()
  config.name = name
  config.data_dir = ml_collections.config_dict.placeholder(str)
  config.train_split = "train"
  config.eval_split = "validation" if imagenet_like else "test"
  config.seed = ml_collections.config_dict.placeholder(int)  # None: the run's seed, else 0.
  config.image_size = 224 if imagenet_like else 32
  config.num_classes = NUM_CLASSES.get(name, 10)
  config.synthetic_train_size = 50_000
  config.synthetic_eval_size = 10_000
  config.augment = True
  config.cache_dir = ml_collections.config_dict.placeholder(str)
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


def _check_name(name) -> None:
  if name not in DATASETS:
    raise ValueError(f"unknown dataset name {name!r}; valid names: {', '.join(DATASETS)}")
