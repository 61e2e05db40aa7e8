"""Fig. 6 (left): the plain 20-layer CIFAR-10 net, no shortcuts."""
from . import cifar_base


def get_config(arg=None):
  return cifar_base.get_config("cifar_plain20", arg)
