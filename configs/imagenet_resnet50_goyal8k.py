"""Goyal et al., 2017, "Accurate, Large Minibatch SGD": ResNet-50 at batch 8,192 on a pod slice.

Their recipe for a minibatch of kn = 8k (k = 256 workers of n = 32), Table 1's "gradual
warmup" row: the learning rate scaled linearly with the batch, 0.1 x 8192 / 256 = 3.2
(Sec. 2.1), reached by a gradual warm-up from 0.1 over the first 5 epochs (Sec. 2.2, 5.2);
divided by 10 at epochs 30, 60 and 80 of 90 (Sec. 5.1); batch norm over the 32 images
of each worker (Sec. 2.3); each residual block's last BN scale initialised to zero; weight
decay 1e-4, not on the BN scales and shifts; momentum 0.9; the ResNet-50 of their [12]
(fb.resnet.torch), with the stride on the 3x3 conv (all Sec. 5.1). Epochs are counted in
iterations of 8,192 of ImageNet's 1,281,167 training images (about 156.4 an epoch),
rounded to the nearest: warm-up 782, drops at 4,692, 9,384 and 12,511, end at 14,075.

Not theirs: standard momentum for their Nesterov momentum ("standard momentum as was
used in [16] is equally effective", Sec. 5.1); the paper's scale augmentation and
per-pixel mean (imagenet_base, Sec. 3.4) for their scale and aspect-ratio augmentation
and per-colour normalisation; flax's default classifier initialisation for their
N(0, 0.01). They report 23.74 +- 0.09% top-1 validation error (single 224 centre crop;
mean and std of 5 runs, each the median of its last 5 epochs), against 23.60 +- 0.12%
at batch 256.
"""
import ml_collections

from . import common, imagenet_base

IMAGENET_TRAIN_IMAGES = 1_281_167
BATCH_SIZE = 8_192


def iterations(epochs: float) -> int:
  """Iterations of `BATCH_SIZE` images in `epochs` passes over the ImageNet training split."""
  return round(epochs * IMAGENET_TRAIN_IMAGES / BATCH_SIZE)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = imagenet_base.get_config("resnet50")
  config.batch_size = BATCH_SIZE
  # Sec. 2.1 and 5.1: 0.1 per 256 images, linear in the batch.
  config.learning_rate = 0.1 * BATCH_SIZE / 256
  # Sec. 2.2: "start from a learning rate of eta and increment it by a constant amount at each
  # iteration such that it reaches eta-hat = k eta after 5 epochs".
  config.lr_warmup_steps = iterations(5)
  config.lr_warmup_from = 0.1
  # Sec. 5.1: divided by 10 "at the 30-th, 60-th, and 80-th epoch"; "90 epochs".
  config.lr_schedule = "piecewise"
  config.lr_boundaries = tuple(iterations(epoch) for epoch in (30, 60, 80))
  config.num_train_steps = iterations(90)
  # Sec. 2.3 and 5.1: "we use n = 32 throughout, regardless of the overall minibatch size".
  config.batch_norm_group = 32
  # Sec. 5.1: "we do not apply weight decay on the learnable BN coefficients".
  config.weight_decay_batch_norm = False
  # Sec. 5.1: gamma "initialized to be 0" in "each residual block's last BN"; the stride-2
  # convolutions "on 3x3 layers instead of on 1x1 layers as in [16]".
  config.model_overrides.zero_init_last_bn = True
  config.model_overrides.stride_on_1x1 = False
  config.eval_every_steps = config.checkpoint_every_steps = iterations(1)
  config.eval_batch_size = BATCH_SIZE  # 32 a chip on 256; a power of two divides any slice.
  return common.apply_args(config, arg)
