"""Analyses of networks: layer responses (Fig. 7) and multiply-accumulates.

`layer_responses(model, images)` follows Sec. 4.2's analysis: "the outputs of each
3x3 layer, after BN and before other nonlinearity (ReLU/addition)", in eval mode.
Residual functions that are close to zero show up as small responses (Fig. 7).

`count_macs(model, input_shape)` counts the multiply-accumulates of a forward pass
from its traced program: the paper's FLOPs (Table 1), which are multiply-adds (Sec. 3.3).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
import numpy as np
from flax import nnx

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
  for i, block in enumerate(model.blocks, start=1):
    responses += [out[f"block{i}.branch{j}"] for j, conv in enumerate(block.convs, start=1)
                  if tuple(conv.kernel_size) == (3, 3)]
  return np.asarray(jax.device_get([jnp.std(r) for r in responses]), np.float64)


def count_macs(model: nnx.Module, input_shape: Sequence[int]) -> int:
  """Multiply-accumulates of one eval-mode forward pass.

  `input_shape` is (H, W, C) for one image or (N, H, W, C) for a batch. Counts
  every convolution and matrix product in the traced program (no execution, so a
  model built with `nnx.eval_shape` counts as well).
  """
  shape = tuple(input_shape)
  if len(shape) == 3:
    shape = (1,) + shape
  graphdef, state = nnx.split(model)

  def forward(state, x):
    net = nnx.merge(graphdef, state)
    net.eval()
    return net(x)

  # Traced with abstract values only, so a shapes-only model (`nnx.eval_shape`) counts too.
  abstract = lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
  closed = jax.make_jaxpr(forward)(jax.tree.map(abstract, state),
                                   jax.ShapeDtypeStruct(shape, jnp.float32))
  return _jaxpr_macs(closed.jaxpr)


def _jaxpr_macs(jaxpr) -> int:
  macs = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      kernel = eqn.invars[1].aval.shape
      rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, *spatial)
      per_output = kernel[rhs_spec[1]] * math.prod(kernel[d] for d in rhs_spec[2:])
      macs += math.prod(eqn.outvars[0].aval.shape) * per_output
    elif eqn.primitive.name == "dot_general":
      (lhs_contracting, _), _ = eqn.params["dimension_numbers"]
      lhs_shape = eqn.invars[0].aval.shape
      macs += (math.prod(eqn.outvars[0].aval.shape)
               * math.prod(lhs_shape[d] for d in lhs_contracting))
    repeats = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
    for sub in jax_core.jaxprs_in_params(eqn.params):
      macs += repeats * _jaxpr_macs(sub)
  return macs
