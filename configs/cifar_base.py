"""The paper's CIFAR-10 recipe (Sec. 4.2).

Batch 128, learning rate 0.1 divided by 10 at 32k and 48k iterations, stop at
64k; weight decay 1e-4, momentum 0.9; trained on the 50k training images with
the simple augmentation (pad 4, random 32x32 crop, flip) and tested on the 10k
test images. Shortcut option A for residual nets. Batch norm over groups of 64 images:
the paper's batch of 128 ran "on two GPUs" (Sec. 4.2), whose Caffe batch norm
normalised each GPU's 64 images apart.
"""
import ml_collections

from . import common


def get_config(model: str, arg: str | None = None) -> ml_collections.ConfigDict:
  config = common.base("cifar10")
  config.model = model
  config.batch_size = 128
  config.num_train_steps = 64_000
  # Sec. 4.2: the batch of 128 on two GPUs, each normalising its own 64 images.
  config.batch_norm_group = 64
  config.lr_boundaries = (32_000, 48_000)
  config.eval_every_steps = 2_000
  config.eval_batch_size = 1_024  # A power of two divides across any TPU slice.
  config.checkpoint_every_steps = 2_000
  return common.apply_args(config, arg)
