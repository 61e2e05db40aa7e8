"""Table 2 / Fig. 4 (right): ResNet-18 with shortcut option A, as the paper's plain-vs-residual comparison."""
from . import imagenet_base


def get_config(arg=None):
  config = imagenet_base.get_config("resnet18", arg)
  config.model_overrides.shortcut = "A"
  return config
