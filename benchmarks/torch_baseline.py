"""PyTorch baseline of the paper's networks (eager or torch.compile), side by side with resnet_jax.

    python benchmarks/torch_baseline.py --model=cifar_resnet20 --batch=128            # PyTorch only
    python benchmarks/torch_baseline.py --model=cifar_resnet20 --batch=128 --compare  # both + ratio
    python benchmarks/torch_baseline.py --model=resnet50 --batch=256 --dtype=bfloat16 \
        --compile=max-autotune --compare                                # a GPU, compiled

The networks match resnet_jax.models: CIFAR nets with option-A shortcuts
(stride-2 subsampling, zero-padded channels), ImageNet nets with option-B
projections and the stride in the bottleneck's first 1x1 conv (the paper;
torchvision's v1.5 moves it to the 3x3, so torchvision is not used). Batch norm
momentum 0.1 in torch terms (0.9 in Flax terms), eps 1e-5. A training step is
the same as resnet_jax's: cross-entropy, backward, SGD with momentum 0.9 and
weight decay 1e-4. Evaluation is an inference-mode forward pass plus the top-1
error count. PyTorch uses as many threads as the machine has cores, with
passive OpenMP waiting (OMP_WAIT_POLICY, unless set): its fastest setting here.
On a CUDA device (the default where one is visible) bfloat16 is autocast, the
step can be compiled (--compile=default | reduce-overhead | max-autotune; eager
by default), and every timed repeat ends in torch.cuda.synchronize.

With --compare, the JAX and PyTorch steps are timed in alternating repeats, so
both see the same background load. The JAX side runs in a child process,
`python -m resnet_jax.tools.benchmark --serve` (each repeat on request), of the
interpreter `--jax_python` names (default: this one), so the two can come from
different environments: the newest jax needs Python 3.12, PyTorch 2.13 may not
install there. PyTorch is a benchmark-only extra (`pip install -e .[benchmark]`);
the resnet_jax package never imports it.

    python3 benchmarks/torch_baseline.py --compare --jax_python=$HOME/venv312/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

# OpenMP threads that sleep when idle instead of spinning: with the default
# (spinning) on this shared 2-core VM, PyTorch's 2-thread training step took
# 3.0 s instead of 0.26 s whenever another process held a core. Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # pylint: disable=g-import-not-at-top
import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
from torch import nn  # pylint: disable=g-import-not-at-top

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

IMAGENET_STAGES = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
                   50: ("bottleneck", (3, 4, 6, 3)), 101: ("bottleneck", (3, 4, 23, 3)),
                   152: ("bottleneck", (3, 8, 36, 3))}


def conv_bn(c_in: int, c_out: int, kernel: int, stride: int) -> list[nn.Module]:
  return [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False),
          nn.BatchNorm2d(c_out, eps=1e-5, momentum=0.1)]


class Block(nn.Module):
  """A basic (3x3, 3x3) or bottleneck (1x1, 3x3, 1x1) residual unit."""

  def __init__(self, c_in: int, layers: list[tuple[int, int, int]], shortcut: str):
    super().__init__()
    modules, features = [], c_in
    for kernel, c_out, stride in layers:
      modules += conv_bn(features, c_out, kernel, stride)
      features = c_out
    self.layers = nn.ModuleList(modules)
    self.stride = max(stride for _, _, stride in layers)
    self.extra = features - c_in
    reshapes = self.stride != 1 or self.extra
    self.projection = (nn.Sequential(*conv_bn(c_in, features, 1, self.stride))
                       if shortcut == "B" and reshapes else None)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = x
    for i in range(0, len(self.layers), 2):
      y = self.layers[i + 1](self.layers[i](y))
      if i + 2 < len(self.layers):
        y = F.relu(y)
    if self.projection is not None:
      shortcut = self.projection(x)
    else:  # Option A: subsample, then zero-pad the new channels.
      shortcut = x[:, :, ::self.stride, ::self.stride]
      if self.extra:
        shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.extra))
    return F.relu(y + shortcut)


class ResNet(nn.Module):

  def __init__(self, name: str, num_classes: int):
    super().__init__()
    match = re.fullmatch(r"(cifar_)?resnet(\d+)", name)
    if not match:
      raise ValueError(f"unknown model {name!r}: cifar_resnet{{6n+2}} or resnet{{18..152}}")
    depth = int(match.group(2))
    if match.group(1):
      if (depth - 2) % 6:
        raise ValueError(f"CIFAR depth must be 6n+2, got {depth}")
      kind, sizes, widths, stem, shortcut = "basic", ((depth - 2) // 6,) * 3, (16, 32, 64), 16, "A"
      self.stem = nn.Sequential(*conv_bn(3, stem, 3, 1), nn.ReLU())
    else:
      kind, sizes = IMAGENET_STAGES[depth]
      widths, stem, shortcut = (64, 128, 256, 512), 64, "B"
      self.stem = nn.Sequential(*conv_bn(3, stem, 7, 2), nn.ReLU(),
                                nn.MaxPool2d(3, stride=2, padding=1))
    blocks, features = [], stem
    for stage, (num_blocks, width) in enumerate(zip(sizes, widths)):
      for index in range(num_blocks):
        stride = 2 if stage > 0 and index == 0 else 1
        layers = ([(3, width, stride), (3, width, 1)] if kind == "basic"
                  else [(1, width, stride), (3, width, 1), (1, 4 * width, 1)])
        blocks.append(Block(features, layers, shortcut))
        features = layers[-1][1]
    self.blocks = nn.Sequential(*blocks)
    self.head = nn.Linear(features, num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class TorchRunner:
  """The `resnet_jax.tools.benchmark.Runner` interface for a PyTorch step on `device`."""

  def __init__(self, step, device: torch.device, warmup: int = 3):
    self._step, self._device = step, device
    start = time.perf_counter()
    for _ in range(warmup):  # Compilation, oneDNN's and cuDNN's kernel choices: first calls.
      step()
    self._synchronize()
    self.compile_s = time.perf_counter() - start

  def _synchronize(self) -> None:
    if self._device.type == "cuda":
      torch.cuda.synchronize(self._device)

  def run(self, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
      self._step()
    self._synchronize()
    return (time.perf_counter() - start) / steps


class JaxServer:
  """`python -m resnet_jax.tools.benchmark --serve` in a child process of `python`: resnet_jax's
  "train" and "eval" steps, timed on request."""

  def __init__(self, python: str, model: str, batch: int, dtype: str):
    # On a GPU, JAX takes memory as it needs it, not 75% up front: PyTorch shares the device.
    env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", **os.environ}
    # Batch norm over the whole batch, as nn.BatchNorm2d's: the same work on both sides.
    self._process = subprocess.Popen(
        [python, "-m", "resnet_jax.tools.benchmark", f"--model={model}", f"--batch={batch}",
         f"--dtype={dtype}", "--batch_norm_group=0", "--serve"],
        cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    self._header = None

  def header(self) -> dict:
    """The `--serve` header ({"jax", "python", "device", "compile_s"}), once the steps compile."""
    if self._header is None:
      line = self._process.stdout.readline()
      if not line:
        raise RuntimeError(f"the JAX side exited with status {self._process.wait()}")
      self._header = json.loads(line)
    return self._header

  def runner(self, name: str) -> "JaxRunner":
    return JaxRunner(self, name, self.header()["compile_s"][name])

  def run(self, name: str, steps: int) -> float:
    self._process.stdin.write(f"{name} {steps}\n")
    self._process.stdin.flush()
    return float(self._process.stdout.readline())

  def close(self) -> None:
    self._process.stdin.close()
    self._process.wait()


class JaxRunner:
  """The runner interface for one step of a `JaxServer`."""

  def __init__(self, server: JaxServer, name: str, compile_s: float):
    self._server, self._name, self.compile_s = server, name, compile_s

  def run(self, steps: int) -> float:
    return self._server.run(self._name, steps)


def torch_runners(model_name: str, batch: int, dtype: str, channels_last: bool,
                  device: torch.device, compile_mode: str | None) -> dict[str, TorchRunner]:
  torch.manual_seed(0)
  size, classes = (32, 10) if model_name.startswith("cifar_") else (224, 1000)
  memory_format = torch.channels_last if channels_last else torch.contiguous_format
  model = ResNet(model_name, classes).to(device=device, memory_format=memory_format)
  images = torch.randn(batch, 3, size, size, device=device).to(memory_format=memory_format)
  labels = torch.randint(0, classes, (batch,), device=device)
  optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
  autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
  forward = model if compile_mode is None else torch.compile(model, mode=compile_mode)

  def train_step():
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with autocast:
      loss = F.cross_entropy(forward(images).float(), labels)
    loss.backward()
    optimizer.step()

  errors = torch.zeros((), dtype=torch.int64, device=device)

  def eval_step():
    model.eval()
    with torch.inference_mode(), autocast:
      scores = torch.softmax(forward(images).float(), -1)
      errors.add_((scores.argmax(-1) != labels).sum())

  return {"train": TorchRunner(train_step, device), "eval": TorchRunner(eval_step, device)}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description="PyTorch baseline (and --compare).")
  parser.add_argument("--model", default="cifar_resnet20")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--steps", type=int, default=5, help="steps per timed repeat")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  parser.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=True,
                      help="NHWC tensors (oneDNN's fast layout on CPU; as resnet_jax)")
  parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                      help="cpu or cuda (default: cuda where one is visible)")
  parser.add_argument("--compile", default=None, dest="compile_mode",
                      choices=("default", "reduce-overhead", "max-autotune"),
                      help="torch.compile mode of the model (default: eager)")
  parser.add_argument("--compare", action="store_true", help="also time resnet_jax; print ratios")
  parser.add_argument("--jax_python", default=sys.executable,
                      help="interpreter of the JAX side of --compare (default: this one)")
  args = parser.parse_args(argv)
  torch.set_num_threads(args.threads)
  device = torch.device(args.device)

  # Started first: JAX compiles in its own process while PyTorch warms up here.
  server = JaxServer(args.jax_python, args.model, args.batch, args.dtype) if args.compare else None
  runners = {f"torch {name}": runner for name, runner in
             torch_runners(args.model, args.batch, args.dtype, args.channels_last, device,
                           args.compile_mode).items()}
  if server is not None:
    runners.update({f"jax {name}": server.runner(name) for name in ("train", "eval")})
    header = server.header()
    print(f"JAX {header['jax']} (Python {header['python']}, {args.jax_python}) on "
          f"{header['device']}")
  where = (torch.cuda.get_device_name(device) if device.type == "cuda"
           else f"cpu, {torch.get_num_threads()} threads")
  print(f"PyTorch {torch.__version__} (Python {platform.python_version()}) on {where}, "
        f"channels_last={args.channels_last}, {args.compile_mode or 'eager'}; {args.model}, "
        f"batch {args.batch}, {args.dtype}; "
        f"{args.repeats} alternating repeats of {args.steps} steps")

  times = {name: [] for name in runners}
  for _ in range(args.repeats):
    for name, runner in runners.items():
      times[name].append(runner.run(args.steps))
  speed = {}
  for name, step_s in times.items():
    median = statistics.median(step_s)
    speed[name] = args.batch / median
    print(f"{name:<11} median {median * 1e3:9.2f} ms  (min {min(step_s) * 1e3:.1f}, max "
          f"{max(step_s) * 1e3:.1f})  {speed[name]:9.1f} images/s  "
          f"(compile/warm-up {runners[name].compile_s:.1f} s)")
  if server is not None:
    server.close()
    for mode in ("train", "eval"):
      # Also per repeat: the two ran back to back, so each ratio saw one machine load.
      paired = [t / j for t, j in zip(times[f"torch {mode}"], times[f"jax {mode}"])]
      print(f"{mode}: jax/torch images/s = {speed[f'jax {mode}'] / speed[f'torch {mode}']:.2f}x "
            f"(per repeat {statistics.median(paired):.2f}x, {min(paired):.2f}-{max(paired):.2f})")


if __name__ == "__main__":
  main()
