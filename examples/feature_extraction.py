"""Backbone features of a ResNet: C1 to C5 and the pooled features, under jit.

    python examples/feature_extraction.py --model=resnet50 --image_size=224 --batch=2
    python examples/feature_extraction.py --torchvision_weights=resnet50.pth   # pretrained

Builds `models.create(name, num_classes=0)` (headless: its call returns the pooled
features), or with --torchvision_weights the torchvision network in that file,
puts it in eval mode and prints, for a batch of random images, each feature map
that `model.feature_info` lists ("stem" and the stages: C1 to C5, at strides 2 to
32) with its stride, and the pooled features. Only these are computed: under jit,
XLA drops the rest of `model.intermediates`, the classifier included.
"""

from __future__ import annotations

import argparse
import sys

import jax
import numpy as np
from flax import nnx

from resnet_jax import models
from resnet_jax.models import pretrained


@nnx.jit
def extract(model: models.ResNet, images: jax.Array) -> dict[str, jax.Array]:
  out = model.intermediates(images)
  return {name: out[name] for name in [info.name for info in model.feature_info] + ["pooled"]}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="resnet50", help="resnet18, 34, 50, 101 or 152")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--torchvision_weights", metavar="PATH",
                      help="a torchvision state dict (.pth, .pt or .npz) of --model")
  args = parser.parse_args()

  try:
    if args.torchvision_weights:
      model = pretrained.from_torchvision(args.torchvision_weights, args.model)
    else:
      model = models.create(args.model, num_classes=0, rngs=nnx.Rngs(0))
  except ValueError as error:  # A missing, unreadable or mismatched file, an unknown --model.
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  model.eval()  # A new model is in training mode, which would update the BN statistics.

  pixels = np.random.default_rng(0).integers(
      0, 256, (args.batch, args.image_size, args.image_size, 3), np.uint8)
  # RGB pixels in [0, 255], normalised as torchvision's weights expect.
  features = extract(model, pretrained.TORCHVISION_PREPROCESSING(pixels))
  for info in model.feature_info:
    print(f"{info.name}: {tuple(features[info.name].shape)} {features[info.name].dtype}, "
          f"stride {info.stride}")
  print(f"pooled: {tuple(features['pooled'].shape)} {features['pooled'].dtype}")


if __name__ == "__main__":
  main()
