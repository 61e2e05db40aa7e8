"""`pretrained.from_torchvision` / `to_torchvision` reproduce torchvision ResNets exactly."""
import copy
import functools
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from flax import nnx

from resnet_jax import models
from resnet_jax.models import pretrained

import torchvision_resnet
import torch_twins

SIZE, CLASSES = 64, 10  # 64x64 input keeps a 2x2 final map at a fraction of 224's cost.

# torchvision's published parameter counts (1000 classes), a check that the twin is its net.
TORCHVISION_PARAMS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
                      "resnet101": 44_549_160, "resnet152": 60_192_808}


def _twin(name: str, seed: int = 0) -> torch.nn.Module:
  """torchvision's net with random weights and non-trivial BN statistics and affine
  parameters (0/1 at init would leave the BN mapping untested), in eval mode."""
  torch.manual_seed(seed)
  return torch_twins.randomised(getattr(torchvision_resnet, name)(num_classes=CLASSES), seed)


def _images(seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)


def _torch_logits(net: torch.nn.Module, x: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return net(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()  # NHWC -> NCHW.


def _numpy_state(net: torch.nn.Module) -> dict[str, np.ndarray]:
  return {key: value.numpy() for key, value in net.state_dict().items()}


@pytest.fixture(scope="module")
def resnet18():
  return _twin("resnet18")


# Each depth takes 2-10 s on two loaded cores (ResNet-152 the most), so none is `slow`.
@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"])
def test_logits_match_torchvision(name):
  net = _twin(name)
  x = _images()
  expected = _torch_logits(net, x)

  model = pretrained.from_torchvision(net.state_dict(), name)
  logits = np.asarray(model(x))

  # The eval-mode BN does not renormalise, so random statistics let activations
  # grow with depth: logits reach ~1 (ResNet-18) to ~5e6 (ResNet-152). float32
  # round-off differs between oneDNN and XLA convolutions (summation order) and
  # follows that scale, not each logit's size, hence the scale-relative atol.
  # Measured max |difference| / scale: 7e-7 to 1.8e-6 over ResNet-18 to 152 and
  # seeds; 1e-5 leaves >5x headroom and still catches any mis-copied layer.
  scale = np.abs(expected).max()
  error = np.abs(logits - expected).max()
  print(f"{name}: max |logit difference| {error:.3g}, logit scale {scale:.3g}, "
        f"relative {error / scale:.3g}")
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5 * scale)

  thousand_classes = 1000 * (net.fc.in_features + 1) - CLASSES * (net.fc.in_features + 1)
  assert models.count_params(model) + thousand_classes == TORCHVISION_PARAMS[name]
  assert models.count_params(model) == sum(p.numel() for p in net.parameters())


def test_pth_file(resnet18, tmp_path):
  path = tmp_path / "resnet18.pth"
  torch.save(resnet18.state_dict(), path)
  x = _images()
  np.testing.assert_array_equal(
      np.asarray(pretrained.from_torchvision(path, "resnet18")(x)),
      np.asarray(pretrained.from_torchvision(resnet18.state_dict(), "resnet18")(x)))


def test_npz_file_needs_no_torch(resnet18, tmp_path, monkeypatch):
  path = tmp_path / "resnet18.npz"
  np.savez(path, **_numpy_state(resnet18))
  expected = np.asarray(pretrained.from_torchvision(resnet18.state_dict(), "resnet18")(_images()))
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails.
  np.testing.assert_array_equal(
      np.asarray(pretrained.from_torchvision(str(path), "resnet18")(_images())), expected)
  torch_file = tmp_path / "resnet18.pth"
  torch_file.write_bytes(b"")
  with pytest.raises(ValueError, match=r"needs PyTorch, which is not installed.*\.npz"):
    pretrained.from_torchvision(torch_file, "resnet18")


def test_train_mode_batch_norm_matches(resnet18):
  net = copy.deepcopy(resnet18).train()
  model = pretrained.from_torchvision(net.state_dict(), "resnet18")
  model.train()
  x = _images(seed=1)
  expected = _torch_logits(net, x)  # Normalises by the batch, updates the statistics.
  logits = np.asarray(model(x))
  scale = np.abs(expected).max()
  print(f"train mode: max |logit difference| {np.abs(logits - expected).max():.3g}, "
        f"logit scale {scale:.3g}")
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5 * scale)

  # Our momentum 0.9 is torch's 0.1: the updated running means agree.
  updated = pretrained.to_torchvision(model)
  for key, value in net.state_dict().items():
    if key.endswith("running_mean"):
      np.testing.assert_allclose(updated[key], value.numpy(), rtol=1e-4, atol=1e-5, err_msg=key)
  # The variances differ by design: torch's update uses the unbiased batch
  # variance, n / (n - 1) times flax's; n = 2 images x 2 x 2 pixels in layer4.
  key, n = "layer4.1.bn2.running_var", 2 * 2 * 2
  before = 0.9 * resnet18.state_dict()[key].numpy()
  np.testing.assert_allclose(net.state_dict()[key].numpy() - before,
                             (updated[key] - before) * n / (n - 1), rtol=1e-3)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_round_trip(name, resnet18, tmp_path):
  """to_torchvision inverts from_torchvision, and its output (written without torch)
  loads into torchvision strictly: the route for JAX-trained weights into PyTorch."""
  net = resnet18 if name == "resnet18" else _twin(name)
  state = _numpy_state(net)
  back = pretrained.to_torchvision(pretrained.from_torchvision(state, name))
  assert list(back) == list(state)  # torchvision's keys, in its order.
  for key, value in state.items():
    assert back[key].dtype == value.dtype, key
    np.testing.assert_array_equal(back[key], value, err_msg=key)

  path = tmp_path / f"{name}.npz"
  np.savez(path, **back)
  reloaded = getattr(torchvision_resnet, name)(num_classes=CLASSES).eval()
  reloaded.load_state_dict({k: torch.from_numpy(v) for k, v in np.load(path).items()},
                           strict=True)
  x = _images()
  np.testing.assert_array_equal(_torch_logits(reloaded, x), _torch_logits(net, x))


def _without(state, key):
  return {k: v for k, v in state.items() if k != key}


@pytest.mark.parametrize("edit, name, message", [
    (lambda s: s, "resnet20", r"Unknown torchvision ResNet 'resnet20'; valid: resnet18, "),
    (lambda s: _without(s, "layer1.0.conv1.weight"), "resnet18",
     r"not a torchvision resnet18: 1 missing keys \(layer1\.0\.conv1\.weight\)"),
    (lambda s: s, "resnet34", r"not a torchvision resnet34: 80 missing keys \(layer1\.2\.conv1"),
    (lambda s: s, "resnet50", r"not a torchvision resnet50: .* missing keys \(layer1\.0\.conv3"),
    (lambda s: {"module." + k: v for k, v in s.items()}, "resnet18",
     r"missing keys \(conv1\.weight, bn1\.weight, .* and \d+ more\); strip the 'module\.' "
     r"prefix"),
    (lambda s: {**s, "extra.weight": s["fc.bias"]}, "resnet18",
     r"1 unexpected keys \(extra\.weight\)"),
    (lambda s: {**s, "layer2.0.conv1.weight": s["layer2.0.conv2.weight"]}, "resnet18",
     r"key 'layer2\.0\.conv1\.weight' has shape \(128, 128, 3, 3\), torchvision's resnet18 "
     r"expects \(128, 64, 3, 3\)"),
    (lambda s: {**s, "fc.weight": s["fc.weight"].T}, "resnet18",
     r"key 'fc\.weight' has shape \(512, 10\), torchvision's resnet18 expects \(512, 512\)"),
], ids=["unknown_name", "missing_key", "wrong_depth", "basic_as_bottleneck", "prefixed_keys",
        "unexpected_key", "wrong_shape", "transposed_fc"])
def test_bad_state_dict_is_a_clear_error(resnet18, edit, name, message):
  with pytest.raises(ValueError, match=message):
    pretrained.from_torchvision(edit(_numpy_state(resnet18)), name)


def test_bad_file_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match=r"State dict file '.*missing\.pth' does not exist"):
    pretrained.from_torchvision(tmp_path / "missing.pth", "resnet18")
  for suffix, kind in [(".pth", "a PyTorch"), (".npz", "a .npz")]:
    path = tmp_path / f"corrupt{suffix}"
    path.write_bytes(b"not a state dict")
    with pytest.raises(ValueError, match=f"Cannot read '.*corrupt{suffix}' as {kind} state dict"):
      pretrained.from_torchvision(path, "resnet18")
  with pytest.raises(ValueError, match=r"reads \.pth, \.pt \(PyTorch\) or \.npz"):
    pretrained.from_torchvision(tmp_path / "weights.h5", "resnet18")
  whole_model = tmp_path / "model.pth"
  torch.save([torch.zeros(1)], whole_model)
  with pytest.raises(ValueError, match="holds a list, not a state dict"):
    pretrained.from_torchvision(whole_model, "resnet18")


@pytest.mark.parametrize("name, options, message", [
    ("cifar_resnet20", {}, "CIFAR network"),
    ("resnet50", {}, r"first 1x1 conv \(stride_on_1x1=True\)"),
    ("resnet18", {"shortcut": "A"}, "shortcut is 'A'"),
    ("resnet50", {"shortcut": "C", "stride_on_1x1": False}, "shortcut is 'C'"),
    ("plain18", {}, "shortcut is None"),
    ("resnet18", {"preact": True}, "PreActivationBlocks"),
    ("resnet18", {"num_classes": 0}, "headless"),
], ids=["cifar", "stride_on_1x1", "shortcut_a", "shortcut_c", "plain", "preact", "headless"])
def test_to_torchvision_rejects_other_layouts(name, options, message):
  options = {"num_classes": CLASSES, **options}
  model = nnx.eval_shape(lambda: models.create(name, rngs=nnx.Rngs(0), **options))
  with pytest.raises(ValueError, match=f"torchvision has no layout for this model: .*{message}"):
    pretrained.to_torchvision(model)


def test_to_torchvision_rejects_other_widths():
  model = nnx.eval_shape(lambda: models.ResNet(
      block_cls=functools.partial(models.PostActivationBlock, shortcut="B"),
      stage_sizes=(2, 2, 2, 2), stage_widths=(32, 64, 128, 256), imagenet_stem=True,
      num_classes=CLASSES, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"our conv1\.weight has shape \(7, 7, 3, 32\) where "
                     r"torchvision's resnet18 has \(7, 7, 3, 64\)"):
    pretrained.to_torchvision(model)
