"""Table 6: CIFAR-10 ResNet-110, with the 0.01 warm-up of Sec. 4.2."""
from . import cifar_base


def get_config(arg=None):
  config = cifar_base.get_config("cifar_resnet110", arg)
  # Sec. 4.2: 0.01 until the training error is below 80% (about 400 iterations).
  config.warmup_learning_rate = 0.01
  return config
