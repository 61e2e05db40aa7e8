"""Pre-activation ResNets (He, Zhang, Ren, Sun 2016, "Identity Mappings in Deep
Residual Networks") against a PyTorch twin transcribed from the reference Lua code.

The twin is written from the two references, not from `resnet_jax/models/resnet.py`:

  fb    facebookarchive/fb.resnet.torch, models/preresnet.lua at 985e569 (the
        repository's last commit; the file's last change to the layer structure
        is 1d5f060 "Three types of pre-activation residual unit", which removed
        the BN after the projection shortcut and added 'both_preact').
  KH    KaimingHe/resnet-1k-layers, resnet-pre-act.lua at fde7ee9 (the authors'
        CIFAR ResNet-164/1001 code).

Where they differ, and which one our model follows:
  * Bottleneck stride: fb puts it on the 3x3 conv (preresnet.lua l.101), KH on
    the first 1x1 conv (resnet-pre-act.lua l.70). `create(..., stride_on_1x1=True)`
    (our default) is KH's, False is fb's; both are tested.
  * Which unit activates before the split: fb gives 'both_preact' to the first
    unit of every stage (l.119-120), KH to every unit whose width changes
    (l.62-66). Ours uses "shape changes". On every network built here the two
    rules pick the same units: a stage's first unit is the one that reshapes,
    except CIFAR stage 1 (16 -> 16, stride 1), whose 'both_preact' BN-ReLU is
    our stem BN-ReLU (fb's CIFAR stem is a bare conv, l.167).
  * fb's option A shortcut (l.37-41) concatenates zeros of the input's width, so
    it only doubles channels; ours pads to any width.

Global average pooling stands in for Avg(8, 8) / Avg(7, 7) (fb l.156, l.173),
which equal it at 32x32 CIFAR and 224x224 ImageNet inputs; the ImageNet nets
run at 64x64 here. The Lua convolutions have no bias (cuDNN >= 4, l.202-203).
"""
import functools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from resnet_jax import models

torch = pytest.importorskip("torch")
tnn = torch.nn

# Float32 accumulation order differs between XLA and ATen convolutions. Measured
# worst cases, relative to the largest logit: 1.1e-6 in eval mode, 1.7e-5 in
# train mode (ResNet-50's last stage normalises 2x2x8 values by their own
# variance, which amplifies rounding). A structural difference is O(1).
RTOL = {"eval": 2e-5, "train": 2e-4}


# ----------------------------------------------------------------------------
# The twin.


class Shortcut(tnn.Module):
  """fb `shortcut(nInputPlane, nOutputPlane, stride)`, preresnet.lua l.28-45.

  Options B and C: a 1x1 strided conv with no BN (l.33-34). Option A: "strided,
  zero-padded identity", `SpatialAveragePooling(1, 1, stride, stride)` (a 1x1
  window: subsampling) then `Concat(2)` of Identity and MulConstant(0) (l.37-41).
  """

  def __init__(self, n_in, n_out, stride, shortcut_type):
    super().__init__()
    use_conv = shortcut_type == "C" or (shortcut_type == "B" and n_in != n_out)
    self.conv = tnn.Conv2d(n_in, n_out, 1, stride, bias=False) if use_conv else None
    self.pool = None
    if not use_conv and n_in != n_out:
      assert n_out == 2 * n_in, "fb's option A concatenates one copy of zeros"
      self.pool = tnn.AvgPool2d(1, stride)

  def forward(self, x):
    if self.conv is not None:
      return self.conv(x)
    if self.pool is not None:
      x = self.pool(x)
      return torch.cat([x, x * 0], dim=1)
    return x


class Unit(tnn.Module):
  """One residual unit as the Lua code assembles it (fb l.59-82 and l.85-111).

  `block` (applied before the split) holds BN-ReLU when preact == 'both_preact'
  (l.65-67); otherwise the branch `s` starts with BN-ReLU unless preact ==
  'no_preact' (l.68-71). Then ConcatTable(s, shortcut) and CAddTable (l.77-81):
  nothing after the addition. `convs` is [(planes, kernel, stride)]; a BN-ReLU
  precedes every conv but the first (l.73-74).
  """

  def __init__(self, n_in, convs, preact, shortcut):
    super().__init__()
    self.block = (tnn.Sequential(tnn.BatchNorm2d(n_in), tnn.ReLU())
                  if preact == "both_preact" else tnn.Sequential())
    layers = [] if preact in ("both_preact", "no_preact") else [tnn.BatchNorm2d(n_in), tnn.ReLU()]
    planes = n_in
    for i, (n, kernel, stride) in enumerate(convs):
      if i:
        layers += [tnn.BatchNorm2d(planes), tnn.ReLU()]
      layers.append(tnn.Conv2d(planes, n, kernel, stride, kernel // 2, bias=False))
      planes = n
    self.s = tnn.Sequential(*layers)
    self.shortcut = shortcut

  def forward(self, x):
    x = self.block(x)
    return self.s(x) + self.shortcut(x)


def fb_basicblock(n_in, n, stride, preact, shortcut_type):
  """fb `basicblock`, l.59-82: 3x3/stride, 3x3."""
  return Unit(n_in, [(n, 3, stride), (n, 3, 1)], preact, Shortcut(n_in, n, stride, shortcut_type))


def fb_bottleneck(n_in, n, stride, preact, shortcut_type, stride_on_1x1=False):
  """fb `bottleneck`, l.85-111: 1x1, 3x3/stride (l.101), 1x1 to 4n.

  `stride_on_1x1=True` moves the stride to the first 1x1 conv, as KH l.70.
  """
  s1, s3 = (stride, 1) if stride_on_1x1 else (1, stride)
  return Unit(n_in, [(n, 1, s1), (n, 3, s3), (4 * n, 1, 1)], preact,
              Shortcut(n_in, 4 * n, stride, shortcut_type))


class FbPreResNet(tnn.Module):
  """fb `createModel`, preresnet.lua l.127-175.

  ImageNet (l.146-158): conv 7x7/2 pad 3, BN, ReLU, max pool 3x3/2 pad 1, four
  stages whose first has type 'first' ('no_preact' first unit, l.119-120) and
  the others 'both_preact' first units; BN, ReLU, average pool, linear.
  CIFAR (l.167-175): a bare conv 3x3 (no BN-ReLU), three stages whose first
  units are all 'both_preact'; BN, ReLU, average pool, linear.
  """

  def __init__(self, dataset, stages, block, widths, num_classes, shortcut_type="B",
               stride_on_1x1=False):
    super().__init__()
    if dataset == "imagenet":
      self.stem = tnn.Sequential(tnn.Conv2d(3, 64, 7, 2, 3, bias=False), tnn.BatchNorm2d(64),
                                 tnn.ReLU(), tnn.MaxPool2d(3, 2, 1))
      planes = 64
    else:
      self.stem = tnn.Sequential(tnn.Conv2d(3, 16, 3, 1, 1, bias=False))
      planes = 16
    expansion = 4 if block == "bottleneck" else 1
    units = []
    for stage, (count, n) in enumerate(zip(stages, widths)):
      stride = 1 if stage == 0 else 2
      first_type = "no_preact" if dataset == "imagenet" and stage == 0 else "both_preact"
      for i in range(count):  # `layer`, l.114-125
        args = (planes, n, stride if i == 0 else 1, first_type if i == 0 else None,
                shortcut_type)
        units.append(fb_bottleneck(*args, stride_on_1x1=stride_on_1x1)
                     if block == "bottleneck" else fb_basicblock(*args))
        planes = n * expansion
    self.units = tnn.Sequential(*units)
    self.final = tnn.Sequential(tnn.BatchNorm2d(planes), tnn.ReLU())
    self.fc = tnn.Linear(planes, num_classes)

  def forward(self, x):
    x = self.final(self.units(self.stem(x)))
    return self.fc(x.mean(dim=(2, 3)))


class KaimingHePreResNet(tnn.Module):
  """KH `createModel`, resnet-pre-act.lua l.30-122 (CIFAR, depth 9n+2).

  A bare conv 3x3 to 16 (l.114); stages to 64, 128, 256 planes (l.112-117).
  `bottleneck(nIn, nOut, stride)` (l.34-91): a unit whose width is kept has
  BN-ReLU inside the branch and an identity shortcut (l.38-61); a unit whose
  width changes has a common BN-ReLU before the split (l.63-66), the stride on
  the first 1x1 conv (l.70) and a 1x1 conv projection with no BN (l.82-83).
  Then BN, ReLU, Avg(8, 8), linear (l.118-122).
  """

  def __init__(self, depth, num_classes=10):
    super().__init__()
    n = (depth - 2) // 9
    n_stages = (16, 64, 128, 256)
    self.stem = tnn.Sequential(tnn.Conv2d(3, 16, 3, 1, 1, bias=False))
    units = []
    for stage in range(3):
      for i in range(n):  # `layer`, l.94-102
        n_in = n_stages[stage] if i == 0 else n_stages[stage + 1]
        n_out, stride = n_stages[stage + 1], (1 if stage == 0 or i else 2)
        b = n_out // 4
        units.append(Unit(n_in, [(b, 1, stride), (b, 3, 1), (n_out, 1, 1)],
                          None if n_in == n_out else "both_preact",
                          Shortcut(n_in, n_out, stride, "B")))
    self.units = tnn.Sequential(*units)
    self.final = tnn.Sequential(tnn.BatchNorm2d(256), tnn.ReLU())
    self.fc = tnn.Linear(256, num_classes)

  forward = FbPreResNet.forward


# ----------------------------------------------------------------------------
# Weight transfer from our model to the twin.


def _numpy(variable):
  return np.asarray(variable[...], dtype=np.float32)


class Transfer:
  """Copies every parameter and BN statistic of `ours` into `twin`, checking shapes.

  Fails unless every twin tensor is written exactly once; `bn_pairs` keeps the
  (twin, ours) batch norms for the running-statistics comparison.
  """

  def __init__(self, ours, twin):
    self.pending = {name: t for name, t in twin.state_dict(keep_vars=True).items()
                    if not name.endswith("num_batches_tracked")}
    self.names = {id(t): name for name, t in self.pending.items()}
    self.bn_pairs = []
    imagenet = ours.imagenet_stem
    self.conv(twin.stem[0], ours.stem_conv)
    if imagenet:
      self.bn(twin.stem[1], ours.stem_norm)
    for index, (mine, unit) in enumerate(zip(ours.blocks, twin.units, strict=True)):
      norms = ([mine.input_norm] if mine.input_norm is not None else []) + list(mine.norms)
      if index == 0 and not imagenet:
        # The Lua CIFAR stem is a bare conv; its first unit's pre-split BN is our stem BN.
        norms.insert(0, ours.stem_norm)
      twin_norms = [m for m in unit.modules() if isinstance(m, tnn.BatchNorm2d)]
      twin_convs = [m for m in unit.s if isinstance(m, tnn.Conv2d)]
      assert len(norms) == len(twin_norms), f"unit {index}: BN count"
      assert len(mine.convs) == len(twin_convs), f"unit {index}: conv count"
      for t, o in zip(twin_norms, norms):
        self.bn(t, o)
      for t, o in zip(twin_convs, mine.convs):
        self.conv(t, o)
      assert (unit.shortcut.conv is None) == (mine.projection is None), f"unit {index}"
      if mine.projection is not None:
        self.conv(unit.shortcut.conv, mine.projection)
    self.bn(twin.final[0], ours.final_norm)
    self.copy(twin.fc.weight, _numpy(ours.head.kernel).T)
    self.copy(twin.fc.bias, _numpy(ours.head.bias))
    assert not self.pending, f"twin tensors never written: {sorted(self.pending)}"

  def copy(self, tensor, value):
    name = self.names[id(tensor)]
    assert name in self.pending, f"{name} written twice"
    assert tuple(tensor.shape) == value.shape, (name, tuple(tensor.shape), value.shape)
    with torch.no_grad():
      tensor.copy_(torch.from_numpy(np.array(value, copy=True)))
    del self.pending[name]

  def conv(self, t, o):
    strides = o.strides if isinstance(o.strides, tuple) else (o.strides,) * 2
    assert tuple(t.stride) == tuple(strides), (t, o.strides)
    self.copy(t.weight, _numpy(o.kernel).transpose(3, 2, 0, 1))  # HWIO -> OIHW

  def bn(self, t, o):
    assert t.eps == o.epsilon == 1e-5 and abs(t.momentum - (1 - o.momentum)) < 1e-12
    self.copy(t.weight, _numpy(o.scale))
    self.copy(t.bias, _numpy(o.bias))
    self.copy(t.running_mean, _numpy(o.mean))
    self.copy(t.running_var, _numpy(o.var))
    self.bn_pairs.append((t, o))


# ----------------------------------------------------------------------------
# Helpers.


def randomise(model, seed=1):
  """Non-trivial BN affine parameters and statistics, and a non-zero classifier bias."""
  rng = np.random.default_rng(seed)
  for _, module in nnx.iter_modules(model):
    if isinstance(module, nnx.BatchNorm):
      c = module.num_features
      module.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32)
      module.bias[...] = jnp.asarray(rng.normal(0.0, 0.3, c), jnp.float32)
      module.mean[...] = jnp.asarray(rng.normal(0.0, 0.3, c), jnp.float32)
      module.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32)
    elif isinstance(module, nnx.Linear):
      module.bias[...] = jnp.asarray(rng.normal(0.0, 0.1, module.bias.shape), jnp.float32)
  return model


def create(name, **overrides):
  num_classes = 10 if name.startswith("cifar") else 1000
  return randomise(models.create(name, num_classes=num_classes, rngs=nnx.Rngs(0), preact=True,
                                 **overrides))


def fb_twin(name, shortcut, stride_on_1x1=False):
  if name.startswith("cifar_resnet"):
    n = (int(name[len("cifar_resnet"):]) - 2) // 6
    return FbPreResNet("cifar10", (n,) * 3, "basic", (16, 32, 64), 10, shortcut)
  layers, stages = models.IMAGENET_DEPTHS[int(name[len("resnet"):])]
  block = "bottleneck" if layers is models.bottleneck else "basic"
  return FbPreResNet("imagenet", stages, block, (64, 128, 256, 512), 1000, shortcut,
                     stride_on_1x1)


def kaiminghe_ours(depth):
  """Our ResNet in KH's CIFAR layout: bottlenecks 16 -> 64, 128, 256, option B."""
  n = (depth - 2) // 9
  block = functools.partial(models.PreActivationBlock, layers=models.bottleneck, shortcut="B")
  return randomise(models.ResNet(block_cls=block, stage_sizes=(n,) * 3, stage_widths=(16, 32, 64),
                                 imagenet_stem=False, num_classes=10, rngs=nnx.Rngs(0)))


def images(size, batch=4, seed=0):
  return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


def run_both(ours, twin, x):
  logits = np.asarray(ours(jnp.asarray(x)))
  with torch.no_grad():
    twin_logits = twin(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  return logits, twin_logits


def assert_logits_match(case, logits, twin_logits, mode="eval"):
  diff = float(np.max(np.abs(logits - twin_logits)))
  scale = float(np.max(np.abs(twin_logits)))
  print(f"\n{case}: max |logit diff| {diff:.3g} (max |logit| {scale:.3g}, "
        f"relative {diff / scale:.3g})")
  assert scale > 1e-2  # the comparison is not between two near-zero outputs
  assert diff <= RTOL[mode] * scale, f"{case}: {diff} > {RTOL[mode]} * {scale}"


def compare_eval(case, ours, twin, size):
  Transfer(ours, twin)
  ours.eval()
  twin.eval()
  assert_logits_match(case, *run_both(ours, twin, images(size)))


# ----------------------------------------------------------------------------
# Eval mode: running statistics.


@pytest.mark.parametrize("name,shortcut", [
    ("cifar_resnet8", "A"), ("cifar_resnet20", "A"), ("cifar_resnet8", "B"),
    ("cifar_resnet8", "C")])
def test_cifar_matches_fb_preresnet(name, shortcut):
  compare_eval(f"{name} {shortcut} eval", create(name, shortcut=shortcut),
               fb_twin(name, shortcut), 32)


def test_resnet18_matches_fb_preresnet():
  compare_eval("resnet18 B eval", create("resnet18", shortcut="B"), fb_twin("resnet18", "B"), 64)


@pytest.mark.parametrize("stride_on_1x1", [False, True])
def test_resnet50_matches_fb_preresnet(stride_on_1x1):
  # False is fb's own layout (l.101); True is the same net with KH's stride placement (l.70).
  compare_eval(f"resnet50 B stride_on_1x1={stride_on_1x1} eval",
               create("resnet50", shortcut="B", stride_on_1x1=stride_on_1x1),
               fb_twin("resnet50", "B", stride_on_1x1), 64)


@pytest.mark.parametrize("depth", [11, 20])
def test_bottleneck_cifar_matches_kaiminghe(depth):
  compare_eval(f"KH ResNet-{depth} eval", kaiminghe_ours(depth), KaimingHePreResNet(depth), 32)


# ----------------------------------------------------------------------------
# Train mode: batch statistics and the running-statistics update.


def compare_train(case, ours, twin, size):
  transfer = Transfer(ours, twin)
  before = [(_numpy(o.mean), _numpy(o.var)) for _, o in transfer.bn_pairs]
  counts = {}  # per twin BN: values per channel it normalised, N * H * W
  hooks = [t.register_forward_hook(
      lambda m, inputs, _: counts.__setitem__(id(m), inputs[0].numel() // inputs[0].shape[1]))
      for t, _ in transfer.bn_pairs]
  ours.train()
  twin.train()
  assert_logits_match(case, *run_both(ours, twin, images(size, batch=8, seed=3)), mode="train")
  for hook in hooks:
    hook.remove()
  worst_mean = worst_var = 0.0
  for (t, o), (old_mean, old_var) in zip(transfer.bn_pairs, before):
    # Both: new = 0.9 old + 0.1 batch (PyTorch momentum 0.1 == our momentum 0.9).
    mean, var = _numpy(o.mean), _numpy(o.var)
    twin_mean, twin_var = t.running_mean.numpy(), t.running_var.numpy()
    assert not np.allclose(mean, old_mean)
    worst_mean = max(worst_mean, float(np.max(np.abs(mean - twin_mean))))
    # PyTorch feeds the running variance the unbiased batch variance (m / (m - 1)
    # times the biased one); nnx.BatchNorm the biased one it normalises with.
    m = counts[id(t)]
    twin_batch_var = (twin_var - 0.9 * old_var) / 0.1
    expected = 0.9 * old_var + 0.1 * twin_batch_var * (m - 1) / m
    scale = max(1.0, float(np.max(np.abs(twin_batch_var))))
    worst_var = max(worst_var, float(np.max(np.abs(var - expected))) / scale)
    np.testing.assert_allclose(mean, twin_mean, rtol=1e-4, atol=1e-4 * scale)
    np.testing.assert_allclose(var, expected, rtol=1e-4, atol=1e-4 * scale)
    if m < 1000:  # the two conventions are distinguishable at this precision
      assert not np.allclose(var, twin_var, rtol=1e-5, atol=0)
  print(f"{case}: {len(transfer.bn_pairs)} BNs, max |running mean diff| {worst_mean:.3g}, "
        f"max running var diff (biased convention) {worst_var:.3g}")


def test_cifar_train_mode_matches_fb_preresnet():
  compare_train("cifar_resnet20 A train", create("cifar_resnet20", shortcut="A"),
                fb_twin("cifar_resnet20", "A"), 32)


def test_resnet50_train_mode_matches_fb_preresnet():
  compare_train("resnet50 B stride_on_1x1=False train",
                create("resnet50", shortcut="B", stride_on_1x1=False),
                fb_twin("resnet50", "B"), 64)


# ----------------------------------------------------------------------------
# The paper's sentences, numerically.


def shortcut_of(block, x):
  out = block.intermediates(x)
  return np.asarray(out["output"] - out["residual_branch"][-1])


def perturb(norm):
  norm.scale[...] = -2.0 * norm.scale[...]
  norm.bias[...] = norm.bias[...] + 1.0


@pytest.mark.parametrize("shortcut", ["A", "B", "C"])
def test_shortcut_reads_activated_input_only_where_the_shape_changes(shortcut):
  model = create("cifar_resnet14", shortcut=shortcut)  # 2 units a stage
  model.eval()
  x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 16, 16, 16)), jnp.float32)
  keeps, changes = model.blocks[1], model.blocks[2]  # 16 -> 16; 16 -> 32, stride 2
  assert not keeps.reshapes and changes.reshapes
  assert keeps.input_norm is not None and changes.input_norm is not None

  before = shortcut_of(keeps, x)
  if shortcut != "C":
    np.testing.assert_allclose(before, x, atol=1e-5)  # the raw x_l, negatives and all
  perturb(keeps.input_norm)
  np.testing.assert_allclose(shortcut_of(keeps, x), before, atol=1e-5)

  before = shortcut_of(changes, x)
  activated = nnx.relu(changes.input_norm(x))
  expected = (changes.projection(activated) if changes.projection is not None
              else changes.identity(activated))
  np.testing.assert_allclose(before, expected, atol=1e-5)
  perturb(changes.input_norm)
  assert np.max(np.abs(shortcut_of(changes, x) - before)) > 0.1


@pytest.mark.parametrize("name", ["cifar_resnet8", "resnet18"])
def test_first_unit_splits_after_the_stem_activation(name):
  # "for the first Residual Unit (that follows a stand-alone convolutional layer,
  # conv1), we adopt the first activation right after conv1 and before splitting
  # into two paths".
  model = create(name)
  model.eval()
  first = model.blocks[0]
  assert first.input_norm is None and len(first.norms) == len(first.convs) - 1
  x = jnp.asarray(images(32 if name.startswith("cifar") else 64))
  out = model.intermediates(x)
  np.testing.assert_array_equal(np.asarray(out["stem"]), np.asarray(nnx.relu(out["stem_norm"])))

  def first_input(stem):  # An ImageNet stem's max pool follows its BN-ReLU.
    if not model.imagenet_stem:
      return stem
    return nnx.max_pool(stem, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

  stem = first_input(out["stem"])
  assert float(jnp.min(stem)) == 0.0
  # The first block is what reads it: its output is the net's.
  np.testing.assert_array_equal(np.asarray(first(stem)), np.asarray(out["block1"]))
  # Both paths read the activated stem; the block adds no BN-ReLU of its own:
  # on a raw input with negatives, its first conv and its shortcut see it as is.
  block = first.intermediates(stem)
  branch_input = first.convs[0](stem)
  np.testing.assert_allclose(np.asarray(block["residual_branch"][0]), np.asarray(branch_input),
                             atol=1e-6)
  np.testing.assert_allclose(shortcut_of(first, stem), np.asarray(
      first.projection(stem) if first.projection is not None else first.identity(stem)),
      atol=1e-5)
  raw = jnp.asarray(np.random.default_rng(4).normal(size=stem.shape), jnp.float32)
  np.testing.assert_allclose(np.asarray(first.intermediates(raw)["residual_branch"][0]),
                             np.asarray(first.convs[0](raw)), atol=1e-6)
  # The stem BN is the only BN before the split: perturbing it moves the shortcut.
  before = shortcut_of(first, first_input(model.intermediates(x)["stem"]))
  perturb(model.stem_norm)
  after = shortcut_of(first, first_input(model.intermediates(x)["stem"]))
  assert np.max(np.abs(after - before)) > 0.1


@pytest.mark.parametrize("name", ["cifar_resnet8", "resnet18"])
def test_extra_activation_after_the_last_addition(name):
  # "for the last Residual Unit (followed by average pooling and a fully-connected
  # classifier), we adopt an extra activation right after its element-wise addition".
  model = create(name)
  model.eval()
  out = model.intermediates(jnp.asarray(images(32 if name.startswith("cifar") else 64)))
  last = out[f"block{len(model.blocks)}"]
  assert float(jnp.min(last)) < 0  # units end in the raw sum, no ReLU
  expected = jnp.mean(nnx.relu(model.final_norm(last)), axis=(1, 2))
  np.testing.assert_allclose(np.asarray(out["pooled"]), np.asarray(expected), atol=1e-6)
  logits = np.asarray(out["logits"])
  perturb(model.final_norm)
  assert np.max(np.abs(np.asarray(model(jnp.asarray(images(32 if name.startswith("cifar")
                                                           else 64)))) - logits)) > 0.1
