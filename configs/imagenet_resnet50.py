"""Tables 2-4: ImageNet ResNet-50 (option B)."""
from . import imagenet_base


def get_config(arg=None):
  return imagenet_base.get_config("resnet50", arg)
