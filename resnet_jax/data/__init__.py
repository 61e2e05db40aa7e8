"""Input pipelines for the paper's datasets: `ds = data.create(config.dataset, mesh)`.

`create` returns an `OnDeviceDataset` (CIFAR-sized data: CIFAR-10/100, image folders of images
up to 64 pixels, small synthetic data) or a `StreamingDataset` (ImageNet, image folders of larger
images, synthetic data larger than 64 pixels). Both are a `data.Dataset`, used one way:

    it = ds.train_iterator(batch_size, start_step)   # it.get_state() / it.set_state(s) / it.close()
    step = jax.jit(lambda state, inputs: update(state, it.batch(inputs, state.step)))
    state = step(state, next(it))                    # Batch(images, labels, mask) inside the step
    for batch in ds.eval_batches(batch_size, protocol): ...  # a protocol of ds.eval_protocols

The batch of a step is a pure function of (seed, step). Evaluation visits every example once
(mask False on padding rows); multi-view protocols give `batch.images` as a tuple of views
(`data.views(batch)`) whose softmax scores are averaged. All batches are global arrays sharded
on the mesh axis "data"; the global batch size must be a multiple of that axis's size.

The config's fields are documented at their defaults (`data.default_config`). The synthetic and
in-memory (`from_arrays`) paths never import TensorFlow; TFDS and image folders do, with GPUs
hidden from TensorFlow.
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
