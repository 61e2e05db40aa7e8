"""Multi-scale testing in the fully-convolutional form (paper Sec. 3.4): the whole image at each
shorter side in {224, 256, 384, 480, 640}, softmax scores averaged, against a direct computation."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from configs import cifar_resnet20
from resnet_jax import data, models
from resnet_jax.training import optim, loop
from resnet_jax.data import imagenet, record_reader
from resnet_jax.data.sources import tensorflow

tf = tensorflow()
# Validation images of assorted aspect ratios, > 64 pixels so they stream, and their classes.
EVAL_SIZES = [(100, 100), (90, 120), (120, 90), (80, 160), (160, 70), (100, 128), (75, 100)]
EVAL_LABELS = [0, 1, 2, 0, 1, 2, 0]


def mesh_of(num_devices: int):
  return jax.make_mesh((num_devices,), ("data",), devices=jax.devices()[:num_devices])


def tiny_model(num_classes: int = 3) -> models.ResNet:
  """A two-stage ImageNet-stem ResNet (total stride 8), in inference mode."""
  block = functools.partial(models.PostActivationBlock, layers=models.basic, shortcut="B")
  model = models.ResNet(block_cls=block, stage_sizes=(1, 1), stage_widths=(4, 8), imagenet_stem=True,
                        num_classes=num_classes, rngs=nnx.Rngs(0))
  # Logits of a few units on mean-subtracted 0..255 pixels: a softmax away from 0 and 1, whose
  # average tells the views apart.
  model.head.kernel[...] = model.head.kernel[...] * 0.1
  model.eval()
  return model


def test_the_fully_convolutional_score_map_averaged_is_the_model_on_the_whole_image():
  model = tiny_model()
  images = jax.random.normal(jax.random.key(0), (2, 96, 160, 3)) * 60
  feature_map = model.intermediates(images)["stage2"]
  assert feature_map.shape == (2, 12, 20, 8)
  # The classifier as a 1x1 convolution over the last feature map: a score at every position.
  kernel = model.head.kernel[...][None, None]
  score_map = jax.lax.conv_general_dilated(feature_map, kernel, (1, 1), "VALID",
                                           dimension_numbers=("NHWC", "HWIO", "NHWC"))
  score_map = score_map + model.head.bias[...]
  assert score_map.shape == (2, 12, 20, 3)
  np.testing.assert_allclose(score_map.mean(axis=(1, 2)), model(images), rtol=1e-5, atol=1e-6)
  # A centre square, as multi-scale testing used before, scores differently.
  assert not np.allclose(model(images[:, :, 32:128]), model(images), rtol=1e-3)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """train: 3 classes x 2 random 100x100 JPEGs; val: JPEGs of EVAL_SIZES, smooth random colour
  fields (so their centre and their whole differ to the model)."""
  root = tmp_path_factory.mktemp("multiscale")
  rng = np.random.default_rng(0)
  for label in "abc":
    (root / "train" / label).mkdir(parents=True)
    (root / "val" / label).mkdir(parents=True)
    for index in range(2):
      image = rng.integers(0, 256, (100, 100, 3), np.uint8)
      (root / "train" / label / f"{index}.jpg").write_bytes(tf.io.encode_jpeg(image).numpy())
  for index, ((height, width), label) in enumerate(zip(EVAL_SIZES, EVAL_LABELS)):
    image = tf.cast(tf.image.resize(rng.uniform(0, 255, (3, 4, 3)), (height, width)), tf.uint8)
    (root / "val" / "abc"[label] / f"{index}.jpg").write_bytes(tf.io.encode_jpeg(image).numpy())
  return root


def folder_dataset(root, cache_dir, num_devices=8):
  config = data.default_config("image_folder")
  config.data_dir, config.eval_split, config.num_classes = str(root), "val", 3
  config.cache_dir = str(cache_dir)
  return data.create(config, mesh_of(num_devices))


def view_size(height: int, width: int, side: int) -> tuple[int, int]:
  """The rule: shorter side `side`, the longer side that times the nearest bucket ratio."""
  ratio = max(height, width) / min(height, width)
  nearest = min(imagenet.MULTISCALE_ASPECTS, key=lambda bucket: abs(np.log(ratio / bucket)))
  return (round(side * nearest), side) if height > width else (side, round(side * nearest))


def direct_multiscale(model, root, mean):
  """Per validation image (in listing order): softmax averaged over its five views, each the
  whole image resized by the rule, less the mean resized to it, run through the model alone."""
  averages = []
  for path in sorted((root / "val").glob("*/*.jpg")):
    with Image.open(path) as file:  # PIL's pixels, as torchvision's loaders read them.
      image = tf.constant(np.asarray(file.convert("RGB")))
    scores = []
    for side in imagenet.MULTISCALE_SIDES:
      size = view_size(*image.shape[:2], side)
      view = tf.cast(tf.clip_by_value(tf.round(tf.image.resize(image, size, antialias=True)), 0, 255),
                     tf.uint8).numpy()
      pixels = view.astype(np.float32) - tf.image.resize(mean, size).numpy()
      scores.append(jax.nn.softmax(model(jnp.asarray(pixels[None])))[0])
    averages.append(np.mean(scores, axis=0))
  return np.stack(averages)


@pytest.mark.slow
def test_pipeline_multiscale_evaluation_equals_the_direct_computation(folder, tmp_path):
  ds = folder_dataset(folder, tmp_path)
  model = tiny_model()
  scores = direct_multiscale(model, folder, ds.mean)
  labels = np.array(sorted(EVAL_LABELS))  # Listing order: by class folder.
  config = cifar_resnet20.get_config("smoke")
  state = loop.create_train_state(model, optim.create(config))
  result = loop.evaluate(jax.jit(loop.eval_step), state, ds.eval_batches(8, "multiscale"))
  assert result["examples"] == len(EVAL_SIZES)
  ranks = (scores > scores[np.arange(len(labels)), labels][:, None]).sum(axis=1)
  assert result["top1_error"] == pytest.approx(100 * np.mean(ranks >= 1))
  loss = -np.log(scores[np.arange(len(labels)), labels]).mean()
  assert result["loss"] == pytest.approx(loss, rel=1e-4)
  # Views differ enough to show in the loss: the centre crop's is far from it.
  centre = loop.evaluate(jax.jit(loop.eval_step), state, ds.eval_batches(8, "center"))
  assert abs(centre["loss"] - loss) > 100 * 1e-4 * loss


def test_the_image_sizes_are_read_once_then_cached(folder, tmp_path, monkeypatch):
  ds = folder_dataset(folder, tmp_path, num_devices=1)
  assert not list(tmp_path.glob("shapes_*.npy"))  # Start-up reads no size.
  first = [tuple(view.shape[1:3]) for batch in ds.eval_batches(4, "multiscale")
           for view in data.views(batch)]
  (cached,) = tmp_path.glob("shapes_*.npy")
  np.testing.assert_array_equal(np.load(cached), [EVAL_SIZES[i] for i in np.argsort(EVAL_LABELS, kind="stable")])

  def fail(records):
    raise AssertionError(f"read the sizes of {len(records)} images again")

  monkeypatch.setattr(record_reader, "image_shapes", fail)
  again = folder_dataset(folder, tmp_path, num_devices=1)
  assert [tuple(view.shape[1:3]) for batch in again.eval_batches(4, "multiscale")
          for view in data.views(batch)] == first
