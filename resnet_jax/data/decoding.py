"""Decoding the images of `Records` with TensorFlow, and naming the image that fails.

Every pipeline decodes an image with `decode` (a JPEG's training crop window alone: `imagenet`, with
JPEG_DCT_METHOD too), so that its pixels are PIL's: those that the weights published by PyTorch
code (torchvision's loaders) were trained and scored on.

TensorFlow is bound at import (`sources.tensorflow()`): only the paths that decode images
import this module.
"""
import re
from typing import Any, Iterable, Iterator

import numpy as np

from resnet_jax.data import sources
from resnet_jax.data.core import CorruptImageError, ImageSizeError
from resnet_jax.data.sources import Records

tf = sources.tensorflow()

# libjpeg's accurate integer IDCT (JDCT_ISLOW), the default of libjpeg and so of PIL, which
# torchvision's and most PyTorch references' loaders decode with. TensorFlow's own default is the
# fast integer IDCT (JDCT_IFAST): its pixels differ from PIL's by up to 5 levels (on every CIFAR
# image of the shared JPEG copy), enough to move a published CIFAR ResNet's error (BENCHMARKS.md).
JPEG_DCT_METHOD = "INTEGER_ACCURATE"
# Names the decoder in the cache keys of arrays computed from decoded pixels (the per-pixel
# means), so that a mean computed from another decoder's pixels is never served.
DECODER = "jpeg_islow"


def decode(contents: Any) -> Any:
  """uint8 [H, W, 3] of an encoded image (a scalar tf.string; JPEG, PNG, BMP or GIF's first
  frame): PIL's `Image.open(f).convert("RGB")` pixels, JPEGs decoded with JPEG_DCT_METHOD.
  Raises (eagerly, or in the tf.data pipeline) `tf.errors.InvalidArgumentError` if it does not
  decode."""
  image = tf.cond(tf.io.is_jpeg(contents),
                  lambda: tf.io.decode_jpeg(contents, channels=3, dct_method=JPEG_DCT_METHOD),
                  lambda: tf.io.decode_image(contents, channels=3, expand_animations=False))
  return tf.ensure_shape(image, [None, None, 3])


def decode_one(records: Records, index: int) -> Any:
  """uint8 [H, W, 3] of example `index`; `CorruptImageError` naming it if it does not decode."""
  if records.data_source is not None:
    contents = records.data_source[int(index)]["image"]
  elif records.encoded is not None:
    contents = records.encoded[index]
  else:
    contents = tf.io.read_file(records.paths[index])
  try:
    return decode(contents)
  except tf.errors.InvalidArgumentError as error:
    reason = re.sub(r"\{\{.*?\}\}\s*|\s*\[Op:.*$", "", error.message)  # TF's op context.
    raise CorruptImageError(f"corrupt image {records.name(index)}: cannot decode it ({reason}); "
                            "delete or replace it") from None


def naming_corrupt(batches: Iterator, batch_ids: Iterable[np.ndarray], records: Records,
                   shape: tuple[int, int, int] | None = None) -> Iterator:
  """`batches` (tf.data, decoding `records`), with `batch_ids` the example ids of each batch in
  order; a decoding failure becomes `CorruptImageError` naming the image, and an image that is
  not `shape` (when given) `ImageSizeError` naming it (tf.data's own errors name no file)."""
  for ids in batch_ids:
    try:
      batch = next(batches)
    except StopIteration:
      return
    except tf.errors.InvalidArgumentError:
      for index in np.sort(ids):  # The first odd image in listing order.
        image_shape = tuple(decode_one(records, index).shape)
        if shape is not None and image_shape != shape:
          raise ImageSizeError(
              f"image {records.name(index)} is {_size(image_shape)} pixels, but the dataset's "
              f"images are {_size(shape)} (its first image's size), and images held on the "
              f"devices must all have one size: resize it to {_size(shape)} or remove it") from None
      raise
    yield batch


def _size(shape: tuple[int, ...]) -> str:
  return f"{shape[0]}x{shape[1]}"


def peek_shape(records: Records) -> tuple[int, int, int]:
  """Shape of the first image, decoded on its own."""
  return tuple(decode_one(records, 0).shape)


def decode_all(records: Records, ids: np.ndarray, shape: tuple[int, int, int] | None = None) -> np.ndarray:
  """uint8 [len(ids), *shape]: the images `ids`, decoded in parallel; `ImageSizeError` naming
  the first one of another shape (default: the shape of the split's first image)."""
  shape = shape or peek_shape(records)
  if records.paths is not None:
    contents = tf.data.Dataset.from_tensor_slices(records.paths[ids]).map(tf.io.read_file)
  else:
    contents = tf.data.Dataset.from_tensor_slices(records.encoded[ids])
  dataset = contents.map(lambda x: tf.ensure_shape(decode(x), shape),
                         num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  chunk = 4096
  batches = dataset.batch(chunk).prefetch(1).as_numpy_iterator()
  chunks = list(naming_corrupt(batches, np.split(ids, range(chunk, len(ids), chunk)), records, shape))
  if not chunks:
    return np.zeros((0,) + shape, np.uint8)
  return np.concatenate(chunks)
