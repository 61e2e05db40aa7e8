"""Table 6: CIFAR-10 ResNet-1202 (option A)."""
from . import cifar_base


def get_config(arg=None):
  config = cifar_base.get_config("cifar_resnet1202", arg)
  # Sec. 4.2 trains it "as described above"; we keep ResNet-110's warm-up for it.
  config.warmup_learning_rate = 0.01
  return config
