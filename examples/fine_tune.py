"""Fine-tuning a ResNet on new classes, in your own nnx.jit step.

    python examples/fine_tune.py --torchvision_weights=resnet50.pth --model=resnet50 \
      --num_classes=10 --data=images.npz --steps=100
    python examples/fine_tune.py --model=resnet18 --image_size=64   # random init, random batch

With --torchvision_weights the network is a local torchvision state dict's
(`pretrained.from_torchvision`; nothing is downloaded); without it, the same
network at random initialisation (`models.create(--model, stride_on_1x1=False)`).
Its classifier is replaced by a new one for --num_classes (`reset_classifier`),
and the whole network is trained with SGD and momentum (optax) in training mode
(batch statistics), then evaluated in eval mode (running statistics). Images are
normalised as torchvision's weights expect (`pretrained.TORCHVISION_PREPROCESSING`).
--data is a .npz of `images` (N, H, W, 3) RGB uint8 and integer `labels`; without
it, one batch of random images with fixed labels, which the loss should memorise.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from resnet_jax import models
from resnet_jax.models import cpu_kernels, pretrained

def train_step(model: models.ResNet, optimizer: nnx.Optimizer, images: jax.Array,
               labels: jax.Array) -> jax.Array:
  def loss_fn(model):
    logits = model(images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)  # The BN statistics were updated by the forward pass.
  return loss


@nnx.jit
def accuracy(model: models.ResNet, images: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(model(images), axis=-1) == labels)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--torchvision_weights", metavar="PATH",
                      help="a torchvision state dict (.pth, .pt or .npz) of --model; "
                      "without it, random initialisation")
  parser.add_argument("--model", default="resnet50", help="resnet18, 34, 50, 101 or 152")
  parser.add_argument("--num_classes", type=int, default=10)
  parser.add_argument("--data", metavar="PATH", help=".npz of uint8 `images` and `labels`")
  parser.add_argument("--image_size", type=int, default=224, help="of the random images")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--learning_rate", type=float, default=0.01)
  args = parser.parse_args()

  try:
    if args.torchvision_weights:
      model = pretrained.from_torchvision(args.torchvision_weights, args.model)
    else:  # torchvision's architecture: the stride in each bottleneck's 3x3 conv.
      model = models.create(args.model, num_classes=0, stride_on_1x1=False, rngs=nnx.Rngs(0))
  except ValueError as error:  # A missing, unreadable or mismatched file, an unknown --model.
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  model.reset_classifier(args.num_classes, rngs=nnx.Rngs(1))
  # RGB pixels in [0, 255], normalised as torchvision's weights expect.
  normalise = pretrained.TORCHVISION_PREPROCESSING

  if args.data:
    with np.load(args.data) as data:
      pixels, labels = data["images"], data["labels"]
  else:
    pixels = np.random.default_rng(0).integers(
        0, 256, (args.batch, args.image_size, args.image_size, 3), np.uint8)
    labels = np.arange(args.batch) % args.num_classes
  batches = np.arange(len(labels) // args.batch * args.batch).reshape(-1, args.batch)
  if not len(batches):
    parser.error(f"--data has {len(labels)} examples, fewer than --batch={args.batch}")

  model.train()  # Batch statistics, and updates of the running ones, from here on.
  optimizer = nnx.Optimizer(model, optax.sgd(args.learning_rate, momentum=0.9), wrt=nnx.Param)
  first = batches[0]
  # nnx.jit has no compiler_options: compile it through its lowering to take ops's CPU
  # options (None elsewhere). Every batch has the shapes of the first.
  step = nnx.jit(train_step).lower(
      model, optimizer, normalise(pixels[first]), jnp.asarray(labels[first])
  ).compile(compiler_options=cpu_kernels.compiler_options(jax.default_backend()))
  for i in range(args.steps):
    batch = batches[i % len(batches)]
    loss = step(model, optimizer, normalise(pixels[batch]), jnp.asarray(labels[batch]))
    print(f"step {i + 1} loss {float(loss):.4f}")

  model.eval()
  correct = [accuracy(model, normalise(pixels[batch]), jnp.asarray(labels[batch]))
             for batch in batches]
  print(f"eval accuracy {float(np.mean(correct)):.4f} on {batches.size} training images")


if __name__ == "__main__":
  main()
