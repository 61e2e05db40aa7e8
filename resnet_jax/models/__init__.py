"""The library: the paper's networks as Flax NNX modules, and what works on them.

`resnet_jax.models` itself is `models.resnet` (the networks: `create`, `ResNet`, the blocks);
beside it are `cpu_kernels` (faster CPU layers for training), `pretrained` (torchvision,
Keras and akamaster's CIFAR weights), `linen` (a Linen bridge) and `analysis` (layer
responses, multiply-accumulates).
None of them imports TensorFlow or the trainer.
"""

from resnet_jax.models.resnet import (CIFAR_DEPTHS, IMAGENET_DEPTHS, NAMES, SHORTCUTS, BatchNorm,
                                      Block, FeatureInfo, Layer, PostActivationBlock,
                                      PreActivationBlock, ResNet, basic, bottleneck, count_params,
                                      create, he_normal, padding)

__all__ = ["CIFAR_DEPTHS", "IMAGENET_DEPTHS", "NAMES", "SHORTCUTS", "BatchNorm", "Block", "FeatureInfo", "Layer", "PostActivationBlock", "PreActivationBlock", "ResNet", "basic", "bottleneck", "count_params", "create", "he_normal", "padding"]
