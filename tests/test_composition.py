"""Models as a library: a new block type from outside the package, custom layers, backbone features."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from resnet_jax import models
from resnet_jax.models import analysis


class SqueezeExcitationBlock(models.PostActivationBlock):
  """Hu et al., 2018, "Squeeze-and-Excitation Networks", Fig. 3: the residual branch's output
  rescaled per channel by a gate computed from its global average, before the addition."""

  def __init__(self, in_features, width, stride, *, rngs, reduction=16, **kwargs):
    super().__init__(in_features, width, stride, rngs=rngs, **kwargs)
    self.squeeze = nnx.Linear(self.out_features, self.out_features // reduction, rngs=rngs)
    self.excite = nnx.Linear(self.out_features // reduction, self.out_features, rngs=rngs)

  def residual_branch(self, x):
    outputs = super().residual_branch(x)
    gate = nnx.sigmoid(self.excite(nnx.relu(self.squeeze(jnp.mean(outputs[-1], (1, 2))))))
    return outputs + (outputs[-1] * gate[:, None, None, :],)


def se_resnet50(num_classes=1000, **kwargs):
  return models.ResNet(
      block_cls=functools.partial(SqueezeExcitationBlock, layers=models.bottleneck, shortcut="B"),
      stage_sizes=(3, 4, 6, 3), stage_widths=(64, 128, 256, 512), imagenet_stem=True,
      num_classes=num_classes, rngs=nnx.Rngs(0), **kwargs)


def test_se_resnet50_has_the_published_parameter_count():
  # SE-ResNet-50 with reduction 16: 28.1M in Hu et al.'s Table 2; 28,088,024 exactly in
  # timm's `seresnet50` (SE convs with biases, as our Linear layers).
  model = nnx.eval_shape(se_resnet50)
  assert models.count_params(model) == 28_088_024
  # The gates cost two matrix products of C x C/16 per block (C = 4 x width) and nothing
  # else: 2.5M multiply-adds on ResNet-50's 3.86G (Hu et al.: 3.87 GFLOPs against 3.86).
  resnet50 = nnx.eval_shape(lambda: models.create("resnet50", num_classes=1000, rngs=nnx.Rngs(0)))
  gates = sum(blocks * 2 * (4 * width) * (4 * width // 16)
              for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)))
  assert gates == 2_514_944
  assert (analysis.count_macs(model, (224, 224, 3))
          - analysis.count_macs(resnet50, (224, 224, 3))) == gates


@pytest.mark.parametrize("gate_bias,expected", [(-1e4, "shortcut"), (1e4, "residual block")])
def test_the_gate_scales_the_residual_branch(gate_bias, expected):
  rngs = nnx.Rngs(1)
  block = SqueezeExcitationBlock(32, 16, 1, layers=models.bottleneck, shortcut="B",
                                 conv=functools.partial(nnx.Conv, use_bias=False),
                                 norm=nnx.BatchNorm, rngs=rngs)
  plain = models.PostActivationBlock(32, 16, 1, layers=models.bottleneck, shortcut="B",
                                     conv=functools.partial(nnx.Conv, use_bias=False),
                                     norm=nnx.BatchNorm, rngs=nnx.Rngs(1))
  block.eval(), plain.eval()
  block.excite.kernel[...] = jnp.zeros_like(block.excite.kernel[...])
  block.excite.bias[...] = jnp.full_like(block.excite.bias[...], gate_bias)
  x = jax.random.normal(jax.random.key(2), (2, 8, 8, 32))
  if expected == "shortcut":  # A closed gate leaves ReLU(projection shortcut), 32 -> 64.
    want = nnx.relu(block.projection_norm(block.projection(x)))
  else:  # An open gate is the block without SE (the same initial weights).
    want = plain(x)
  np.testing.assert_allclose(block(x), want, rtol=1e-6, atol=1e-6)


def test_se_resnet_trains_in_a_jitted_step():
  model = models.ResNet(
      block_cls=functools.partial(SqueezeExcitationBlock, reduction=4),
      stage_sizes=(1, 1, 1), stage_widths=(16, 32, 64), imagenet_stem=False, num_classes=10,
      rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
  images = jax.random.normal(jax.random.key(3), (8, 32, 32, 3))
  labels = jnp.arange(8) % 10

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(model):
      logits = model(images)
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(20)]
  assert losses[-1] < 0.5 * losses[0], losses


class ReZeroBlock(models.Block):
  """Bachlechner et al., 2020, "ReZero is All You Need": x + alpha F(x), F two 3x3 convs with a
  ReLU between, no batch norm, alpha a learned scalar that starts at 0. Its output is a raw sum."""

  activated_output = False

  def __init__(self, in_features, width, stride, *, activated_input, conv, norm, rngs):
    del norm
    super().__init__(in_features, width, stride, layers=models.basic, shortcut="A", conv=conv,
                     rngs=rngs)
    self.activated_input = activated_input
    self.alpha = nnx.Param(jnp.zeros(()))

  def intermediates(self, x):
    branch = [self.convs[0](x)]
    branch.append(self.convs[1](nnx.relu(branch[0])))
    return {"residual_branch": tuple(branch),
            "output": self.identity(x) + self.alpha[...] * branch[-1]}


def test_a_new_block_type_declares_what_the_net_needs():
  model = models.ResNet(block_cls=ReZeroBlock, stage_sizes=(2, 2), stage_widths=(8, 16),
                        imagenet_stem=False, num_classes=0, rngs=nnx.Rngs(0))
  # The stem ends in BN-ReLU and a ReZero block in a raw sum: only the first block reads an
  # activated input, and the net ends in a BN-ReLU of its own.
  assert [block.activated_input for block in model.blocks] == [True, False, False, False]
  assert model.final_norm is not None
  model.eval()
  out = model.intermediates(jax.random.normal(jax.random.key(0), (2, 8, 8, 3)))
  expected = out["stem"]  # alpha = 0: each block is its option-A shortcut alone.
  for block in model.blocks:
    expected = block.identity(expected)
  np.testing.assert_allclose(out["pooled"], jnp.mean(nnx.relu(model.final_norm(expected)), (1, 2)),
                             rtol=1e-6, atol=1e-6)


def test_a_block_type_without_intermediates_says_so():
  class Unfinished(models.Block):
    activated_output = True

  block = Unfinished(8, 8, 1, layers=models.basic, shortcut="A", conv=nnx.Conv, rngs=nnx.Rngs(0))
  with pytest.raises(NotImplementedError, match="Unfinished must implement intermediates"):
    block(jnp.zeros((1, 4, 4, 8)))


def weight_standardized_conv(lhs, rhs, *args, **kwargs):
  """Qiao et al., 2019: each filter normalised to zero mean and unit variance before use."""
  mean, var = jnp.mean(rhs, (0, 1, 2)), jnp.var(rhs, (0, 1, 2))
  return jax.lax.conv_general_dilated(lhs, (rhs - mean) * jax.lax.rsqrt(var + 1e-5), *args,
                                      **kwargs)


def test_every_convolution_is_the_conv_class_given():
  standardized = functools.partial(nnx.Conv, conv_general_dilated=weight_standardized_conv)
  model = models.create("cifar_resnet8", num_classes=10, shortcut="C", conv=standardized,
                        rngs=nnx.Rngs(0))
  convs = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Conv)]
  assert len(convs) == 1 + 3 * 3  # The stem; two convs and a projection per block.
  assert all(conv.conv_general_dilated is weight_standardized_conv for conv in convs)
  # Standardised filters: scaling a kernel changes its conv's output only through the 1e-5
  # added to the filters' variance (about 0.014 here).
  conv = model.blocks[1].convs[0]
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 16))
  before = conv(x)
  conv.kernel[...] = 3.0 * conv.kernel[...]
  np.testing.assert_allclose(conv(x), before, rtol=1e-3, atol=1e-3 * float(jnp.max(before)))
  plain = nnx.Conv(16, 32, (3, 3), strides=2, padding=((1, 1), (1, 1)), use_bias=False,
                   rngs=nnx.Rngs(0))
  plain.kernel[...] = conv.kernel[...]
  assert float(jnp.max(jnp.abs(plain(x) - before))) > 1.0


def test_features_are_exactly_what_the_classifier_reads():
  model = models.create("resnet50", num_classes=10, rngs=nnx.Rngs(0))
  headless = models.create("resnet50", num_classes=0, rngs=nnx.Rngs(0))
  model.eval(), headless.eval()
  x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
  out = model.intermediates(x)  # Eager, so that every route below runs the very same ops.
  # C2 to C5 at strides 4, 8, 16, 32, as a detection backbone needs them.
  assert [out[f"stage{i}"].shape for i in (1, 2, 3, 4)] == [
      (2, 16, 16, 256), (2, 8, 8, 512), (2, 4, 4, 1024), (2, 2, 2, 2048)]
  assert out["stem"].shape == (2, 16, 16, 64) and len(out["blocks"]) == 16
  np.testing.assert_array_equal(out["stage2"], out["blocks"][3 + 4 - 1]["output"])
  np.testing.assert_array_equal(out["pooled"], jnp.mean(out["stage4"], (1, 2)))
  np.testing.assert_array_equal(model.head(out["pooled"]), out["logits"])
  np.testing.assert_array_equal(model(x), out["logits"])
  # The headless model is the same backbone (same keys, drawn in the same order).
  assert headless.head is None and "logits" not in headless.intermediates(x)
  np.testing.assert_array_equal(headless(x), out["pooled"])
  # Under jit, the features a backbone user asks for are the same numbers.
  stages = jax.jit(lambda x: {k: v for k, v in headless.intermediates(x).items() if "stage" in k})
  for name, value in stages(x).items():
    np.testing.assert_allclose(value, out[name], rtol=1e-5, atol=1e-5 * float(jnp.max(value)))


def test_pre_activation_features_pool_after_the_final_activation():
  model = models.create("cifar_resnet8", num_classes=10, preact=True, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (4, 32, 32, 3))
  out = model.intermediates(x)  # Training mode: BN by batch statistics.
  assert float(jnp.min(out["stage3"])) < 0  # A raw sum, before the final BN-ReLU.
  model.final_norm.mean[...] = jnp.zeros(64)  # Running statistics play no part in training.
  pooled = jnp.mean(nnx.relu(model.final_norm(out["stage3"])), (1, 2))
  np.testing.assert_allclose(out["pooled"], pooled, rtol=1e-6, atol=1e-6)
