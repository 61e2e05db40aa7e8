"""Backbone features of a headless ResNet: C2 to C5 and the pooled features, under jit.

    python examples/feature_extraction.py --model=resnet50 --image_size=224 --batch=2
    python examples/feature_extraction.py --torchvision_weights=resnet50.pth   # pretrained

Builds `models.create(name, num_classes=0)` (no classifier: its call returns the
pooled features), or with --torchvision_weights the torchvision network in that
file less its classifier, puts it in eval mode and prints the shape of every
feature map that `model.intermediates` returns for a batch of random images.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from resnet_jax import models
from resnet_jax.models import pretrained

# torchvision's ImageNet normalisation of RGB images in [0, 1].
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)

# The detection literature's names for the outputs of the four stages (strides 4 to 32).
FEATURES = {"C2": "stage1", "C3": "stage2", "C4": "stage3", "C5": "stage4", "pooled": "pooled"}


@nnx.jit
def extract(model: models.ResNet, images: jax.Array) -> dict[str, jax.Array]:
  out = model.intermediates(images)
  # Only what is returned is computed: XLA drops the other intermediates.
  return {name: out[key] for name, key in FEATURES.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="resnet50", help="resnet18, 34, 50, 101 or 152")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--torchvision_weights", metavar="PATH",
                      help="a torchvision state dict (.pth, .pt or .npz) of --model")
  args = parser.parse_args()

  if args.torchvision_weights:
    try:
      model = pretrained.from_torchvision(args.torchvision_weights, args.model)
    except ValueError as error:  # A missing, unreadable or mismatched file: one line, status 2.
      print(f"error: {error}", file=sys.stderr)
      sys.exit(2)
    model.head = None  # Headless: the call returns the pooled features.
  else:
    model = models.create(args.model, num_classes=0, rngs=nnx.Rngs(0))
  model.eval()  # A new model is in training mode, which would update the BN statistics.

  pixels = np.random.default_rng(0).integers(
      0, 256, (args.batch, args.image_size, args.image_size, 3), np.uint8)
  images = jnp.asarray((pixels / 255 - IMAGENET_MEAN) / IMAGENET_STD, jnp.float32)
  for name, value in extract(model, images).items():
    print(f"{name}: {tuple(value.shape)} {value.dtype}")


if __name__ == "__main__":
  main()
