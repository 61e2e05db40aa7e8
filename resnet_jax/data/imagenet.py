"""ImageNet image transforms (paper section 3.4), in TensorFlow for tf.data.

Every transform returns uint8 pixels plus a float32 [3] RGB offset (AlexNet's lighting noise;
zero for evaluation); the device subtracts the mean and adds the offset after the transfer, so
only bytes cross PCIe. The mean is the paper's per-pixel mean (Sec. 3.4, after AlexNet): the
mean 224x224 centre view (`center_view`) of up to MEAN_SAMPLE training images, computed once
and cached (`record_reader.mean_image`), resized to views of other sizes.
"""
import numpy as np

from resnet_jax.data import core, decoding, sources

tf = sources.tensorflow()

CROP = 224
TRAIN_SHORTER_SIDE = (256, 480)  # Scale augmentation: shorter side uniform in [256, 480].
EVAL_SHORTER_SIDE = 256
MULTISCALE_SIDES = (224, 256, 384, 480, 640)
# Longer / shorter side of the multi-scale test's views. A batch has one shape, so each image is
# evaluated whole at the nearest of these ratios (`multiscale_aspect`): the common photo formats
# as they are, any other ratio up to 3 changed by a factor of at most sqrt(5/4) = 1.118 (midway
# between 1 and 5/4, or 2 and 5/2), a wider one squeezed to 3; and the model compiles once per
# bucket present (at most 15: each ratio but 1 in both orientations), not once per image size.
MULTISCALE_ASPECTS = (1, 5 / 4, 4 / 3, 3 / 2, 5 / 3, 2, 5 / 2, 3)
# Training images whose centre views make the per-pixel mean, evenly spaced over the split: at
# 50,000 each pixel's mean is within about 0.3 of 255 of the whole split's (std ~60 / sqrt(N)).
MEAN_SAMPLE = 50_000
# AlexNet's PCA lighting (Krizhevsky et al., 2012): eigen-decomposition of the RGB covariance of
# ImageNet pixels on a 0..1 scale, noise std 0.1.
EIGVAL = np.array([0.2175, 0.0188, 0.0045], np.float32)
EIGVEC = np.array([[-0.5675, 0.7192, 0.4009],
                   [-0.5808, -0.0045, -0.8140],
                   [-0.5836, -0.6948, 0.4203]], np.float32)
LIGHTING_STD = 0.1


def train_window(height, width, seed):
  """(y, x, side) of the square in the original image that becomes the 224 training crop.

  Resizing to shorter side s then cropping 224 equals cropping 224 * shorter / s original
  pixels then resizing to 224; the latter decodes and resizes far fewer pixels.
  """
  scale_seed, y_seed, x_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  shorter = tf.minimum(height, width)
  target = tf.random.stateless_uniform([], scale_seed, TRAIN_SHORTER_SIDE[0], TRAIN_SHORTER_SIDE[1] + 1, tf.int32)
  side = tf.cast(tf.round(CROP * tf.cast(shorter, tf.float32) / tf.cast(target, tf.float32)), tf.int32)
  side = tf.clip_by_value(side, 1, shorter)
  y = tf.random.stateless_uniform([], y_seed, 0, height - side + 1, tf.int32)
  x = tf.random.stateless_uniform([], x_seed, 0, width - side + 1, tf.int32)
  return y, x, side


def lighting_offset(seed):
  """AlexNet PCA colour noise as an RGB offset on the 0..255 scale."""
  alpha = tf.random.stateless_normal([3], seed, stddev=LIGHTING_STD)
  return tf.linalg.matvec(tf.constant(EIGVEC), alpha * tf.constant(EIGVAL)) * 255.0


def _to_uint8(image):
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def _resize(image, height, width):
  return _to_uint8(tf.image.resize(image, tf.stack([height, width]), antialias=True))


_NO_OFFSET = np.zeros(3, np.float32)


def _finish_train(crop, seed, augment):
  image = _resize(crop, CROP, CROP)
  flip_seed, light_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  if not augment:
    return image, tf.constant(_NO_OFFSET)
  image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  return image, lighting_offset(light_seed)


def train_view(image, seed, augment=True):
  """Training view of a decoded uint8 [h, w, 3] image: scale augmentation, 224 crop, flip, lighting.

  `seed`: int [2], e.g. (run seed, example position). Without `augment`: the centre view.
  """
  if not augment:
    return center_view(image)
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  y, x, side = train_window(height, width, seed)
  return _finish_train(image[y:y + side, x:x + side], seed, augment)


def train_view_from_bytes(contents, seed, augment=True):
  """`train_view` of an encoded image; JPEGs decode only the crop window (its edge columns may
  differ from the whole image's decode by libjpeg's chroma upsampling: BENCHMARKS.md)."""
  if not augment:
    return center_view(decoding.decode(contents))

  def from_jpeg():
    shape = tf.io.extract_jpeg_shape(contents)
    y, x, side = train_window(shape[0], shape[1], seed)
    return tf.io.decode_and_crop_jpeg(contents, tf.stack([y, x, side, side]), channels=3,
                                      dct_method=decoding.JPEG_DCT_METHOD)

  def from_other():
    image = decoding.decode(contents)
    y, x, side = train_window(tf.shape(image)[0], tf.shape(image)[1], seed)
    return image[y:y + side, x:x + side]

  crop = tf.cond(tf.io.is_jpeg(contents), from_jpeg, from_other)
  crop.set_shape([None, None, 3])
  return _finish_train(crop, seed, augment)


def resize_shorter(image, side):
  """Resizes so the shorter side is `side`, keeping the aspect ratio."""
  height, width = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
  scale = side / tf.minimum(height, width)
  new_height = tf.maximum(side, tf.cast(tf.round(height * scale), tf.int32))
  new_width = tf.maximum(side, tf.cast(tf.round(width * scale), tf.int32))
  return _resize(image, new_height, new_width)


def _crop(image, y, x, size):
  return image[y:y + size, x:x + size]


def _centre_crop(image, size):
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  return _crop(image, (height - size) // 2, (width - size) // 2, size)


def center_view(image):
  """Single-crop evaluation: shorter side 256, centre 224x224."""
  view = _centre_crop(resize_shorter(image, EVAL_SHORTER_SIDE), CROP)
  return tf.ensure_shape(view, [CROP, CROP, 3]), tf.constant(_NO_OFFSET)


def ten_crop_views(image):
  """The paper's 10-crop test: four corners and centre of the shorter-side-256 image, plus flips.

  Returns uint8 [10, 224, 224, 3] (the 5 crops, then their mirror images) and the offset.
  """
  resized = resize_shorter(image, EVAL_SHORTER_SIDE)
  height, width = tf.shape(resized)[0], tf.shape(resized)[1]
  corners = [(0, 0), (0, width - CROP), (height - CROP, 0), (height - CROP, width - CROP),
             ((height - CROP) // 2, (width - CROP) // 2)]
  crops = tf.stack([_crop(resized, y, x, CROP) for y, x in corners])
  views = tf.concat([crops, crops[:, :, ::-1]], axis=0)
  return tf.ensure_shape(views, [10, CROP, CROP, 3]), tf.constant(_NO_OFFSET)


def image_shape(contents):
  """int32 [2]: (height, width) of an encoded image; a JPEG's read from its header alone."""
  return tf.cond(tf.io.is_jpeg(contents), lambda: tf.io.extract_jpeg_shape(contents)[:2],
                 lambda: tf.shape(decoding.decode(contents))[:2])


def multiscale_aspect(height: int, width: int) -> float:
  """The bucket (height / width) of an image's multi-scale views: the nearest, in log space, of
  MULTISCALE_ASPECTS in the image's orientation."""
  longer, shorter = max(height, width), min(height, width)
  aspect = min(MULTISCALE_ASPECTS, key=lambda bucket: abs(np.log(longer / shorter / bucket)))
  return aspect if height >= width else 1 / aspect


def multiscale_sizes(aspect: float) -> np.ndarray:
  """int [len(MULTISCALE_SIDES), 2]: (height, width) of the views of the `aspect` bucket, the
  shorter side each of MULTISCALE_SIDES, the longer that times the bucket's ratio."""
  longer = lambda side: round(side * max(aspect, 1 / aspect))
  return np.array([(longer(side), side) if aspect > 1 else (side, longer(side))
                   for side in MULTISCALE_SIDES], np.int32)


def multiscale_views(image, sizes):
  """The fully-convolutional multi-scale test (Sec. 3.4): the whole image resized to each of
  `sizes` (int [len(MULTISCALE_SIDES), 2], from `multiscale_sizes`).

  Returns a tuple of uint8 [height, width, 3] views, one per scale, and the offset.
  """
  views = tuple(_resize(image, sizes[index, 0], sizes[index, 1])
                for index in range(len(MULTISCALE_SIDES)))
  return views, tf.constant(_NO_OFFSET)


def eval_views(image, protocol, sizes=None):
  """The views of evaluation `protocol` (one of `core.EVAL_PROTOCOLS`) of a decoded uint8
  [h, w, 3] image, and the offset: "center" one [224, 224, 3] view (`center_view`); "10crop" a
  tuple of 10 such views (`ten_crop_views`); "multiscale" a tuple of one view per size of
  `sizes` (`multiscale_views`)."""
  if protocol == "center":
    return center_view(image)
  if protocol == "10crop":
    views, offset = ten_crop_views(image)
    return tuple(tf.unstack(views)), offset
  if protocol == "multiscale":
    return multiscale_views(image, sizes)
  raise ValueError(f"unknown evaluation protocol {protocol!r}; one of {', '.join(core.EVAL_PROTOCOLS)}")
