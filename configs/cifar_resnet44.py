"""Table 6: CIFAR-10 ResNet-44 (option A)."""
from . import cifar_base


def get_config(arg=None):
  config = cifar_base.get_config("cifar_resnet44", arg)
  return config
