"""Input pipelines for the paper's datasets: `ds = data.create(config.dataset, mesh)`.

`create` returns an `OnDeviceDataset` (CIFAR-sized data: CIFAR-10/100, image folders of images
up to 64 pixels, small synthetic data) or a `StreamingDataset` (ImageNet, image folders of larger
images, synthetic data larger than 64 pixels). Both are a `data.Dataset`, used one way:

    it = ds.train_iterator(batch_size, start_step)   # it.get_state() / it.set_state(s) / it.close()
    step = jax.jit(lambda state, inputs: update(state, it.batch(inputs, state.step)))
    state = step(state, next(it))                    # Batch(images, labels, mask) inside the step
    for batch in ds.eval_batches(batch_size, protocol): ...  # a protocol of ds.eval_protocols

`next(it)` is what the jitted step takes: an on-device dataset gives itself, and `it.batch`
samples and augments inside the step (no host work between steps; the batch of a step is a
pure function of (seed, step)); a streaming dataset gives the next batch, decoded and prefetched
onto the devices by a background thread. Evaluation visits every example once (mask False on
padding rows). `eval_protocols`: ("center",) on device (small images are evaluated whole);
("center", "10crop", "multiscale") streaming, where multi-view protocols give `batch.images`
as a tuple of views (`data.views(batch)`) whose softmax scores are averaged. "multiscale" is
the fully-convolutional form (Sec. 3.4): the whole image at shorter sides 224 to 640, each batch
of one aspect-ratio bucket (`imagenet.MULTISCALE_ASPECTS`; the images' sizes are read at the
first such evaluation and cached like the mean). All batches are
global arrays sharded on the mesh axis "data"; the global batch size must be a multiple of that
axis's size.

Start-up: an on-device dataset decodes both splits onto the devices (logged with its counts)
and computes or loads its per-pixel mean; a streaming one only lists its examples: a TFDS split
is opened by index (its size read from metadata, no record read), and each label is read with
its image when a step needs it. Every phase that can take long logs an INFO line. An evaluator's
`create(config, mesh, train=False, eval_protocol=p)` checks the protocol before any image is
decoded and reads the evaluation split alone (the training images only for a mean not cached).

Config fields (`default_config(name)` gives the defaults; set only what differs):
  name: "cifar10" | "cifar100" | "imagenet2012" | "image_folder" | "synthetic".
  data_dir: TFDS data_dir (None: TFDS's default), or the image folder root laid out
    <root>/<split>/<class>/<image> (classes sorted by name give the labels); a local path or a
    URI that etils.epath and tf.io.gfile read (gs://...). Nothing is ever downloaded: a missing
    TFDS dataset raises `DatasetNotFoundError` saying how to fix it; an image that does not
    decode raises `CorruptImageError` naming it. The first training image's size picks the
    pipeline: up to 64 pixels a side (and 4 GiB of images per device) the folder is held on the
    devices, and every image of both splits must have that size, else `ImageSizeError` stops
    the run at start-up naming the first odd image and its size; larger images stream, and may
    differ in size.
  train_split: "train", or "train45k" (paper section 4.2: the training set minus a fixed,
    stratified 5k; image folders too); for image folders any split folder name.
  eval_split: "test" / "validation" (ImageNet), or "val5k" (the 5k held out of "train45k").
  seed: sampling and augmentation seed; a run's batches are a pure function of (seed, step).
    None: the trainer's run seed (`config.seed`, which also initialises the model), else 0.
  image_size: side of synthetic images (> 64 streams them like ImageNet). Real data keeps its
    own size: CIFAR-sized images as they are, larger ones cropped to 224 (section 3.4).
  num_classes: the class count of synthetic data and image folders (a folder may hold fewer
    class folders, never more). TFDS datasets have their own.
  synthetic_train_size, synthetic_eval_size: synthetic split sizes.
  augment: training augmentation (CIFAR: pad 4 + random crop + flip; ImageNet: scale
    augmentation + 224 crop + flip + PCA lighting). Evaluation is never augmented.
  cache_dir: where the per-pixel mean and the evaluation images' sizes are cached, local or
    gs:// (default $RESNET_JAX_CACHE_DIR, else ~/.cache/resnet_jax), each under what it was
    computed from: an image folder's file names, sizes and modification times, a TFDS split's
    name, version, folder and size, and the image size; a file that is unreadable or of another
    shape is computed again, with a WARNING naming it.
  mean: "per_pixel" (the paper: the training split's mean image, CIFAR's over every image,
    ImageNet's the mean 224 centre view of up to 50,000 images, resized to views of other
    sizes; computed once and cached) or "per_channel" (that image's channel means).

Synthetic datasets say so: `info.synthetic` is True and `info.name` reads like
"synthetic(32x32x3,10 classes)". The synthetic and in-memory (`from_arrays`) paths never import
TensorFlow; TFDS and image folders do, with GPUs hidden from TensorFlow.
"""
from resnet_jax.data.config import DATASETS, default_config
from resnet_jax.data.core import (Batch, CorruptImageError, Dataset, DatasetInfo, DatasetNotFoundError,
                                  ImageSizeError, TrainIterator, views)
from resnet_jax.data.on_device import OnDeviceDataset, from_arrays
from resnet_jax.data.pipeline import create
from resnet_jax.data.streaming import StreamingDataset

__all__ = ["DATASETS", "Batch", "CorruptImageError", "Dataset", "DatasetInfo", "DatasetNotFoundError",
           "ImageSizeError", "OnDeviceDataset", "StreamingDataset", "TrainIterator", "create",
           "default_config", "from_arrays", "views"]
