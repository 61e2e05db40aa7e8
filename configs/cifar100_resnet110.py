"""CIFAR-100 ResNet-110: the CIFAR-10 recipe of Table 6 (Sec. 4.2) on CIFAR-100's 100 classes.

The paper reports no CIFAR-100 result; this is the recipe its successors use there.
"""
from resnet_jax.data import config as data_config

from . import cifar_resnet110, common


def get_config(arg=None):
  config = cifar_resnet110.get_config()
  config.dataset = data_config.default_config("cifar100")
  return common.apply_args(config, arg)
