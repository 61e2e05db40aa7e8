"""Input pipelines for the paper's datasets: `ds = data.create(config.dataset, mesh)`.

`create` returns an `OnDeviceDataset` (CIFAR-sized data: CIFAR-10/100, image folders of images
up to 64 pixels, small synthetic data) or a `StreamingDataset` (ImageNet, image folders of larger
images, synthetic data larger than 64 pixels).

    # OnDeviceDataset: a pytree; pass it into jax.jit.
    batch = ds.train_batch(step, batch_size)  # Batch(images, labels, mask), pure in (seed, step)
    for batch in ds.eval_batches(batch_size): ...  # every example once; mask False on padding
    # StreamingDataset:
    it = ds.train_iterator(batch_size, start_step=0)  # it.get_state() / it.set_state(state)
    for batch in ds.eval_batches(batch_size, protocol="center" | "10crop" | "multiscale"): ...

Multi-view protocols give `batch.images` as a tuple of views (`data.views(batch)`); average
the softmax scores over them. All batches are global arrays sharded on the mesh axis "data";
the global batch size must be a multiple of that axis's size.

Config fields (`default_config(name)` gives the defaults; set only what differs):
  name: "cifar10" | "cifar100" | "imagenet2012" | "image_folder" | "synthetic".
  data_dir: TFDS data_dir (None: TFDS's default), or the image folder root laid out
    <root>/<split>/<class>/<image> (classes sorted by name give the labels); a local path or a
    URI that etils.epath and tf.io.gfile read (gs://...). Nothing is ever downloaded: a missing
    TFDS dataset raises `DatasetNotFoundError` saying how to fix it; an image that does not
    decode raises `CorruptImageError` naming it.
  train_split: "train", or "train45k" (paper section 4.2: the training set minus a fixed,
    stratified 5k; image folders too); for image folders any split folder name.
  eval_split: "test" / "validation" (ImageNet), or "val5k" (the 5k held out of "train45k").
  seed: sampling and augmentation seed; a run's batches are a pure function of (seed, step).
  image_size: side of synthetic images (> 64 streams them like ImageNet). Real data keeps its
    own size: CIFAR-sized images as they are, larger ones cropped to 224 (section 3.4).
  num_classes: the class count of synthetic data and image folders (a folder may hold fewer
    class folders, never more). TFDS datasets have their own.
  synthetic_train_size, synthetic_eval_size: synthetic split sizes.
  augment: training augmentation (CIFAR: pad 4 + random crop + flip; ImageNet: scale
    augmentation + 224 crop + flip + PCA lighting). Evaluation is never augmented.
  cache_dir: where the per-pixel mean is cached, local or gs:// (default $RESNET_JAX_CACHE_DIR,
    else ~/.cache/resnet_jax).

Synthetic datasets say so: `info.synthetic` is True and `info.name` reads like
"synthetic(32x32x3,10 classes)". The synthetic and in-memory (`from_arrays`) paths never import
TensorFlow; TFDS and image folders do, with GPUs hidden from TensorFlow.
"""
from resnet_jax.data.config import DATASETS, default_config
from resnet_jax.data.core import Batch, CorruptImageError, DatasetInfo, DatasetNotFoundError, views
from resnet_jax.data.on_device import OnDeviceDataset, from_arrays
from resnet_jax.data.pipeline import create
from resnet_jax.data.streaming import StreamingDataset, TrainIterator

__all__ = ["DATASETS", "Batch", "CorruptImageError", "DatasetInfo", "DatasetNotFoundError",
           "OnDeviceDataset", "StreamingDataset", "TrainIterator", "create", "default_config",
           "from_arrays", "views"]
