"""Table 6: CIFAR-10 ResNet-32 (option A)."""
from . import cifar_base


def get_config(arg=None):
  config = cifar_base.get_config("cifar_resnet32", arg)
  return config
