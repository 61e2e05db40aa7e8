"""Fig. 6 (left): the plain 32-layer CIFAR-10 net, no shortcuts."""
from . import cifar_base


def get_config(arg=None):
  return cifar_base.get_config("cifar_plain32", arg)
