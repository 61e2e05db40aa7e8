"""The paper's ImageNet recipe (Sec. 3.4).

Batch 256, learning rate 0.1 divided by 10 when the error plateaus, up to
600k iterations; weight decay 1e-4, momentum 0.9; scale augmentation (shorter
side in [256, 480]), 224 crops, flips, per-pixel mean and colour augmentation.
Shortcut option B. The plateau test averages the training loss over 5,000
iterations (about one epoch) and waits 5 of those before dividing. Batch norm over
groups of 32 images: the batch of 256 on 8 GPUs of 32 each, the paper's setting as
Goyal et al. (2017, Sec. 5.1) reproduce it, and their 32 per worker at any batch
(Sec. 2.3).
"""
import ml_collections

from . import common


def get_config(model: str, arg: str | None = None) -> ml_collections.ConfigDict:
  config = common.base("imagenet2012")
  config.model = model
  config.batch_size = 256
  config.num_train_steps = 600_000
  # 32 images per GPU (Goyal et al., 2017, Sec. 5.1: "k = 8 (8 GPUs in one server) and n = 32
  # images per worker ... as in [He et al.]"; "n = 32 throughout, regardless of the overall
  # minibatch size"), whatever the global batch.
  config.batch_norm_group = 32
  config.lr_schedule = "plateau"
  config.plateau_accumulation_steps = 5_000
  config.plateau_patience = 5
  config.eval_every_steps = 10_000
  config.eval_batch_size = 256
  config.checkpoint_every_steps = 5_000
  return common.apply_args(config, arg)
