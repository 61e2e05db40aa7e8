"""Tests of the ImageNet transforms (section 3.4) and the streaming tf.data pipeline."""
import jax
import numpy as np
import pytest
from PIL import Image

from resnet_jax import data
from resnet_jax.data import decoding, imagenet, mean_cache, record_reader, sources
from resnet_jax.data.sources import tensorflow, tensorflow_datasets

tf = tensorflow()
tfds = tensorflow_datasets()
SIZES = [(300, 500), (500, 300), (256, 256), (1000, 200), (180, 240), (480, 640)]


def mesh_of(num_devices: int):
  return jax.make_mesh((num_devices,), ("data",), devices=jax.devices()[:num_devices])


def random_image(height, width, seed=0):
  return tf.constant(np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8))


@pytest.mark.parametrize("height,width", SIZES)
def test_train_view_shapes_and_window_geometry(height, width):
  image = random_image(height, width)
  view, offset = imagenet.train_view(image, tf.constant([0, 1], tf.int64))
  assert view.shape == (224, 224, 3) and view.dtype == tf.uint8 and offset.shape == (3,)
  shorter = min(height, width)
  implied_scales = []
  for position in range(200):
    y, x, side = (int(v) for v in imagenet.train_window(height, width, tf.constant([7, position], tf.int64)))
    assert 0 <= y <= height - side and 0 <= x <= width - side
    implied_scales.append(224 * shorter / side)  # The shorter side the crop corresponds to.
  assert min(implied_scales) >= 256 * 0.97 and max(implied_scales) <= 480 * 1.03
  assert min(implied_scales) < 290 and max(implied_scales) > 440  # The whole [256, 480] range is used.


def test_train_view_from_jpeg_bytes_matches_geometry():
  jpeg = tf.io.encode_jpeg(random_image(375, 500))
  view, _ = imagenet.train_view_from_bytes(jpeg, tf.constant([3, 4], tf.int64))
  assert view.shape == (224, 224, 3)
  png = tf.io.encode_png(random_image(375, 500))
  assert imagenet.train_view_from_bytes(png, tf.constant([3, 4], tf.int64))[0].shape == (224, 224, 3)


def test_lighting_noise_statistics():
  offsets = np.stack([imagenet.lighting_offset(tf.constant([0, i], tf.int64)).numpy() for i in range(400)])
  expected_std = np.sqrt((imagenet.EIGVEC ** 2) @ (imagenet.EIGVAL * 0.1) ** 2) * 255
  np.testing.assert_allclose(offsets.std(axis=0), expected_std, rtol=0.2)
  assert np.all(np.abs(offsets.mean(axis=0)) < expected_std * 0.3)


def test_center_view_of_a_256_square_is_its_middle():
  image = random_image(256, 256)
  view, offset = imagenet.center_view(image)
  np.testing.assert_array_equal(view.numpy(), image.numpy()[16:240, 16:240])
  np.testing.assert_array_equal(offset.numpy(), np.zeros(3))  # The device subtracts the mean.


def test_ten_crops_are_corners_centre_and_mirrors():
  image = random_image(256, 340).numpy()  # Shorter side already 256: no resampling.
  views, _ = imagenet.ten_crop_views(tf.constant(image))
  views = views.numpy()
  assert views.shape == (10, 224, 224, 3)
  expected = [image[:224, :224], image[:224, -224:], image[-224:, :224], image[-224:, -224:],
              image[16:240, 58:282]]
  for index, crop in enumerate(expected):
    np.testing.assert_array_equal(views[index], crop)
    np.testing.assert_array_equal(views[index + 5], crop[:, ::-1])


@pytest.mark.parametrize("height,width", SIZES)
def test_eval_views_shapes(height, width):
  image = random_image(height, width)
  assert imagenet.center_view(image)[0].shape == (224, 224, 3)
  assert imagenet.ten_crop_views(image)[0].shape == (10, 224, 224, 3)
  sizes = imagenet.multiscale_sizes(imagenet.multiscale_aspect(height, width))
  views = imagenet.multiscale_views(image, tf.constant(sizes))[0]
  assert [tuple(v.shape) for v in views] == [(h, w, 3) for h, w in sizes]
  assert [min(h, w) for h, w in sizes] == [224, 256, 384, 480, 640]


@pytest.mark.parametrize("height,width,aspect", [
    (300, 400, 3 / 4), (400, 300, 4 / 3), (256, 256, 1), (100, 111, 1), (100, 112, 4 / 5),
    (1000, 200, 3), (200, 700, 1 / 3), (500, 333, 3 / 2), (72, 160, 1 / 2), (160, 70, 5 / 2)])
def test_multiscale_aspect_is_the_nearest_bucket_in_log_space(height, width, aspect):
  assert imagenet.multiscale_aspect(height, width) == pytest.approx(aspect)


@pytest.mark.parametrize("height,width", [(300, 400), (400, 300), (256, 256), (500, 250), (240, 600)])
def test_an_image_of_a_buckets_ratio_keeps_its_aspect(height, width):
  sizes = imagenet.multiscale_sizes(imagenet.multiscale_aspect(height, width))
  for side, size in zip(imagenet.MULTISCALE_SIDES, sizes):
    assert tuple(size) == tuple(imagenet.resize_shorter(random_image(height, width), side).shape[:2])


def test_multiscale_buckets_change_an_aspect_by_at_most_sqrt_5_4_up_to_3():
  ratios = np.exp(np.linspace(0, np.log(3), 2000))
  changes = [max(r, a) / min(r, a) for r in ratios
             for a in [imagenet.multiscale_aspect(round(1000 * r), 1000)]]
  assert max(changes) == pytest.approx(np.sqrt(5 / 4), rel=1e-3)
  assert len({imagenet.multiscale_aspect(h, w) for h, w in [(round(1000 * r), 1000) for r in ratios]
              + [(1000, round(1000 * r)) for r in ratios]}) == 15


def test_image_shape_reads_jpeg_headers_and_decodes_others():
  image = random_image(90, 130)
  assert tuple(imagenet.image_shape(tf.io.encode_jpeg(image)).numpy()) == (90, 130)
  assert tuple(imagenet.image_shape(tf.io.encode_png(image)).numpy()) == (90, 130)


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
  """train: 2 classes x 12 JPEGs of assorted sizes; val: 11 flat-colour JPEGs, colour = 20 * id."""
  root = tmp_path_factory.mktemp("folder")
  rng = np.random.default_rng(0)
  for label in ("a", "b"):
    (root / "train" / label).mkdir(parents=True)
    for index in range(12):
      height, width = rng.integers(200, 520, 2)
      (root / "train" / label / f"{index}.jpg").write_bytes(tf.io.encode_jpeg(random_image(height, width, index)).numpy())
  (root / "val" / "a").mkdir(parents=True)
  (root / "val" / "b").mkdir(parents=True)
  for index in range(11):
    height, width = rng.integers(230, 400, 2)
    flat = tf.fill([height, width, 3], tf.constant(20 * index, tf.uint8))
    (root / "val" / "a" / f"{index:02d}.png").write_bytes(tf.io.encode_png(flat).numpy())
  return root


def folder_dataset(root, mesh, **fields):
  config = data.default_config("image_folder")
  config.data_dir, config.eval_split, config.image_size = str(root), "val", 224
  config.cache_dir = str(root.parent / f"{root.name}_cache")
  config.update(fields)
  return data.create(config, mesh)


def pil_pixels(path) -> np.ndarray:
  """uint8 [H, W, 3]: the image file as PIL decodes it, as torchvision's loaders read images."""
  with Image.open(path) as image:
    return np.asarray(image.convert("RGB"))


def mean_centre_view(root) -> np.ndarray:
  """The mean 224 centre view of the folder's training images, computed here, image by image
  from PIL's pixels."""
  views = [imagenet.center_view(tf.constant(pil_pixels(path)))[0].numpy()
           for path in sorted(root.glob("train/*/*.jpg"))]
  return np.mean(views, axis=0, dtype=np.float64)


# JPEGs as PIL writes them: 4:2:0 chroma (its default), 4:4:4, progressive, greyscale, CMYK.
PIL_JPEGS = {"a": ("RGB", {"quality": 75}), "b": ("RGB", {"quality": 90, "subsampling": 0}),
             "c": ("RGB", {"quality": 75, "progressive": True}), "d": ("L", {"quality": 75}),
             "e": ("CMYK", {"quality": 90})}


def test_streaming_views_and_mean_are_of_pils_pixels(tmp_path):
  """Every JPEG decodes to PIL's pixels (libjpeg's accurate IDCT), so a model sees the pixels its
  PyTorch training code saw: each class of this folder is one kind of 500x375 JPEG, its
  training image one view of a smooth scene plus noise, its validation image another."""
  root = tmp_path / "images"
  y, x = np.mgrid[0:375, 0:500]
  rng = np.random.default_rng(0)
  for index, (label, (mode, options)) in enumerate(PIL_JPEGS.items()):
    for split in ("train", "val"):
      scene = np.stack([x * 0.4 + 30 * np.sin(y / (7 + index)), y * 0.5 + 40 * np.cos(x / 11),
                        (x + y + 50 * index) % 200], axis=-1)
      pixels = np.clip(scene + rng.normal(0, 15, scene.shape), 0, 255).astype(np.uint8)
      (root / split / label).mkdir(parents=True, exist_ok=True)
      Image.fromarray(pixels).convert(mode).save(root / split / label / "0.jpg", "JPEG", **options)
  for path in sorted(root.glob("*/*/*.jpg")):
    np.testing.assert_array_equal(decoding.decode(tf.io.read_file(str(path))), pil_pixels(path))
  ds = folder_dataset(root, mesh_of(8), num_classes=len(PIL_JPEGS))
  np.testing.assert_allclose(ds.mean, mean_centre_view(root), atol=1e-3)
  (batch,) = list(ds.eval_batches(8, "center"))
  mask = np.asarray(batch.mask)
  views = np.asarray(batch.images)[mask] + np.asarray(ds.mean)
  for label, view in zip(np.asarray(batch.labels)[mask], views):
    path = root / "val" / sorted(PIL_JPEGS)[label] / "0.jpg"
    expected = imagenet.center_view(tf.constant(pil_pixels(path)))[0].numpy()
    np.testing.assert_allclose(view, expected, atol=1e-3)


def test_the_per_pixel_mean_is_the_mean_centre_view_of_the_training_images_cached(
    jpeg_folder, tmp_path):
  ds = folder_dataset(jpeg_folder, mesh_of(8), cache_dir=str(tmp_path))
  assert ds.mean.shape == (224, 224, 3)
  np.testing.assert_allclose(ds.mean, mean_centre_view(jpeg_folder), atol=1e-3)
  # Computed once: a later start reads the cache file (here altered, to tell the two apart).
  (cached,) = tmp_path.glob("mean_*.npy")
  np.save(cached, np.full((224, 224, 3), 7.0, np.float32))
  assert np.all(folder_dataset(jpeg_folder, mesh_of(8), cache_dir=str(tmp_path)).mean == 7.0)
  per_channel = folder_dataset(jpeg_folder, mesh_of(8), cache_dir=str(tmp_path), mean="per_channel")
  np.testing.assert_array_equal(per_channel.mean, np.full((1, 1, 3), 7.0))


def test_a_mean_cached_from_tensorflows_default_decode_is_not_served(jpeg_folder, tmp_path):
  # Before 0.3.0 JPEGs decoded with TensorFlow's fast IDCT, and means were cached under this key.
  train = sources.folder_records(jpeg_folder, "train")
  ids = np.arange(len(train))  # All of them: fewer than imagenet.MEAN_SAMPLE.
  key = f"{sources.fingerprint(train, ids)} {len(ids)} sampled centre 224 of shorter side 256"
  np.save(mean_cache.cache_path(key, str(tmp_path)), np.full((224, 224, 3), 7.0, np.float32))
  ds = folder_dataset(jpeg_folder, mesh_of(8), cache_dir=str(tmp_path))
  np.testing.assert_allclose(ds.mean, mean_centre_view(jpeg_folder), atol=1e-3)


@pytest.mark.parametrize("mean", ["per_pixel", "per_channel"])
def test_each_view_has_the_mean_resized_to_it_subtracted(jpeg_folder, mean):
  # The validation images are flat colours: a view plus the mean that was subtracted from it
  # must be flat again, whatever the view's size.
  ds = folder_dataset(jpeg_folder, mesh_of(8), mean=mean)
  expected = mean_centre_view(jpeg_folder)
  if mean == "per_channel":
    expected = expected.mean(axis=(0, 1), keepdims=True)
  np.testing.assert_allclose(ds.mean, expected, atol=1e-3)
  batch = next(ds.eval_batches(8, "multiscale"))
  views = data.views(batch)
  assert [min(view.shape[1:3]) for view in views] == list(imagenet.MULTISCALE_SIDES)
  for view in views:
    added_back = np.asarray(view)[np.asarray(batch.mask)] + np.asarray(ds.mean_of(*view.shape[1:3]))
    flat = added_back - added_back[:, :1, :1]
    np.testing.assert_allclose(flat, 0, atol=1e-3)
  resized = np.asarray(ds.mean_of(480, 480))
  if mean == "per_pixel":  # The mean image stretched to 480 as TensorFlow's bilinear resize does.
    np.testing.assert_allclose(resized, tf.image.resize(ds.mean, (480, 480)).numpy(), atol=1e-3)
  else:
    np.testing.assert_array_equal(resized, ds.mean)


def test_streaming_folder_train_is_deterministic_and_resumable(jpeg_folder):
  ds = folder_dataset(jpeg_folder, mesh_of(8))
  assert ds.info.train_size == 24 and ds.info.image_shape == (224, 224, 3) and not ds.info.synthetic
  assert ds.eval_protocols == ("center", "10crop", "multiscale")
  iterator = ds.train_iterator(8)
  first = [next(iterator) for _ in range(4)]  # Crosses into the second epoch (3 steps per epoch).
  assert iterator.batch(first[3], 3) is first[3]  # What the step takes is already the batch.
  state = iterator.get_state()
  assert int(state["step"]) == 4
  following = next(iterator)
  iterator.close()
  assert first[0].images.shape == (8, 224, 224, 3) and first[0].images.dtype == np.float32
  assert first[0].images.sharding.spec[0] == "data"
  resumed = ds.train_iterator(8)
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed).images, following.images)
  resumed.close()
  fresh = ds.train_iterator(8)
  np.testing.assert_array_equal(next(fresh).images, first[0].images)
  assert not np.array_equal(first[1].images, first[0].images)
  fresh.close()


@pytest.mark.parametrize("num_devices,batch_size,protocol", [
    (1, 4, "center"), (1, 16, "center"), (8, 8, "center"), (8, 16, "center"), (8, 8, "10crop"),
    (1, 4, "multiscale"), (8, 8, "multiscale"), (8, 16, "multiscale")])
def test_streaming_eval_visits_every_example_once(jpeg_folder, num_devices, batch_size, protocol):
  ds = folder_dataset(jpeg_folder, mesh_of(num_devices))
  seen = []
  for batch in ds.eval_batches(batch_size, protocol):
    views = data.views(batch)
    assert len(views) == {"center": 1, "10crop": 10, "multiscale": 5}[protocol]
    colours = np.asarray(views[-1])[:, 100, 100] + np.asarray(ds.mean_of(*views[-1].shape[1:3]))[100, 100]
    ids = np.rint(colours[np.asarray(batch.mask), 0] / 20).astype(int)
    seen.extend(ids)
    if protocol == "multiscale":  # Whole images of one aspect bucket per batch.
      for index in ids:
        height, width = tf.io.decode_image((jpeg_folder / "val" / "a" / f"{index:02d}.png").read_bytes()).shape[:2]
        sizes = imagenet.multiscale_sizes(imagenet.multiscale_aspect(height, width))
        assert [tuple(view.shape[1:3]) for view in views] == [tuple(size) for size in sizes]
  assert sorted(seen) == list(range(11))


def test_unknown_protocol_and_synthetic_streaming():
  config = data.default_config("synthetic")
  config.image_size, config.synthetic_train_size, config.synthetic_eval_size = 224, 64, 20
  ds = data.create(config, mesh_of(8))
  assert isinstance(ds, data.StreamingDataset)
  assert ds.info.synthetic and ds.info.name == "synthetic(224x224x3,10 classes)"
  assert ds.eval_protocols == ("center",)
  iterator = ds.train_iterator(16)
  assert next(iterator).images.shape == (16, 224, 224, 3)
  iterator.close()
  assert sum(int(b.mask.sum()) for b in ds.eval_batches(16)) == 20
  with pytest.raises(ValueError, match=r"eval_protocol '10crop' is not available for synthetic\(224x224x3,10 "
                                       r"classes\), whose 224x224 images are evaluated by 'center'; use one"):
    next(ds.eval_batches(16, "10crop"))


def test_imagenet_missing_is_a_clear_error(tmp_path):
  config = data.default_config("imagenet2012")
  config.data_dir = str(tmp_path)
  with pytest.raises(data.DatasetNotFoundError, match="downloads/manual"):
    data.create(config, mesh_of(8))


def colour_of(label):
  return 40 * label + 20


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  """A TFDS dataset in array_record files: "tiny_images", 5 classes, JPEGs of assorted sizes
  whose flat colour gives the label (`colour_of`); train 30 examples, validation 13."""
  root = tmp_path_factory.mktemp("tfds")

  def split(count, salt):
    rng = np.random.default_rng(salt)
    labels = rng.integers(0, 5, count)
    sizes = rng.integers(230, 330, (count, 2))
    def examples():
      for label, (height, width) in zip(labels, sizes):
        yield {"image": np.full((height, width, 3), colour_of(label), np.uint8), "label": label}
    spec = {"image": tf.TensorSpec([None, None, 3], tf.uint8), "label": tf.TensorSpec([], tf.int64)}
    return tf.data.Dataset.from_generator(examples, output_signature=spec)

  features = tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(None, None, 3)),
                                         "label": tfds.features.ClassLabel(num_classes=5)})
  tfds.dataset_builders.store_as_tfds_dataset(
      "tiny_images", "1.0.0", features, {"train": split(30, 0), "validation": split(13, 1)},
      data_dir=root, file_format="array_record")
  return root


class CountingSource:
  """TFDS's data source, counting the records read through it."""

  def __init__(self, source):
    self.source, self.reads = source, 0

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    self.reads += 1
    return self.source[index]

  def __getitems__(self, indices):
    self.reads += len(indices)
    return self.source.__getitems__(indices)

  def __iter__(self):
    return (self[index] for index in range(len(self)))


def labels_of(ds, batch):
  """The labels the batch's flat-coloured centre views show, and the labels it carries."""
  colours = np.asarray(data.views(batch)[0])[:, 112, 112, 0] + np.asarray(ds.mean_of(224, 224))[112, 112, 0]
  mask = np.asarray(batch.mask)
  return np.rint((colours[mask] - 20) / 40).astype(int), np.asarray(batch.labels)[mask]


def test_tfds_start_up_reads_no_records_and_labels_travel_with_their_images(tfds_dir, tmp_path,
                                                                           monkeypatch, caplog):
  config = data.default_config("imagenet2012")
  config.seed = 0  # data.create's default, which this test bypasses.
  config.augment = False  # The centre view: a flat colour, so the image shows its label.
  config.cache_dir = str(tmp_path)
  # The per-pixel mean reads the training images once; later starts load it from the cache.
  record_reader.mean_image(config, sources.tfds_random_access("tiny_images", str(tfds_dir), "train"))
  opened = []
  as_data_source = tfds.core.DatasetBuilder.as_data_source

  def counting(self, *args, **kwargs):
    opened.append(CountingSource(as_data_source(self, *args, **kwargs)))
    return opened[-1]

  monkeypatch.setattr(tfds.core.DatasetBuilder, "as_data_source", counting)
  with caplog.at_level("INFO"):
    train = sources.tfds_random_access("tiny_images", str(tfds_dir), "train")
    evaluation = sources.tfds_random_access("tiny_images", str(tfds_dir), "validation")
    ds = data.StreamingDataset.from_records(config, mesh_of(8), train, evaluation, name="tiny_images",
                                            num_classes=5)
  assert [source.reads for source in opened] == [0, 0]  # Start-up read only the metadata.
  assert (ds.info.train_size, ds.info.eval_size) == (30, 13)
  messages = [record.getMessage() for record in caplog.records]
  assert f"Opened TFDS tiny_images:train in {tfds_dir}/tiny_images/1.0.0 for random access: 30 examples" in messages
  assert any(m.startswith("Streaming tiny_images through tf.data: 30 training examples (this process "
                          "reads 24) and 13 evaluation examples") for m in messages), messages

  iterator = ds.train_iterator(8)
  for _ in range(4):  # Crosses into the second epoch (3 steps per epoch).
    shown, carried = labels_of(ds, iterator.batch(next(iterator), 0))
    np.testing.assert_array_equal(shown, carried)
  iterator.close()
  assert opened[0].reads >= 32 and opened[1].reads == 0
  shown, carried = np.concatenate([np.stack(labels_of(ds, batch)) for batch in ds.eval_batches(8)], axis=1)
  np.testing.assert_array_equal(shown, carried)
  assert len(carried) == 13
  np.testing.assert_array_equal(np.sort(carried), np.sort([int(evaluation.data_source.source[i]["label"])
                                                           for i in range(13)]))
