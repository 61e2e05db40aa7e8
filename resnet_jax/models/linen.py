"""Our NNX networks as Flax Linen modules, for Linen code bases.

    backbone = resnet_jax.models.linen.to_linen("cifar_resnet20", num_classes=10)
    variables = backbone.init(key, x, train=False)   # {"params", "batch_stats"}
    logits, updates = backbone.apply(variables, x, train=True, mutable=["batch_stats"])
    logits = backbone.apply(variables, x, train=False)

The variables nest like `nnx.state(model)` (list entries under int keys), so
`nnx.to_pure_dict(nnx.state(model, nnx.Param))` is a valid "params" collection.
"""

from __future__ import annotations

import functools

from flax import linen, nnx
from flax.core import FrozenDict

from resnet_jax import models


def _forward(model: models.ResNet, x, train: bool):
  # The bridge rebuilds the NNX module on every call, so set the mode each time.
  if train:
    model.train()
  else:
    model.eval()
  return model(x)


class ResNet(nnx.bridge.ToLinen):
  """`nnx.bridge.ToLinen` with the batch-norm mode as a `train` argument."""

  @linen.compact
  def __call__(self, x, *, train: bool):
    return super().__call__(x, train, nnx_method=_forward)


def to_linen(name: str, **kwargs) -> ResNet:
  """`models.create(name, **kwargs)` as a Linen module called as `(x, *, train)`."""
  return ResNet(functools.partial(models.create, name), kwargs=FrozenDict(kwargs))
