"""Input-pipeline throughput: `python -m resnet_jax.data.benchmark [--cifar10_dir DIR]`.

Measures (1) the CIFAR on-device fast path: sampling + augmentation inside jit, batch 128, on
one device; (2) the ImageNet training pipeline: tf.data JPEG decode + scale augmentation + crop +
flip + lighting + transfer, on full-size JPEGs (500x375, ImageNet's typical size) written to a
temporary image folder.
"""
import argparse
import tempfile
import time

import jax
import numpy as np
from etils import epath

from resnet_jax import data
from resnet_jax.data.sources import tensorflow


def cifar_on_device(cifar10_dir: str | None, steps: int = 200, batch_size: int = 128) -> float:
  mesh = data.core.make_mesh(jax.devices()[:1])
  config = data.default_config("image_folder" if cifar10_dir else "synthetic")
  config.data_dir = cifar10_dir
  ds = data.create(config, mesh)
  step_fn = jax.jit(lambda d, s: d.train_batch(s, batch_size).images.sum())
  step_fn(ds, 0).block_until_ready()
  start = time.perf_counter()
  for step in range(1, steps + 1):
    out = step_fn(ds, step)
  out.block_until_ready()
  return steps * batch_size / (time.perf_counter() - start)


def imagenet_streaming(num_images: int = 512, steps: int = 20, batch_size: int = 64) -> float:
  tf = tensorflow()
  root = epath.Path(tempfile.mkdtemp(prefix="resnet_jax_bench_"))
  rng = np.random.default_rng(0)
  smooth = tf.image.resize(rng.integers(0, 256, (num_images // 8, 40, 53, 3)).astype(np.float32), (375, 500))
  for split in ("train", "val"):
    for index in range(num_images if split == "train" else 8):
      folder = root / split / f"class{index % 8}"
      folder.mkdir(parents=True, exist_ok=True)
      image = tf.cast(smooth[index % len(smooth)], tf.uint8)
      (folder / f"{index}.jpg").write_bytes(tf.io.encode_jpeg(image, quality=90).numpy())
  config = data.default_config("image_folder")
  config.data_dir, config.eval_split = str(root), "val"
  config.image_size = 224
  mesh = data.core.make_mesh(jax.devices()[:1])
  iterator = data.create(config, mesh).train_iterator(batch_size)
  next(iterator).images.block_until_ready()
  start = time.perf_counter()
  for _ in range(steps):
    batch = next(iterator)
  batch.images.block_until_ready()
  iterator.close()
  return steps * batch_size / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cifar10_dir", default=str(
      epath.Path(__file__).resolve().parents[3] / "shared/data/cifar10-jpeg"))
  args = parser.parse_args()
  cifar10_dir = args.cifar10_dir if epath.Path(args.cifar10_dir, "train").is_dir() else None
  print(f"devices: {jax.devices()}")
  print(f"CIFAR on-device (sample+augment in jit, batch 128, {'real CIFAR-10' if cifar10_dir else 'synthetic'}): "
        f"{cifar_on_device(cifar10_dir):,.0f} images/s")
  print(f"ImageNet streaming (decode+augment 500x375 JPEGs, batch 64): {imagenet_streaming():,.0f} images/s")


if __name__ == "__main__":
  main()
