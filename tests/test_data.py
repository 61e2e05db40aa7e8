"""Tests of the CIFAR / on-device input pipeline, the splits, the config and the error paths."""
import os
import pathlib
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from resnet_jax import data
from resnet_jax.data import core, decoding, imagenet, mean_cache, on_device, sources

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_MEAN = np.array([125.3, 123.0, 113.9])


def mesh_of(num_devices: int, axis_type=jax.sharding.AxisType.Explicit):
  return jax.make_mesh((num_devices,), ("data",), axis_types=(axis_type,), devices=jax.devices()[:num_devices])


@pytest.fixture(scope="module")
def cifar_records(cifar10_dir):
  return sources.folder_records(cifar10_dir, "train"), sources.folder_records(cifar10_dir, "test")


@pytest.fixture(scope="module")
def cifar_ds(cifar10_dir, tmp_path_factory):
  config = data.default_config("image_folder")
  config.data_dir = str(cifar10_dir)
  config.cache_dir = str(tmp_path_factory.mktemp("cache"))
  return data.create(config, mesh_of(8)), config


@pytest.fixture(scope="module")
def cifar_test_images(cifar_records):
  test = cifar_records[1]
  return decoding.decode_all(test, np.arange(len(test)))


def id_coded_dataset(mesh, num_train=800, num_eval=203, **kwargs):
  """Images whose pixels encode their example id (pixel [0, 0] = id // 256, id % 256, 0)."""
  def images(count):
    array = np.zeros((count, 8, 8, 3), np.uint8)
    array[:, 0, 0, 0], array[:, 0, 0, 1] = np.arange(count) // 256, np.arange(count) % 256
    return array
  return on_device.from_arrays(mesh, images(num_train), np.arange(num_train) % 10, images(num_eval),
                               np.arange(num_eval) % 10, name="ids", num_classes=10, mean=np.zeros((8, 8, 3)),
                               **kwargs)


def decode_ids(images) -> np.ndarray:
  pixels = np.rint(np.asarray(images)[:, 0, 0]).astype(np.int64)
  return pixels[:, 0] * 256 + pixels[:, 1]


def test_cifar10_folder_sizes_and_label_order(cifar10_dir, cifar_records):
  train, test = cifar_records
  assert sources.folder_classes(cifar10_dir) == CLASSES
  assert (len(train), len(test)) == (50_000, 10_000)
  np.testing.assert_array_equal(np.bincount(train.labels), [5000] * 10)
  np.testing.assert_array_equal(np.bincount(test.labels), [1000] * 10)
  assert all(f"/{CLASSES[label]}/" in path for path, label in zip(train.paths[::997], train.labels[::997]))


def pil_pixels(path) -> np.ndarray:
  """uint8 [H, W, 3]: the image file as PIL decodes it, as torchvision's loaders (and so the code
  that trained published weights) read images."""
  with Image.open(path) as image:
    return np.asarray(image.convert("RGB"))


def test_jpegs_decode_to_pils_pixels_exactly_in_both_pipelines(cifar_records):
  tf = sources.tensorflow()
  for records in cifar_records:
    ids = np.sort(np.random.default_rng(0).choice(len(records), 300, replace=False))
    expected = np.stack([pil_pixels(path) for path in records.paths[ids]])
    np.testing.assert_array_equal(decoding.decode_all(records, ids), expected)  # On the devices.
    # TensorFlow's default decode (the fast IDCT) gives other pixels: the test tells them apart.
    fast = np.stack([tf.io.decode_image(tf.io.read_file(path), channels=3).numpy()
                     for path in records.paths[ids]])
    assert np.count_nonzero(fast != expected) > expected.size // 10
    for index in ids[:10]:  # The streaming pipeline's (ImageNet's) views of the same files.
      contents = tf.io.read_file(records.paths[index])
      np.testing.assert_array_equal(decoding.decode(contents), pil_pixels(records.paths[index]))
      view, _ = imagenet.train_view_from_bytes(contents, tf.constant([0, 0], tf.int64), augment=False)
      expected_view, _ = imagenet.center_view(tf.constant(pil_pixels(records.paths[index])))
      np.testing.assert_array_equal(view, expected_view)


def test_cifar10_dataset_and_cached_mean(cifar_ds):
  ds, config = cifar_ds
  assert isinstance(ds, data.OnDeviceDataset)
  assert ds.info == data.DatasetInfo("image_folder(" + os.path.abspath(config.data_dir) + ")",
                                     10, (32, 32, 3), 50_000, 10_000, False)
  mean = np.asarray(ds.mean)
  assert mean.shape == (32, 32, 3)
  np.testing.assert_allclose(mean.mean(axis=(0, 1)), CIFAR10_MEAN, atol=1.5)
  cached = list(pathlib.Path(config.cache_dir).glob("mean_*.npy"))
  assert len(cached) == 1
  np.testing.assert_array_equal(np.load(cached[0]), mean)


def test_mean_cache_survives_unwritable_dir(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  calls = []
  compute = lambda: calls.append(1) or np.ones((2, 2, 3))
  unwritable = str(blocker / "cache")
  load = lambda cache_dir: mean_cache.load_or_compute("k", compute, cache_dir, shape=(2, 2, 3))
  np.testing.assert_array_equal(load(unwritable), np.ones((2, 2, 3)))
  assert load(str(tmp_path)) is not None
  load(str(tmp_path))
  assert len(calls) == 2  # Computed for the unwritable dir and once for tmp_path, then read back.


def test_evaluation_is_the_unaugmented_original(cifar_ds, cifar_test_images):
  ds, _ = cifar_ds
  batch = next(ds.eval_batches(80))
  chunks = core.eval_chunks(10_000, 8)
  expected_ids = np.concatenate([chunk[:10] for chunk in chunks])
  expected = cifar_test_images[expected_ids].astype(np.float32) - np.asarray(ds.mean)
  np.testing.assert_allclose(np.asarray(batch.images), expected, atol=1e-4)
  assert batch.mask.all()


def test_training_samples_are_real_examples_with_their_labels(cifar_ds, cifar_records):
  ds, _ = cifar_ds
  train = cifar_records[0]
  plain = ds.replace(augment=False)
  batch = jax.jit(lambda d, s: d.train_batch(s, 64))(plain, 7)
  images = np.rint(np.asarray(batch.images) + np.asarray(ds.mean)).astype(np.uint8)
  decoded = decoding.decode_all(train, np.arange(50_000))
  index = {image.tobytes(): label for image, label in zip(decoded, train.labels)}
  assert [index[image.tobytes()] for image in images] == list(np.asarray(batch.labels))


def test_crops_lie_inside_the_padded_image_and_flips_are_fair(cifar_test_images):
  images = cifar_test_images[:256].astype(np.float32) - 120.0
  augmented = np.asarray(jax.jit(on_device.augment)(jax.random.key(3), images))
  padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
  flips, offsets = [], set()
  for image, out in zip(padded, augmented):
    matches = [(dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (False, True)
               if np.array_equal((image[:, ::-1] if flip else image)[dy:dy + 32, dx:dx + 32], out)]
    assert matches, "augmented image is not a crop of the padded image or of its mirror"
    flips.append(matches[0][2])
    offsets.add(matches[0][:2])
  assert 0.38 < np.mean(flips) < 0.62
  assert len(offsets) > 40  # Crop positions spread over the 9x9 choices.


def test_train_batch_is_a_pure_function_of_seed_and_step():
  ds = id_coded_dataset(mesh_of(8))
  step_fn = jax.jit(lambda d, s: d.train_batch(s, 32))
  first, again, other = step_fn(ds, 5), step_fn(ds, 5), step_fn(ds, 6)
  np.testing.assert_array_equal(first.images, again.images)
  assert not np.array_equal(first.images, other.images)
  np.testing.assert_array_equal(first.images, ds.train_batch(5, 32).images)  # Eager == jitted.
  reseeded = id_coded_dataset(mesh_of(8), seed=1)
  assert not np.array_equal(first.images, step_fn(reseeded, 5).images)
  auto = id_coded_dataset(mesh_of(8, jax.sharding.AxisType.Auto))
  np.testing.assert_array_equal(first.images, step_fn(auto, 5).images)
  assert first.images.sharding.spec[0] == "data"


def test_train_iterator_gives_the_dataset_and_batches_inside_the_step():
  ds = id_coded_dataset(mesh_of(8))
  iterator = ds.train_iterator(32, start_step=5)
  inputs = next(iterator)
  assert inputs is ds and iterator.get_state() is None
  batch = jax.jit(lambda inputs, step: iterator.batch(inputs, step))(inputs, 5)
  np.testing.assert_array_equal(batch.images, ds.train_batch(5, 32).images)
  with pytest.raises(ValueError, match=r"global batch size 30 .* multiple of 8"):
    ds.train_iterator(30)
  assert ds.eval_protocols == ("center",)
  with pytest.raises(ValueError, match=r"eval_protocol '10crop' is not available for ids, whose 8x8 images "
                                       r"are evaluated by 'center'; use one of those"):
    next(ds.eval_batches(8, "10crop"))


def test_each_training_epoch_visits_examples_without_repeats():
  ds = id_coded_dataset(mesh_of(8), augment=False)
  steps = ds.steps_per_epoch(32)
  assert steps == 800 // 32
  step_fn = jax.jit(lambda d, s: d.train_batch(s, 32))
  epoch = np.concatenate([decode_ids(step_fn(ds, s).images) for s in range(steps)])
  assert len(set(epoch)) == len(epoch) == 800
  next_epoch = np.concatenate([decode_ids(step_fn(ds, s).images) for s in range(steps, 2 * steps)])
  assert not np.array_equal(epoch, next_epoch) and set(next_epoch) == set(epoch)


@pytest.mark.parametrize("num_devices", [1, 8])
@pytest.mark.parametrize("batch_size", [8, 24, 200, 256])
def test_eval_visits_every_example_exactly_once(num_devices, batch_size):
  if batch_size % num_devices:
    pytest.skip("not divisible")
  ds = id_coded_dataset(mesh_of(num_devices), num_eval=203)
  seen, labels = [], []
  for batch in ds.eval_batches(batch_size):
    assert batch.images.shape[0] == batch_size
    mask = np.asarray(batch.mask)
    seen.extend(decode_ids(batch.images)[mask])
    labels.extend(np.asarray(batch.labels)[mask])
  np.testing.assert_array_equal(np.sort(seen), np.arange(203))
  np.testing.assert_array_equal(np.asarray(labels), np.asarray(seen) % 10)


def test_eval_row_ids_cover_every_example_once():
  for num_examples, devices, per_device in [(10, 8, 1), (1000, 8, 3), (7, 1, 4), (50_000, 4, 128)]:
    ids, valid = core.eval_row_ids(core.eval_chunks(num_examples, devices), per_device)
    assert ids.shape[1] == devices * per_device
    np.testing.assert_array_equal(np.sort(ids[valid]), np.arange(num_examples))


def test_batch_size_not_divisible_by_devices_is_a_clear_error():
  ds = id_coded_dataset(mesh_of(8))
  with pytest.raises(ValueError, match=r"global batch size 30 does not divide across 8 devices; "
                                       r"use a multiple of 8"):
    ds.train_batch(0, 30)
  with pytest.raises(ValueError, match="multiple of 8"):
    next(ds.eval_batches(12))


def test_train45k_val5k_split(cifar10_dir, cifar_records):
  labels = cifar_records[0].labels
  train_ids, val_ids = sources.train_val_split(labels)
  assert (len(train_ids), len(val_ids)) == (45_000, 5_000)
  assert not set(train_ids) & set(val_ids)
  np.testing.assert_array_equal(np.sort(np.concatenate([train_ids, val_ids])), np.arange(50_000))
  np.testing.assert_array_equal(np.bincount(labels[val_ids]), [500] * 10)
  again = sources.train_val_split(labels)
  np.testing.assert_array_equal(again[1], val_ids)
  train45k = sources.folder_records(cifar10_dir, "train45k")
  val5k = sources.folder_records(cifar10_dir, "val5k")
  assert (len(train45k), len(val5k)) == (45_000, 5_000)
  assert not set(train45k.paths) & set(val5k.paths)


def test_missing_tfds_dataset_is_one_clear_error(tmp_path):
  config = data.default_config("cifar10")
  config.data_dir = str(tmp_path)
  start = time.time()
  with pytest.raises(data.DatasetNotFoundError) as error:
    data.create(config, mesh_of(8))
  assert time.time() - start < 30
  message = str(error.value)
  assert str(tmp_path) in message and "python -m resnet_jax.tools.prepare cifar10" in message and "image_folder" in message
  assert isinstance(error.value, ValueError)


def test_config_validation():
  with pytest.raises(ValueError, match="valid names: cifar10, cifar100, imagenet2012, image_folder, synthetic"):
    data.default_config("mnist")
  config = data.default_config("cifar10")
  config.batch = 3
  with pytest.raises(ValueError, match=r"unknown dataset config field\(s\) \['batch'\]"):
    data.create(config, mesh_of(8))
  config = data.default_config("cifar10")
  config.train_split = "train45k"
  with pytest.raises(ValueError, match="train45k and val5k go together"):
    data.create(config, mesh_of(8))


def test_synthetic_is_labelled():
  config = data.default_config("synthetic")
  config.synthetic_train_size, config.synthetic_eval_size, config.num_classes = 256, 64, 7
  ds = data.create(config, mesh_of(8))
  assert ds.info.synthetic and ds.info.name == "synthetic(32x32x3,7 classes)"
  batch = jax.jit(lambda d: d.train_batch(0, 64))(ds)
  assert batch.images.shape == (64, 32, 32, 3) and int(batch.labels.max()) < 7


NO_TENSORFLOW = """
import sys
sys.modules["tensorflow"] = None  # Any import of TensorFlow now fails.
sys.modules["tensorflow_datasets"] = None
import jax, numpy as np
from resnet_jax import data
mesh = jax.make_mesh((8,), ("data",))
config = data.default_config("synthetic")
config.synthetic_train_size, config.synthetic_eval_size = 512, 100
ds = data.create(config, mesh)
batch = jax.jit(lambda d, s: d.train_batch(s, 64))(ds, 3)
assert batch.images.shape == (64, 32, 32, 3)
assert sum(int(b.mask.sum()) for b in ds.eval_batches(16)) == 100
images = np.zeros((64, 32, 32, 3), np.uint8)
own = data.from_arrays(mesh, images, np.zeros(64), images, np.zeros(64), name="mine", num_classes=2)
own.train_batch(0, 8)
config.image_size, config.synthetic_train_size = 224, 64
big = data.create(config, mesh)
assert next(big.train_iterator(16)).images.shape == (16, 224, 224, 3)
print("no tensorflow: ok")
"""


def test_in_memory_and_synthetic_paths_never_import_tensorflow():
  result = subprocess.run([sys.executable, "-c", NO_TENSORFLOW], capture_output=True, text=True, timeout=120,
                          cwd=pathlib.Path(__file__).resolve().parents[1])
  assert result.returncode == 0, result.stderr[-3000:]
  assert "no tensorflow: ok" in result.stdout


def image_folder(root, side=32, classes=("a", "b"), per_class=8, splits=("train", "test")):
  """root/<split>/<class>/<i>.jpg: `per_class` small noise JPEGs of `side` pixels per class."""
  tf = sources.tensorflow()
  rng = np.random.default_rng(0)
  for split in splits:
    for name in classes:
      (root / split / name).mkdir(parents=True)
      for index in range(per_class):
        image = rng.integers(0, 256, (side, side, 3), np.uint8)
        (root / split / name / f"{index}.jpg").write_bytes(tf.io.encode_jpeg(image).numpy())
  return root


def folder_config(root, tmp_path):
  config = data.default_config("image_folder")
  config.data_dir, config.cache_dir, config.num_classes = str(root), str(tmp_path / "cache"), 2
  return config


# On device every image decodes at start-up; streaming decodes the training images of the
# per-pixel mean then (up to imagenet.MEAN_SAMPLE of them, evenly spaced), on its first start.
@pytest.mark.parametrize("side,name,contents", [(32, "train/b/3.jpg", b"not an image at all"),
                                                (80, "train/a/0.jpg", b"\xff\xd8\xff truncated")])
def test_corrupt_image_at_start_up_is_one_error_naming_its_path(tmp_path, side, name, contents):
  root = image_folder(tmp_path / "images", side=side)
  (root / name).write_bytes(contents)
  with pytest.raises(data.CorruptImageError,
                     match=f"corrupt image {root / name}: cannot decode it .*; delete or replace it"):
    data.create(folder_config(root, tmp_path), mesh_of(8))


def test_corrupt_image_while_streaming_names_its_path(tmp_path, monkeypatch):
  root = image_folder(tmp_path / "images", side=80)
  # The mean's sample is the first and last training image, as ImageNet's 50,000 are a part.
  monkeypatch.setattr(imagenet, "MEAN_SAMPLE", 2)
  data.create(folder_config(root, tmp_path), mesh_of(8))  # Caches the mean: images read later.
  (root / "train" / "b" / "5.jpg").write_bytes(b"garbage")
  (root / "test" / "a" / "2.jpg").write_bytes(b"garbage")
  ds = data.create(folder_config(root, tmp_path), mesh_of(8))
  assert isinstance(ds, data.StreamingDataset)
  iterator = ds.train_iterator(8)
  with pytest.raises(data.CorruptImageError, match=f"corrupt image {root}/train/b/5.jpg: "):
    for _ in range(ds.steps_per_epoch(8)):  # One epoch reads every training image.
      next(iterator)
  iterator.close()
  with pytest.raises(data.CorruptImageError, match=f"corrupt image {root}/test/a/2.jpg: "):
    list(ds.eval_batches(8))


def write_jpeg(path, side):
  pixels = np.random.default_rng(side).integers(0, 256, (side, side, 3), np.uint8)
  path.write_bytes(sources.tensorflow().io.encode_jpeg(pixels).numpy())


# The first odd image in listing order is named, in either split.
@pytest.mark.parametrize("odd", [{"train/b/5.jpg": 40, "train/b/6.jpg": 36}, {"test/a/1.jpg": 40}])
def test_image_folder_of_mixed_sizes_is_one_error_naming_the_first_odd_image(tmp_path, odd):
  root = image_folder(tmp_path / "images")
  for name, side in odd.items():
    write_jpeg(root / name, side)
  name, side = next(iter(odd.items()))
  with pytest.raises(data.ImageSizeError,
                     match=f"^image {root / name} is {side}x{side} pixels, but the dataset's images are "
                           r"32x32 \(its first image's size\), and images held on the devices must all "
                           "have one size: resize it to 32x32 or remove it$"):
    data.create(folder_config(root, tmp_path), mesh_of(8))


def train_smoke_on_folder(root, tmp_path) -> subprocess.CompletedProcess:
  """The smoke config's run of `python -m resnet_jax.main` on the image folder `root`."""
  return subprocess.run(
      [sys.executable, "-m", "resnet_jax.main", "--config=configs/cifar_resnet20.py:smoke",
       "--config.dataset.name=image_folder", f"--config.dataset.data_dir={root}",
       f"--config.dataset.cache_dir={tmp_path / 'cache'}", f"--workdir={tmp_path / 'run'}"],
      cwd=pathlib.Path(__file__).resolve().parents[1], capture_output=True, text=True,
      timeout=300)


def test_main_names_an_image_of_another_size_in_one_line_and_exits_2(tmp_path):
  root = image_folder(tmp_path / "images")
  write_jpeg(root / "train" / "a" / "3.jpg", 40)
  completed = train_smoke_on_folder(root, tmp_path)
  assert completed.returncode == 2, completed.stderr[-3000:]
  errors = [line for line in completed.stderr.splitlines() if line.startswith("error:")]
  assert errors == [completed.stderr.rstrip().splitlines()[-1]]
  assert errors[0].startswith(f"error: image {root}/train/a/3.jpg is 40x40 pixels, but the dataset's "
                              "images are 32x32")
  assert "Traceback" not in completed.stderr and "InvalidArgumentError" not in completed.stderr
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_start_up_phases_are_logged_with_their_counts(tmp_path, caplog):
  root = image_folder(tmp_path / "images", per_class=12)
  config = folder_config(root, tmp_path)
  with caplog.at_level("INFO"):
    data.create(config, mesh_of(8))
    data.create(config, mesh_of(8))
  messages = [record.getMessage() for record in caplog.records]
  (mean,) = pathlib.Path(config.cache_dir).glob("mean_*.npy")
  for message in [f"Listing the images of 2 classes under {root}/train", f"Found 24 images under {root}/train",
                  f"Listing the images of 2 classes under {root}/test", f"Found 24 images under {root}/test",
                  f"Loading image_folder({root}) onto the devices: 24 training and 24 evaluation images "
                  "(this process loads the blocks of 8 of the 8 devices)",
                  "Computing the per-pixel mean of 24 training images", f"Loading the per-pixel mean from {mean}"]:
    assert message in messages, messages
  assert messages.count("Computing the per-pixel mean of 24 training images") == 1  # Then cached.


def decoded_mean(root, split="train") -> np.ndarray:
  records = sources.folder_records(root, split)
  return decoding.decode_all(records, np.arange(len(records))).mean(axis=0, dtype=np.float64)


# A folder's images replaced under the same names, by images of another size or of the same.
@pytest.mark.parametrize("side", [40, 32])
def test_images_replaced_in_place_get_the_mean_of_the_new_ones(tmp_path, side):
  root = image_folder(tmp_path / "images", per_class=12)
  config = folder_config(root, tmp_path)
  data.create(config, mesh_of(8))  # Caches the mean of the images first written.
  rng = np.random.default_rng(1)
  for path in sorted(root.glob("*/*/*.jpg")):
    image = rng.integers(0, 256, (side, side, 3), np.uint8)
    path.write_bytes(sources.tensorflow().io.encode_jpeg(image).numpy())
  mean = np.asarray(data.create(config, mesh_of(8)).mean)
  assert mean.shape == (side, side, 3)
  np.testing.assert_allclose(mean, decoded_mean(root), atol=1e-3)
  assert len(list(pathlib.Path(config.cache_dir).glob("mean_*.npy"))) == 2


def test_a_mean_cached_from_tensorflows_default_decode_is_not_served(tmp_path):
  # Before 0.3.0 JPEGs decoded with TensorFlow's fast IDCT, and means were cached under this key.
  root = image_folder(tmp_path / "images", per_class=12)
  config = folder_config(root, tmp_path)
  train = sources.folder_records(root, "train")
  key = f"image_folder train {sources.fingerprint(train)} 32x32x3"
  stale = mean_cache.cache_path(key, config.cache_dir)
  stale.parent.mkdir(parents=True)
  np.save(stale, np.full((32, 32, 3), 7.0, np.float32))
  np.testing.assert_allclose(data.create(config, mesh_of(8)).mean, decoded_mean(root), atol=1e-3)


@pytest.mark.parametrize("damage", ["truncated", "another_shape"])
def test_a_broken_cache_file_is_computed_again_with_one_warning_naming_it(tmp_path, caplog, damage):
  root = image_folder(tmp_path / "images", per_class=12)
  config = folder_config(root, tmp_path)
  expected = np.asarray(data.create(config, mesh_of(8)).mean)
  (cached,) = pathlib.Path(config.cache_dir).glob("mean_*.npy")
  if damage == "truncated":
    cached.write_bytes(cached.read_bytes()[:50])
    problem = "is unreadable (EOF: reading array header, expected "
  else:
    np.save(cached, np.zeros((24, 24, 3), np.float32))
    problem = "holds a float32 array of shape (24, 24, 3), not float32 of shape (32, 32, 3);"
  with caplog.at_level("INFO"):
    np.testing.assert_array_equal(data.create(config, mesh_of(8)).mean, expected)
  warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
  assert len(warnings) == 1 and warnings[0].startswith(f"The cache file {cached} {problem}"), warnings
  assert warnings[0].endswith("computing the per-pixel mean again, and caching it anew.")
  np.testing.assert_array_equal(np.load(cached), expected)  # Rewritten: the next start loads it.


def test_more_class_folders_than_num_classes_fails_at_start_up(tmp_path):
  root = image_folder(tmp_path / "images", classes=("a", "b", "c"))
  with pytest.raises(ValueError, match=r"has 3 class folders but dataset.num_classes is 2; "
                                       r"set --config.dataset.num_classes=3"):
    data.create(folder_config(root, tmp_path), mesh_of(8))
  config = folder_config(root, tmp_path)
  config.num_classes = 5  # Fewer folders than classes is fine: the labels fit.
  ds = data.create(config, mesh_of(8))
  assert ds.info.num_classes == 5 and ds.info.train_size == 24
  assert set(np.asarray(ds.train_labels).ravel()) == {0, 1, 2}


def test_from_arrays_refuses_labels_outside_the_class_count():
  images = np.zeros((16, 8, 8, 3), np.uint8)
  with pytest.raises(ValueError, match=r"training labels must lie in \[0, 10\) for num_classes=10; "
                                       r"found labels from 0 to 10"):
    data.from_arrays(mesh_of(8), images, np.arange(16) % 11, images, np.zeros(16), name="x",
                     num_classes=10)
  with pytest.raises(ValueError, match=r"evaluation labels .* found labels from -1 to 0"):
    data.from_arrays(mesh_of(8), images, np.zeros(16), images, np.arange(16) % 2 - 1, name="x",
                     num_classes=10)


def test_main_names_a_corrupt_image_in_one_line_and_exits_2(tmp_path):
  root = image_folder(tmp_path / "images")
  (root / "test" / "a" / "4.jpg").write_bytes(b"\x00" * 100)
  completed = train_smoke_on_folder(root, tmp_path)
  assert completed.returncode == 2
  assert f"error: corrupt image {root}/test/a/4.jpg: cannot decode it" in completed.stderr
  assert "delete or replace it" in completed.stderr and "Traceback" not in completed.stderr


@pytest.mark.parametrize("side", [32, 72])  # Held on the devices; streamed.
def test_mean_none_gives_raw_pixels_and_reads_no_training_image(tmp_path, side):
  root = image_folder(tmp_path / "images", side=side, per_class=4)
  config = folder_config(root, tmp_path)
  config.mean = "none"
  raw = data.create(config, mesh_of(8), train=False)
  np.testing.assert_array_equal(np.asarray(raw.mean), np.zeros((1, 1, 3), np.float32))
  # No mean was computed (none is cached), so no training image was read for one.
  assert not list((tmp_path / "cache").glob("mean_*.npy"))
  config.mean = "per_pixel"
  centred = data.create(config, mesh_of(8), train=False)
  raw_batch, centred_batch = next(raw.eval_batches(8)), next(centred.eval_batches(8))
  pixels = np.asarray(raw_batch.images)
  assert pixels.min() >= 0 and pixels.max() <= 255 and np.all(pixels == np.rint(pixels))
  # The raw pixels are those the trainer's pipeline centres, bitwise once centred alike.
  np.testing.assert_array_equal(np.asarray(raw_batch.labels), np.asarray(centred_batch.labels))
  np.testing.assert_array_equal(pixels - np.asarray(centred.mean), np.asarray(centred_batch.images))


@pytest.mark.parametrize("image_size", [32, 72])  # Held on the devices; streamed.
def test_synthetic_data_subtracts_the_mean_its_config_names(image_size):
  def dataset(mean):
    config = data.default_config("synthetic")
    config.update(image_size=image_size, synthetic_train_size=64, synthetic_eval_size=16, mean=mean)
    return data.create(config, mesh_of(8))
  means = {kind: np.asarray(dataset(kind).mean) for kind in data.config.MEANS}
  per_pixel = means["per_pixel"]
  if image_size == 32:  # The training images' own, pixel by pixel.
    assert per_pixel.shape == (32, 32, 3) and 100 < per_pixel.mean() < 155
  else:  # Uniform noise's: every pixel's.
    np.testing.assert_array_equal(per_pixel, np.full((1, 1, 3), 127.5, np.float32))
  np.testing.assert_array_equal(means["per_channel"], per_pixel.mean(axis=(0, 1), keepdims=True))
  np.testing.assert_array_equal(means["none"], np.zeros((1, 1, 3), np.float32))
  raw = np.asarray(next(dataset("none").eval_batches(8)).images)
  centred = np.asarray(next(dataset("per_channel").eval_batches(8)).images)
  np.testing.assert_array_equal(raw - means["per_channel"], centred)
