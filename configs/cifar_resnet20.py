"""Table 6: CIFAR-10 ResNet-20 (option A)."""
from . import cifar_base


def get_config(arg=None):
  config = cifar_base.get_config("cifar_resnet20", arg)
  return config
