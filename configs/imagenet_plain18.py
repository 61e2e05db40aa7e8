"""Table 2 / Fig. 4 (left): the plain 18-layer ImageNet net."""
from . import imagenet_base


def get_config(arg=None):
  return imagenet_base.get_config("plain18", arg)
