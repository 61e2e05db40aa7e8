"""Fields every run has, and the config arguments (`--config=cifar_resnet20:smoke`)."""
import ml_collections

from resnet_jax.data import config as data_config

# Config arguments, comma separated after the colon of --config.
ARGS = ("smoke",)


def base(dataset: str) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = ""
  # Keyword overrides of resnet_jax.models.create (None: the family's default).
  config.model_overrides = ml_collections.ConfigDict({
      "shortcut": ml_collections.config_dict.placeholder(str), "stride_on_1x1": True,
      "preact": False, "zero_init_last_bn": False})
  config.dataset = data_config.default_config(dataset)
  config.seed = 0
  # SGD with momentum 0.9 and weight decay 1e-4 (Sec. 3.4); see resnet_jax/training/optim.py.
  config.momentum = 0.9
  config.weight_decay = 1e-4
  config.weight_decay_batch_norm = True  # Decay BN scales and shifts too (see optim.py).
  config.learning_rate = 0.1
  config.lr_decay = 0.1
  config.lr_schedule = "piecewise"
  config.lr_boundaries = ()
  config.warmup_learning_rate = 0.0  # 0: no warm-up.
  config.warmup_until_train_error = 0.8
  config.warmup_window = 100  # Iterations whose mean training error ends the warm-up.
  # Gradual warm-up (Goyal et al., 2017): linear from lr_warmup_from at iteration 0 to
  # learning_rate at lr_warmup_steps (0: none). Not the ResNet-110 warm-up above.
  config.lr_warmup_steps = 0
  config.lr_warmup_from = 0.0
  config.plateau_patience = 0
  config.plateau_accumulation_steps = 0
  # Images per batch norm group in training (resnet_jax.models.BatchNorm): each group of that
  # many consecutive images of the global batch is normalised by its own statistics, as each
  # GPU of the paper's runs normalised its own images. 0: the whole global batch.
  config.batch_norm_group = 0
  config.dtype = ml_collections.config_dict.placeholder(str)  # None: bfloat16 on TPU, else float32.
  config.eval_protocol = "center"
  config.log_every_steps = 100
  config.keep_checkpoints = 3
  return config


def apply_args(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """`smoke`: a 20-step run of batch 32 (batch norm groups of at most 16) on small synthetic
  data that needs no dataset and no network."""
  for option in filter(None, (arg or "").split(",")):
    if option not in ARGS:
      raise ValueError(f"unknown config argument {option!r}; valid: {', '.join(ARGS)}")
    if option == "smoke":
      num_classes = config.dataset.num_classes
      config.dataset = data_config.default_config("synthetic")
      config.dataset.update(num_classes=num_classes, image_size=32, synthetic_train_size=512,
                            synthetic_eval_size=200)
      config.batch_size = 32
      # Groups of 16, two to the batch as the paper's CIFAR batch on two GPUs (or none, as
      # the config): the configs' 64 or 32 would leave no or one group.
      config.batch_norm_group = min(config.batch_norm_group, 16)
      config.eval_batch_size = 64
      config.num_train_steps = 20
      config.lr_boundaries = (10, 15) if config.lr_schedule == "piecewise" else ()
      config.lr_warmup_steps = min(config.lr_warmup_steps, 5)
      config.plateau_accumulation_steps = min(config.plateau_accumulation_steps, 5)
      config.log_every_steps = config.eval_every_steps = config.checkpoint_every_steps = 10
  return config
