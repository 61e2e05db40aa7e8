"""JPEG decode cost of libjpeg's accurate integer IDCT (ours, PIL's) against TensorFlow's default.

    python benchmarks/jpeg_decode.py --cifar=../shared/data/cifar10-jpeg --repeats=5

Times `tf.io.decode_jpeg` one image at a time (eagerly, in one thread: 1,000 CIFAR-10 training
images and 256 generated 500x375 JPEGs, ImageNet's typical size), `decoding.decode_all` (the
on-device pipeline's start-up decode, tf.data's threads) over the CIFAR-10 training split and the
generated JPEGs, and their training crop windows (`imagenet.train_view_from_bytes`, the
streaming pipeline's decode and augmentation), once with `decoding.decode` and JPEG_DCT_METHOD as they are ("INTEGER_ACCURATE")
and once with TensorFlow's default IDCT ("INTEGER_FAST", `tf.io.decode_image`), alternating so
both see the same background load (each repeat starts with the other one); prints the best
of `--repeats` of the process's CPU seconds (all of tf.data's threads; on a shared machine less
noisy than the wall clock) and of the wall-clock seconds. Figures in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from resnet_jax.data import decoding, imagenet, sources

tf = sources.tensorflow()


def generated_jpegs(count: int) -> np.ndarray:
  """`count` 500x375 quality-90 JPEGs (4:2:0) of smooth gradients plus noise."""
  rng = np.random.default_rng(0)
  y, x = np.mgrid[0:375, 0:500]
  encoded = []
  for index in range(count):
    phase = rng.uniform(0, 2 * np.pi, 3)
    image = np.stack([128 + 100 * np.sin(x / (17 + index % 7) + phase[0]),
                      128 + 100 * np.sin(y / (23 + index % 5) + phase[1]),
                      128 + 100 * np.sin((x + y) / 31 + phase[2])], axis=-1)
    image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
    encoded.append(tf.io.encode_jpeg(image, quality=90).numpy())
  return np.array(encoded, dtype=object)


def one_by_one(encoded: list) -> None:
  """Decodes the scalar string tensors `encoded` eagerly, one at a time."""
  for contents in encoded:
    tf.io.decode_jpeg(contents, channels=3, dct_method=decoding.JPEG_DCT_METHOD)


def crop_views(encoded: np.ndarray) -> None:
  """The streaming pipeline's training decode and augmentation of every image, in tf.data."""
  dataset = tf.data.Dataset.from_tensor_slices(encoded).enumerate().map(
      lambda index, contents: imagenet.train_view_from_bytes(contents, tf.stack([index, index]))[0],
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  for _ in dataset.batch(64).as_numpy_iterator():
    pass


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cifar", default="../shared/data/cifar10-jpeg")
  parser.add_argument("--large", type=int, default=512, help="generated 500x375 JPEGs")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  cifar = sources.folder_records(args.cifar, "train")
  large = sources.Records(np.zeros(args.large, np.int32), encoded=generated_jpegs(args.large))
  cifar_bytes = [tf.io.read_file(path) for path in cifar.paths[::50]]
  large_bytes = [tf.constant(contents) for contents in large.encoded[:256]]
  tasks = {f"CIFAR-10 train, decode one by one ({len(cifar_bytes)} 32x32)":
               lambda: one_by_one(cifar_bytes),
           "500x375, decode one by one (256)": lambda: one_by_one(large_bytes),
           f"CIFAR-10 train, decode_all ({len(cifar)} 32x32)":
               lambda: decoding.decode_all(cifar, np.arange(len(cifar))),
           f"500x375, decode_all ({args.large})":
               lambda: decoding.decode_all(large, np.arange(args.large)),
           f"500x375, train_view_from_bytes crop window ({args.large})":
               lambda: crop_views(large.encoded)}
  accurate = decoding.decode, decoding.JPEG_DCT_METHOD
  fast = lambda contents: tf.io.decode_image(contents, channels=3, expand_animations=False)
  variants = {"INTEGER_ACCURATE": accurate, "INTEGER_FAST": (fast, "INTEGER_FAST")}
  best = {(task, variant): (np.inf, np.inf) for task in tasks for variant in variants}
  for repeat in range(args.repeats):
    for task, run in tasks.items():
      for variant, (decode, dct_method) in list(variants.items())[::1 - 2 * (repeat % 2)]:
        decoding.decode, decoding.JPEG_DCT_METHOD = decode, dct_method
        cpu, wall = time.process_time(), time.perf_counter()
        run()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        best[task, variant] = tuple(map(min, best[task, variant], (cpu, wall)))
  decoding.decode, decoding.JPEG_DCT_METHOD = accurate
  for task in tasks:
    (accurate_cpu, accurate_wall), (fast_cpu, fast_wall) = (best[task, variant] for variant in variants)
    print(f"{task}: INTEGER_ACCURATE {accurate_cpu:.2f} CPU s ({accurate_wall:.2f} s), INTEGER_FAST "
          f"{fast_cpu:.2f} CPU s ({fast_wall:.2f} s): {accurate_cpu / fast_cpu:.2f}x the CPU")


if __name__ == "__main__":
  main()
