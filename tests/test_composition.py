"""Models as a library: a new block type from outside the package, custom layers, backbone features."""
import functools
import re

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
  # C1, the stem's BN-ReLU at stride 2; the max pool after it opens the first stage.
  np.testing.assert_array_equal(out["stem"], nnx.relu(out["stem_norm"]))
  assert out["stem"].shape == (2, 32, 32, 64)
  assert [name for name in out if re.fullmatch(r"block\d+", name)] == [
      f"block{i}" for i in range(1, 17)]
  np.testing.assert_array_equal(out["stage2"], out["block7"])  # 3 + 4 blocks.
  np.testing.assert_array_equal(out["stage2"], model.blocks[6](out["block6"]))
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


def test_intermediates_are_a_flat_dict_of_every_named_map_in_forward_order():
  model = models.create("cifar_resnet8", num_classes=10, rngs=nnx.Rngs(0))
  model.eval()
  x = jax.random.normal(jax.random.key(3), (2, 32, 32, 3))
  out = model.intermediates(x)
  assert list(out) == ["stem_norm", "stem",
                       "block1.branch1", "block1.branch2", "block1", "stage1",
                       "block2.branch1", "block2.branch2", "block2", "stage2",
                       "block3.branch1", "block3.branch2", "block3", "stage3",
                       "pooled", "logits"]
  for name, value in out.items():  # A loop over it meets arrays only.
    assert isinstance(value, jax.Array), name
  # Each block's names are its own `Block.intermediates` on the previous block's output.
  for i, block in enumerate(model.blocks, start=1):
    block_out = block.intermediates(out["stem"] if i == 1 else out[f"block{i - 1}"])
    np.testing.assert_array_equal(out[f"block{i}"], block_out["output"])
    for j, branch in enumerate(block_out["residual_branch"], start=1):
      np.testing.assert_array_equal(out[f"block{i}.branch{j}"], branch)


def abstract_intermediates(model, input_shape):
  """The shapes of `model.intermediates` on an input of `input_shape`, computing nothing."""
  graphdef, state = nnx.split(model)
  return jax.eval_shape(lambda state, x: nnx.merge(graphdef, state).intermediates(x), state,
                        jax.ShapeDtypeStruct(input_shape, jnp.float32))


@pytest.mark.parametrize("name,options,expected", [
    # Table 1 on a 224 x 224 image: conv1 112 x 112, conv2_x 56 x 56 ... conv5_x 7 x 7.
    ("resnet18", {}, [("stem", 64, 2), ("stage1", 64, 4), ("stage2", 128, 8),
                      ("stage3", 256, 16), ("stage4", 512, 32)]),
    ("resnet50", {}, [("stem", 64, 2), ("stage1", 256, 4), ("stage2", 512, 8),
                      ("stage3", 1024, 16), ("stage4", 2048, 32)]),
    ("resnet50", {"preact": True, "stride_on_1x1": False},
     [("stem", 64, 2), ("stage1", 256, 4), ("stage2", 512, 8), ("stage3", 1024, 16),
      ("stage4", 2048, 32)]),
    # Sec. 4.2: maps of 32, 16, 8 with 16, 32, 64 filters.
    ("cifar_resnet8", {}, [("stem", 16, 1), ("stage1", 16, 1), ("stage2", 32, 2),
                           ("stage3", 64, 4)]),
    ("cifar_resnet8", {"preact": True}, [("stem", 16, 1), ("stage1", 16, 1),
                                         ("stage2", 32, 2), ("stage3", 64, 4)]),
])
def test_feature_info_is_the_shapes_of_the_feature_maps(name, options, expected):
  model = nnx.eval_shape(lambda: models.create(name, num_classes=0, rngs=nnx.Rngs(0), **options))
  assert [tuple(info) for info in model.feature_info] == expected
  height, width = (64, 96) if model.imagenet_stem else (32, 48)
  out = abstract_intermediates(model, (2, height, width, 3))
  for info in model.feature_info:
    assert out[info.name].shape == (2, height // info.stride, width // info.stride,
                                    info.channels), info


def test_feature_info_of_a_custom_block_follows_its_strides():
  model = nnx.eval_shape(lambda: models.ResNet(
      block_cls=functools.partial(SqueezeExcitationBlock, reduction=4),
      stage_sizes=(1, 2, 1, 1), stage_widths=(8, 16, 32, 64), imagenet_stem=False,
      num_classes=0, rngs=nnx.Rngs(0)))
  assert model.feature_info == (
      models.FeatureInfo("stem", 8, 1), models.FeatureInfo("stage1", 8, 1),
      models.FeatureInfo("stage2", 16, 2), models.FeatureInfo("stage3", 32, 4),
      models.FeatureInfo("stage4", 64, 8))
  out = abstract_intermediates(model, (1, 40, 40, 3))
  assert [out[info.name].shape for info in model.feature_info] == [
      (1, 40, 40, 8), (1, 40, 40, 8), (1, 20, 20, 16), (1, 10, 10, 32), (1, 5, 5, 64)]


def test_reset_classifier_builds_the_head_as_the_constructor_does():
  rngs = nnx.Rngs(0)
  model = models.create("cifar_resnet8", num_classes=0, dtype=jnp.bfloat16, rngs=rngs)
  model.reset_classifier(7, rngs=rngs)  # The keys a 7-class model's head is drawn with.
  built = models.create("cifar_resnet8", num_classes=7, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  assert jax.tree.structure(nnx.state(model)) == jax.tree.structure(nnx.state(built))
  for ours, theirs in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(built))):
    np.testing.assert_array_equal(ours, theirs)
  # The model's dtype: bfloat16 compute on float32 parameters; float32 logits.
  assert model.head.kernel.dtype == model.head.bias.dtype == jnp.float32
  pooled = jax.random.normal(jax.random.key(4), (2, model.num_features))
  assert model.head(pooled).dtype == jnp.bfloat16
  expected = (pooled.astype(jnp.bfloat16) @ model.head.kernel[...].astype(jnp.bfloat16)
              + model.head.bias[...].astype(jnp.bfloat16))
  np.testing.assert_array_equal(model.head(pooled), expected)
  model.eval()
  x = jax.random.normal(jax.random.key(5), (2, 32, 32, 3))
  logits = model(x)
  assert logits.shape == (2, 7) and logits.dtype == jnp.float32
  np.testing.assert_array_equal(logits, model.head(model.intermediates(x)["pooled"]).astype(
      jnp.float32))


def test_reset_classifier_keeps_the_backbone_and_zero_makes_it_headless():
  model = models.create("cifar_resnet8", num_classes=10, rngs=nnx.Rngs(0))
  model.eval()
  x = jax.random.normal(jax.random.key(6), (2, 32, 32, 3))
  pooled = model.intermediates(x)["pooled"]
  model.reset_classifier(3, rngs=nnx.Rngs(1))
  assert model.head.kernel.shape == (64, 3)
  np.testing.assert_array_equal(model.intermediates(x)["pooled"], pooled)  # Mode kept: eval.
  model.reset_classifier(0, rngs=nnx.Rngs(1))
  assert model.head is None and "logits" not in model.intermediates(x)
  np.testing.assert_array_equal(model(x), pooled)
  with pytest.raises(ValueError, match="num_classes must be positive"):
    model.reset_classifier(-1, rngs=nnx.Rngs(1))
