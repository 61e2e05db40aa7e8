"""The model zoo against the paper's numbers and the published reference counts."""
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from resnet_jax import models
from resnet_jax.models import analysis


def build(name, num_classes=10, **overrides):
  return models.create(name, num_classes=num_classes, rngs=nnx.Rngs(0), **overrides)


def residual_adds(model, input_shape):
  """Counts element-wise additions of two full activation maps in the forward pass."""
  graphdef, state = nnx.split(model)

  def forward(x):
    net = nnx.merge(graphdef, state)
    net.eval()
    return net(x)

  jaxpr = jax.make_jaxpr(forward)(jnp.zeros((2,) + input_shape)).jaxpr
  count = 0
  for eqn in jaxpr.eqns:
    sub_jaxprs = list(jax.extend.core.jaxprs_in_params(eqn.params))
    for sub in sub_jaxprs:
      count += sum(e.primitive.name == "add" and len(e.invars[0].aval.shape) == 4
                   and e.invars[0].aval.shape == e.invars[1].aval.shape
                   and e.invars[0].aval.shape[0] == 2 for e in sub.eqns)
    count += (eqn.primitive.name == "add" and len(eqn.invars[0].aval.shape) == 4
              and eqn.invars[0].aval.shape == eqn.invars[1].aval.shape)
  return count


# Table 6 (option A): 0.27M, 0.46M, 0.66M, 0.85M, 1.7M parameters.
@pytest.mark.parametrize("depth,paper_millions,exact", [
    (20, 0.27, 269_722), (32, 0.46, 464_154), (44, 0.66, 658_586), (56, 0.85, 853_018),
    (110, 1.7, 1_727_962)])
def test_cifar_parameter_counts_match_table_6(depth, paper_millions, exact):
  count = models.count_params(build(f"cifar_resnet{depth}"))
  assert count == exact
  assert round(count / 1e6, len(str(paper_millions).split(".")[1])) == paper_millions


@pytest.mark.slow
def test_cifar_resnet1202_has_19_4m_parameters():
  count = models.count_params(build("cifar_resnet1202"))
  assert round(count / 1e6, 1) == 19.4


# The standard published counts of the ImageNet ResNets (option B, 1000 classes).
@pytest.mark.parametrize("depth,exact", [
    (18, 11_689_512), (34, 21_797_672), (50, 25_557_032), (101, 44_549_160),
    (152, 60_192_808)])
def test_imagenet_parameter_counts(depth, exact):
  assert models.count_params(build(f"resnet{depth}", num_classes=1000)) == exact


# Table 1: 1.8, 3.6, 3.8, 7.6, 11.3 x 10^9 multiply-adds at 224x224. The paper's
# figures are rounded down to one decimal (ResNet-34 counts 3.66G), so allow 0.07G.
@pytest.mark.parametrize("depth,paper_gmacs", [
    (18, 1.8), (34, 3.6), (50, 3.8), (101, 7.6), (152, 11.3)])
def test_imagenet_macs_match_table_1(depth, paper_gmacs):
  macs = analysis.count_macs(build(f"resnet{depth}", num_classes=1000), (224, 224, 3))
  assert abs(macs / 1e9 - paper_gmacs) < 0.07


def test_resnet50_v1_5_moves_the_stride_and_the_cost():
  # torchvision's ResNet-50 (stride on the 3x3) is the published 4.09 GMACs.
  v1_5 = build("resnet50", num_classes=1000, stride_on_1x1=False)
  assert abs(analysis.count_macs(v1_5, (224, 224, 3)) / 1e9 - 4.09) < 0.01
  first_of_stage_2 = v1_5.blocks[3]
  assert [conv.strides for conv in first_of_stage_2.convs] == [1, 2, 1]
  paper = build("resnet50", num_classes=1000)
  assert [conv.strides for conv in paper.blocks[3].convs] == [2, 1, 1]
  assert models.count_params(v1_5) == models.count_params(paper)


def test_cifar_macs():
  # 16-32-64 filters on 32/16/8 maps: 40.6M, 125.5M, 252.9M multiply-adds.
  for depth, expected in [(20, 40.6e6), (56, 125.5e6), (110, 252.9e6)]:
    macs = analysis.count_macs(build(f"cifar_resnet{depth}"), (32, 32, 3))
    assert abs(macs - expected) < 0.05e6, (depth, macs)
  # A batch costs its size times one image.
  model = build("cifar_resnet8")
  assert analysis.count_macs(model, (4, 32, 32, 3)) == 4 * analysis.count_macs(model, (32, 32, 3))


def test_option_a_adds_no_parameters_and_c_projects_every_block():
  plain = models.count_params(build("plain34", num_classes=1000))
  option_a = build("resnet34", num_classes=1000, shortcut="A")
  option_b = build("resnet34", num_classes=1000, shortcut="B")
  option_c = build("resnet34", num_classes=1000, shortcut="C")
  assert models.count_params(option_a) == plain
  assert all(block.projection is None for block in option_a.blocks)
  assert sum(block.projection is not None for block in option_b.blocks) == 3
  assert all(block.projection is not None for block in option_c.blocks)
  # Each projection is a bias-free 1x1 conv plus a BN scale and bias.
  projection_params = sum(b.in_features * b.out_features + 2 * b.out_features
                          for b in option_c.blocks)
  assert models.count_params(option_c) == plain + projection_params
  assert models.count_params(option_b) < models.count_params(option_c)


def test_plain_networks_contain_no_addition():
  for resnet, plain, blocks in [("cifar_resnet8", "cifar_plain8", 3), ("resnet18", "plain18", 8)]:
    shape = (32, 32, 3)
    assert residual_adds(build(resnet), shape) == blocks
    assert residual_adds(build(plain), shape) == 0


def test_bottleneck_has_4x_expansion_and_stride_position():
  model = build("resnet50", num_classes=1000)
  kernels = [conv.kernel_size for conv in model.blocks[0].convs]
  assert kernels == [(1, 1), (3, 3), (1, 1)]
  assert [conv.out_features for conv in model.blocks[0].convs] == [64, 64, 256]
  assert model.blocks[-1].out_features == 2048


def test_invalid_names_get_one_clear_error():
  for bad in ["cifar_resnet21", "resnet42", "vgg16", "cifar_resnet2"]:
    with pytest.raises(ValueError, match="Valid names: cifar_resnet"):
      build(bad)
  with pytest.raises(ValueError, match="plain network and has no shortcut"):
    build("cifar_plain20", shortcut="A")
  with pytest.raises(ValueError, match="Unknown shortcut option 'D'"):
    build("cifar_resnet20", shortcut="D")
  with pytest.raises(ValueError, match="zero_init_last_bn needs post-activation"):
    build("cifar_resnet20", preact=True, zero_init_last_bn=True)


def test_any_cifar_depth_6n_plus_2():
  model = build("cifar_resnet14")
  assert len(model.blocks) == 6
  assert model(jnp.zeros((2, 32, 32, 3))).shape == (2, 10)


def test_train_mode_updates_batch_statistics_and_eval_mode_does_not():
  model = build("cifar_resnet8")
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  snapshot = lambda: jax.tree.map(np.array, nnx.state(model, nnx.BatchStat))
  before = snapshot()
  model.train()
  model(x)
  after_train = snapshot()
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), before, after_train)
  assert all(jax.tree.leaves(changed))
  # Momentum 0.9: the first update moves the mean a tenth of the way.
  stem_mean = model.stem_norm.mean[...]
  batch_mean = jnp.mean(model.stem_conv(x), axis=(0, 1, 2))
  np.testing.assert_allclose(stem_mean, 0.1 * batch_mean, rtol=1e-4, atol=1e-6)
  model.eval()
  first = model(x)
  np.testing.assert_array_equal(first, model(x))
  unchanged = jax.tree.map(lambda a, b: bool(np.all(a == b)), after_train, snapshot())
  assert all(jax.tree.leaves(unchanged))


def test_pure_under_jit_through_split_and_merge():
  model = build("cifar_resnet8")
  model.eval()
  x = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
  graphdef, state = nnx.split(model)
  jitted = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
  np.testing.assert_allclose(jitted(state, x), model(x), rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_keeps_float32_parameters_and_statistics():
  model = build("cifar_resnet8", dtype=jnp.bfloat16)
  reference = build("cifar_resnet8")
  dtypes = {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))}
  dtypes |= {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model, nnx.BatchStat))}
  assert dtypes == {jnp.dtype(jnp.float32)}
  x = jax.random.normal(jax.random.key(3), (4, 32, 32, 3))
  logits, expected = model(x), reference(x)  # Same rngs: same initial weights.
  assert logits.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(logits - expected)) / jnp.max(jnp.abs(expected))) < 0.05


def test_zero_init_makes_each_block_its_shortcut():
  model = build("cifar_resnet8", zero_init_last_bn=True)
  assert all(float(jnp.max(jnp.abs(block.norms[-1].scale[...]))) == 0 for block in model.blocks)
  x = nnx.relu(jax.random.normal(jax.random.key(4), (2, 32, 32, 16)))
  np.testing.assert_array_equal(model.blocks[0](x), x)  # identity shortcut, then ReLU
  default = build("cifar_resnet8")
  assert all(float(jnp.min(block.norms[-1].scale[...])) == 1 for block in default.blocks)


def test_preactivation_blocks():
  model = build("cifar_resnet8", preact=True)
  first, second = model.blocks[0], model.blocks[1]
  # He et al., 2016: the stem keeps its BN-ReLU, "before splitting into two paths", so the
  # first unit has no input BN; later units have BN-ReLU before every conv; a final BN-ReLU.
  assert first.input_norm is None and [n.num_features for n in first.norms] == [16]
  assert second.input_norm.num_features == 16 and [n.num_features for n in second.norms] == [32]
  assert model.stem_norm is not None and model.final_norm is not None
  assert isinstance(first, models.PreActivationBlock) and first.projection is None
  assert model(jnp.zeros((2, 32, 32, 3))).shape == (2, 10)
  imagenet = build("resnet50", num_classes=1000, preact=True, shortcut="B")
  # BN parameters move: no BN after each unit's last conv or its projection; an input BN on
  # every unit but the first and a final BN instead: 3,840 BN channels fewer (computed by hand
  # from Table 1's widths), so 25,557,032 - 2 x 3,840 = 25,549,352 parameters.
  assert models.count_params(imagenet) == 25_549_352
  assert imagenet(jnp.zeros((1, 64, 64, 3))).shape == (1, 1000)


def test_he_initialisation_std():
  model = build("cifar_resnet20")
  kernel = model.blocks[4].convs[1].kernel[...]  # 3x3, 32 -> 32
  expected_std = np.sqrt(2.0 / (3 * 3 * 32))
  assert abs(float(jnp.std(kernel)) / expected_std - 1) < 0.05


def _first_conv_gradient_norm(name):
  model = build(name)
  images = jax.random.normal(jax.random.key(5), (16, 32, 32, 3))
  labels = jnp.arange(16) % 10
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(params, rest):
    net = nnx.merge(graphdef, params, rest, copy=True)
    logits = net(images)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

  grads = jax.grad(loss_fn)(params, rest)
  return float(jnp.linalg.norm(grads["stem_conv"]["kernel"][...]))


def test_gradients_reach_the_first_layer_of_deep_nets():
  # Sec. 4.1: with BN, even the deep plain net's gradients do not vanish; its
  # trouble is optimisation, not signal. Both norms are finite and far from 0.
  residual = _first_conv_gradient_norm("cifar_resnet56")
  plain = _first_conv_gradient_norm("cifar_plain56")
  print(f"first-conv gradient norm at init: resnet56 {residual:.4g}, plain56 {plain:.4g}")
  assert np.isfinite(residual) and residual > 1e-3
  assert np.isfinite(plain) and plain > 1e-3
  # Far from vanishing, the plain net's first-layer gradient is the larger one
  # (measured: resnet56 3.2, plain56 1.5e3 for this seed and batch).
  assert plain > residual


def test_importing_models_does_not_import_tensorflow():
  code = ("import sys, resnet_jax.models; "
          "bad = [m for m in ('tensorflow', 'tensorflow_datasets', 'keras') if m in sys.modules]; "
          "assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True)
