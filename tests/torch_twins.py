"""What the PyTorch twins' tests share (tests/torchvision_resnet.py, tests/akamaster_resnet.py).
Test-only: it imports torch."""
import torch


def randomised(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  """`net` in eval mode, its convs and Linear weights drawn from `torch.manual_seed(seed)` by
  its own initialisation (the caller builds it after `torch.manual_seed(seed)`), and its BN
  affine parameters, running statistics and Linear biases random: the 1/0 defaults would leave
  their mapping untested."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in net.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        n = module.num_features
        module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
        module.bias.copy_(0.1 * torch.randn(n, generator=generator))
        module.running_mean.copy_(0.5 * torch.randn(n, generator=generator))
        module.running_var.copy_(1.5 * torch.rand(n, generator=generator) + 0.5)
      elif isinstance(module, torch.nn.Linear):
        module.bias.copy_(torch.randn(module.bias.shape, generator=generator))
  return net.eval()
