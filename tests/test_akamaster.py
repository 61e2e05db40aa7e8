"""`pretrained.from_akamaster` reproduces akamaster/pytorch_resnet_cifar10's CIFAR ResNets exactly."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from resnet_jax import models
from resnet_jax.models import pretrained

import akamaster_resnet
import torch_twins

CLASSES = 10
# His trainer's transforms.Normalize, after ToTensor's scaling to [0, 1].
MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])


def _twin(depth: int, seed: int = 0, option: str = "A") -> torch.nn.Module:
  """His net with random weights and random BN affine parameters and running statistics
  (0/1 at init would leave the BN mapping untested), in eval mode."""
  torch.manual_seed(seed)
  net = akamaster_resnet.resnet(depth, num_classes=CLASSES, option=option)
  return torch_twins.randomised(net, seed)


def _pixels(seed: int = 0) -> np.ndarray:
  """NHWC RGB pixels in [0, 255], as a CIFAR-10 image file holds them."""
  return np.random.default_rng(seed).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)


def _his_input(pixels: np.ndarray) -> torch.Tensor:
  """His trainer's input: ToTensor (NCHW, / 255), then Normalize."""
  x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(255)
  return (x - MEAN[:, None, None]) / STD[:, None, None]


def _his_logits(net: torch.nn.Module, pixels: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return net(_his_input(pixels)).numpy()


def _our_logits(model: models.ResNet, pixels: np.ndarray) -> np.ndarray:
  return np.asarray(model(pretrained.AKAMASTER_PREPROCESSING(pixels)))


def _save_checkpoint(net: torch.nn.Module, path) -> None:
  """As his trainer saves a DataParallel model: keys under 'module.', beside best_prec1."""
  state = {"module." + key: value for key, value in net.state_dict().items()}
  torch.save({"state_dict": state, "best_prec1": 91.78}, path)


def _numpy_state(net: torch.nn.Module) -> dict[str, np.ndarray]:
  return {key: value.numpy() for key, value in net.state_dict().items()}


@pytest.fixture(scope="module")
def resnet20():
  return _twin(20)


def _assert_close(logits: np.ndarray, expected: np.ndarray, what: str) -> None:
  # float32 round-off differs between oneDNN and XLA convolutions (summation order), and
  # between normalising [0, 1] pixels and normalising [0, 255] ones; it follows the logits'
  # scale (random BN statistics let activations grow with depth), hence a scale-relative atol.
  # Measured max |difference| / scale: 2e-7 to 7e-7 (ResNet-20 A and B, ResNet-56); 1e-5
  # leaves >10x headroom and still catches a mis-copied or mis-ordered channel: copied
  # without the reordering, the logits differ by 0.2 to 60 times themselves.
  scale = np.abs(expected).max()
  error = np.abs(logits - expected).max()
  print(f"{what}: max |logit difference| {error:.3g}, logit scale {scale:.3g}, "
        f"relative {error / scale:.3g}")
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("depth", [20, 56])
def test_logits_match_his_checkpoint_file(depth, tmp_path):
  net = _twin(depth)
  path = tmp_path / f"resnet{depth}.th"
  _save_checkpoint(net, path)
  pixels = _pixels()

  model = pretrained.from_akamaster(path, f"cifar_resnet{depth}")

  _assert_close(_our_logits(model, pixels), _his_logits(net, pixels), f"resnet{depth}")
  assert [block.shortcut for block in model.blocks] == ["A"] * len(net.layer1) * 3
  assert models.count_params(model) == sum(p.numel() for p in net.parameters())


def test_option_b_blocks_are_our_option_b(tmp_path):
  """His BasicBlock(option='B'): a 1x1 conv and BN projection, loaded as our option B."""
  net = _twin(20, option="B")
  model = pretrained.from_akamaster(_numpy_state(net))
  assert [block.shortcut for block in model.blocks] == ["B"] * 9
  pixels = _pixels(seed=1)
  _assert_close(_our_logits(model, pixels), _his_logits(net, pixels), "resnet20 option B")


def _stage_outputs(net: torch.nn.Module, pixels: np.ndarray) -> list[np.ndarray]:
  """His layer1..3 outputs, NHWC."""
  with torch.no_grad():
    x = torch.relu(net.bn1(net.conv1(_his_input(pixels))))
    outputs = []
    for layer in (net.layer1, net.layer2, net.layer3):
      x = layer(x)
      outputs.append(x.permute(0, 2, 3, 1).numpy())
  return outputs


def test_stream_channels_are_reordered(resnet20):
  """His option A puts a stage's input channels in the middle of the wider stream (8 zero
  channels before 16, 8 after; then 16 before 32, 16 after), ours puts them first: our
  stage outputs are his with their channels reordered, and differ from his as they are."""
  pixels = _pixels()
  ours = pretrained.from_akamaster(_numpy_state(resnet20)).intermediates(
      pretrained.AKAMASTER_PREPROCESSING(pixels))
  his = _stage_outputs(resnet20, pixels)
  # For each of our channels, the index of his channel holding it.
  stage2 = np.r_[8:24, 0:8, 24:32]
  stage3 = np.r_[16 + stage2, 0:16, 48:64]
  for k, (order, his_output) in enumerate(zip([np.arange(16), stage2, stage3], his), start=1):
    ours_k = np.asarray(ours[f"stage{k}"])
    scale = np.abs(his_output).max()
    np.testing.assert_allclose(ours_k, his_output[..., order], rtol=1e-5, atol=1e-5 * scale)
    if k > 1:  # Unordered, the channels differ by about the activations' own size.
      assert np.abs(ours_k - his_output).max() > 0.1 * scale


def test_every_form_of_his_state_dict_gives_the_same_model(resnet20, tmp_path):
  """His checkpoint wrapper and DataParallel's 'module.' prefix are optional, in a mapping
  or a file; a .npz of the tensors needs no torch."""
  state = _numpy_state(resnet20)
  prefixed = {"module." + key: value for key, value in state.items()}
  npz = tmp_path / "resnet20.npz"
  np.savez(npz, **prefixed)
  th = tmp_path / "resnet20.th"
  _save_checkpoint(resnet20, th)
  pixels = _pixels()
  expected = _our_logits(pretrained.from_akamaster(th), pixels)
  for source in [state, prefixed, {"state_dict": prefixed, "best_prec1": 90.0},
                 {"state_dict": resnet20.state_dict(), "epoch": 200}, npz]:
    np.testing.assert_array_equal(_our_logits(pretrained.from_akamaster(source), pixels),
                                  expected)


def _without(state, key):
  return {k: v for k, v in state.items() if k != key}


@pytest.mark.parametrize("edit, name, message", [
    (lambda s: s, "cifar_resnet56",
     r"^The state dict is a cifar_resnet20 \(3 blocks per stage\), not the 'cifar_resnet56' "
     r"asked for; pass name='cifar_resnet20' or none\.$"),
    (lambda s: s, "resnet20", r"not the 'resnet20' asked for; pass name='cifar_resnet20'"),
    (lambda s: {k.replace("layer3.", "layer4."): v for k, v in s.items()}, None,
     r"^Not a CIFAR ResNet of akamaster/pytorch_resnet_cifar10: its keys \(conv1\.weight, "
     r"bn1\.weight, .* and \d+ more\) hold blocks of stages \[1, 2, 4\], not of stages 1, 2 "
     r"and 3\. from_akamaster reads his resnet\.py's state dicts, keys conv1\.weight, bn1\.\*"),
    (lambda s: {k: v for k, v in s.items() if not k.startswith("layer3.2.")}, None,
     r"its stages have 3, 3 and 2 blocks, not n each \(depth 6n\+2\)"),
    (lambda s: _without(s, "layer2.1.bn1.running_var"), None,
     r"1 keys of a cifar_resnet20 with option A shortcuts are missing "
     r"\(layer2\.1\.bn1\.running_var\)"),
    (lambda s: _without(s, "linear.weight"), None, r"missing \(linear\.weight\)"),
    (lambda s: {**s, "fc.weight": s["linear.weight"]}, None,
     r"1 keys are not a cifar_resnet20's with option A shortcuts \(fc\.weight\)"),
    (lambda s: {**s, "layer3.0.shortcut.0.weight": np.zeros((64, 32, 1, 1), np.float32)}, None,
     r"keys are not a cifar_resnet20's with option A shortcuts \(layer3\.0\.shortcut\.0\.weight"),
    (lambda s: {**s, "layer2.0.conv1.weight": s["layer2.0.conv2.weight"]}, None,
     r"key 'layer2\.0\.conv1\.weight' has shape \(32, 32, 3, 3\), a cifar_resnet20 expects "
     r"\(32, 16, 3, 3\)"),
], ids=["other_depth", "not_our_name", "other_stages", "unequal_stages", "missing_key",
        "missing_linear", "unexpected_key", "option_b_in_one_stage", "wrong_shape"])
def test_bad_state_dict_is_a_clear_error(resnet20, edit, name, message):
  with pytest.raises(ValueError, match=message):
    pretrained.from_akamaster(edit(_numpy_state(resnet20)), name)


def test_bad_file_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match=r"^State dict file '.*missing\.th' does not exist\.$"):
    pretrained.from_akamaster(tmp_path / "missing.th")
  corrupt = tmp_path / "corrupt.th"
  corrupt.write_bytes(b"not a checkpoint")
  with pytest.raises(ValueError, match=r"^Cannot read '.*corrupt\.th' as a PyTorch state dict"):
    pretrained.from_akamaster(corrupt)
  with pytest.raises(ValueError, match=r"from_akamaster reads \.th, \.pth, \.pt \(PyTorch\) or "
                     r"\.npz \(numpy\) state dicts\.$"):
    pretrained.from_akamaster(tmp_path / "weights.h5")
  whole_model = tmp_path / "model.th"
  torch.save([torch.zeros(1)], whole_model)
  with pytest.raises(ValueError, match="holds a list, not a state dict"):
    pretrained.from_akamaster(whole_model)
  with pytest.raises(ValueError, match=r"^from_akamaster takes a state dict .* or a "
                     r"\.th/\.pth/\.pt/\.npz path, got int\.$"):
    pretrained.from_akamaster(20)


def test_his_weights_score_through_the_evaluator_as_his_net_scores_the_same_pixels(tmp_path):
  """`evaluate --weights_format=akamaster`: his preprocessing applied in the evaluation step,
  to the raw pixels of the dataset the config names; the top-1 error is his net's own."""
  from resnet_jax import data  # pylint: disable=g-import-not-at-top
  from resnet_jax.configs import cifar_resnet20  # pylint: disable=g-import-not-at-top
  from resnet_jax.training import evaluate, loop  # pylint: disable=g-import-not-at-top

  net = _twin(20, seed=5)
  _save_checkpoint(net, tmp_path / "resnet20.th")
  config = cifar_resnet20.get_config("smoke")  # Synthetic 32x32 images, 10 classes.
  _, record = evaluate.evaluate_weights(tmp_path / "resnet20.th", "akamaster", config,
                                        tmp_path / "out", model="cifar_resnet20")
  dataset = loop.dataset_config(config)
  dataset.mean = "none"
  batches = list(data.create(dataset, data.core.make_mesh(), train=False).eval_batches(64))
  pixels = np.concatenate([np.asarray(b.images)[np.asarray(b.mask)] for b in batches])
  labels = np.concatenate([np.asarray(b.labels)[np.asarray(b.mask)] for b in batches])
  his_errors = np.sum(_his_logits(net, pixels.astype(np.uint8)).argmax(axis=1) != labels)
  assert np.array_equal(pixels, pixels.astype(np.uint8))  # Raw pixels, exactly.
  assert record["examples"] == len(labels) == 200
  assert record["top1_error"] == 100.0 * his_errors / len(labels)
  assert (record["weights_format"], record["model"]) == ("akamaster", "cifar_resnet20")
