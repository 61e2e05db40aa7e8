"""Tables 2-4: ImageNet ResNet-18 (option B)."""
from . import imagenet_base


def get_config(arg=None):
  return imagenet_base.get_config("resnet18", arg)
