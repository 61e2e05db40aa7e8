"""Analyses of networks: layer responses (Fig. 7).

`layer_responses(model, images)` follows Sec. 4.2's analysis: "the outputs of each
3x3 layer, after BN and before other nonlinearity (ReLU/addition)", in eval mode.
Residual functions that are close to zero show up as small responses (Fig. 7).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import models


def layer_responses(model: models.ResNet, images: jax.Array | np.ndarray) -> np.ndarray:
  """Std of every 3x3 layer's output after BN, before the addition and ReLU, in layer order.

  Read from the model's own `intermediates`. The standard deviation is over every
  element of the layer's output for `images` (N, H, W, C). On CIFAR nets the first
  entry is the 3x3 stem conv (the paper's "1st layer"), then the two convs of every
  basic block; bottleneck nets give their middle 3x3 convs. Plain nets give the
  same points. Puts `model` in eval mode.
  """
  if not all(isinstance(block, models.PostActivationBlock) for block in model.blocks):
    raise ValueError("layer responses are defined for the paper's post-activation blocks; "
                     "a pre-activation block has no BN right after its convs.")
  model.eval()
  out = model.intermediates(jnp.asarray(images))
  responses = [out["stem_norm"]] if tuple(model.stem_conv.kernel_size) == (3, 3) else []
  for block, block_out in zip(model.blocks, out["blocks"]):
    responses += [output for conv, output in zip(block.convs, block_out["residual_branch"])
                  if tuple(conv.kernel_size) == (3, 3)]
  return np.asarray(jax.device_get([jnp.std(r) for r in responses]), np.float64)
