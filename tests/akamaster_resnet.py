"""akamaster/pytorch_resnet_cifar10's CIFAR ResNets in PyTorch, for tests without his repository.

Written from his `resnet.py` so that module names, state-dict keys and the
forward pass are exactly his: a 3x3 stem conv and BN, three stages (`layer1` to
`layer3`, 16/32/64 filters) of basic blocks whose shortcut, where the shape
changes, is option A: subsample by 2 and zero-pad `planes // 4` channels before
the old ones and as many after (his `LambdaLayer` around `F.pad`; it has no
parameters, so no keys), or option B: `shortcut.0` a 1x1 conv and `shortcut.1`
a BN. Then `avg_pool2d` over the map's width and `linear`. His initialisation
(He normal for convs and the Linear) is kept. The one addition: `option` on
the nets, which his code fixes to 'A' (his blocks take it), so that a network
of option B blocks can be built. Test-only: it imports torch.

    net = resnet(20).eval()  # His resnet20().
    torch.save({"state_dict": {"module." + k: v for k, v in net.state_dict().items()}}, path)
    pretrained.from_akamaster(path)
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class PadShortcut(nn.Module):
  """His option A: every other pixel, and `pad` zero channels on each side of the old ones."""

  def __init__(self, pad: int):
    super().__init__()
    self.pad = pad

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0)


class BasicBlock(nn.Module):

  def __init__(self, in_planes: int, planes: int, stride: int = 1, option: str = "A"):
    super().__init__()
    self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1,
                           bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.shortcut = nn.Sequential()
    if stride != 1 or in_planes != planes:
      if option == "A":
        self.shortcut = PadShortcut(planes // 4)
      else:
        self.shortcut = nn.Sequential(
            nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
            nn.BatchNorm2d(planes))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):

  def __init__(self, num_blocks: list[int], num_classes: int = 10, option: str = "A"):
    super().__init__()
    self.in_planes = 16
    self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(16)
    self.layer1 = self._make_layer(16, num_blocks[0], 1, option)
    self.layer2 = self._make_layer(32, num_blocks[1], 2, option)
    self.layer3 = self._make_layer(64, num_blocks[2], 2, option)
    self.linear = nn.Linear(64, num_classes)
    for module in self.modules():
      if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.kaiming_normal_(module.weight)

  def _make_layer(self, planes: int, num_blocks: int, stride: int, option: str) -> nn.Sequential:
    blocks = []
    for block_stride in [stride] + [1] * (num_blocks - 1):
      blocks.append(BasicBlock(self.in_planes, planes, block_stride, option))
      self.in_planes = planes
    return nn.Sequential(*blocks)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.layer3(self.layer2(self.layer1(out)))
    out = F.avg_pool2d(out, out.size()[3])
    return self.linear(out.view(out.size(0), -1))


def resnet(depth: int, **options) -> ResNet:
  """His resnet20/32/44/56/110/1202 for depth 20/32/44/56/110/1202 (any 6n+2)."""
  return ResNet([(depth - 2) // 6] * 3, **options)

