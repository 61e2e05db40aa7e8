"""Table 3: ResNet-34 with shortcut option A (Sec. 3.3)."""
from . import imagenet_base


def get_config(arg=None):
  config = imagenet_base.get_config("resnet34", arg)
  config.model_overrides.shortcut = "A"
  return config
