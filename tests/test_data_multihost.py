"""The input pipelines across two real JAX processes (CPU collectives over gloo).

Each process holds 2 of the mesh's 4 devices, loads only its own blocks, and the
global batches it assembles must equal those of one process holding all 4.
"""
import json
import sys

import numpy as np
import pytest

import processes

WORKER = r"""
import json, os, sys
import jax
import numpy as np
process_id, num_processes, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
if num_processes > 1:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=num_processes, process_id=process_id)
from jax.experimental import multihost_utils
from resnet_jax.data import on_device

def images(count):  # pixel [0, 0] encodes the example id
  array = np.zeros((count, 8, 8, 3), np.uint8)
  array[:, 0, 0, 0], array[:, 0, 0, 1] = np.arange(count) // 256, np.arange(count) % 256
  return array

def ids(batch_images):
  pixels = np.rint(np.asarray(multihost_utils.process_allgather(batch_images, tiled=True))[:, 0, 0])
  return (pixels[:, 0] * 256 + pixels[:, 1]).astype(int).tolist()

mesh = jax.make_mesh((4,), ("data",))
loaded = []
def loader(source):
  def load(example_ids):
    loaded.extend(int(i) for i in example_ids)
    return source[example_ids]
  return load
num_train, num_eval = 402, 203
ds = on_device.build(mesh, np.arange(num_train) % 10, loader(images(num_train)),
                     np.arange(num_eval) % 10, loader(images(num_eval)), name="ids", num_classes=10,
                     seed=3, augment=False, mean=np.zeros((8, 8, 3), np.float32))
result = {"train": [ids(ds.train_batch(step, 8).images) for step in range(4)], "eval": []}
for batch in ds.eval_batches(12):
  mask = np.asarray(multihost_utils.process_allgather(batch.mask, tiled=True))
  result["eval"] += [i for i, m in zip(ids(batch.images), mask) if m]
result["loaded"] = len(loaded)
with open(out, "w") as f:
  json.dump(result, f)
"""


def _run(tmp_path, num_processes, worker=WORKER, *args):
  port = processes.free_port()
  outputs = [tmp_path / f"{num_processes}-{i}.json" for i in range(num_processes)]
  results = processes.run(
      [[sys.executable, "-c", worker, str(i), str(num_processes), str(port), str(outputs[i]), *args]
       for i in range(num_processes)], processes.environment(4 // num_processes), timeout=240)
  for result in results:
    assert result.returncode == 0, result.stderr[-3000:]
  return [json.loads(path.read_text()) for path in outputs]


def test_two_processes_assemble_the_batches_of_one(tmp_path):
  (single,) = _run(tmp_path, 1)
  first, second = _run(tmp_path, 2)
  # Both hosts see the same global batches, equal to the single-process ones.
  assert first["train"] == second["train"] == single["train"]
  assert first["eval"] == second["eval"] == single["eval"]
  # Every evaluation example exactly once; distinct examples within a train epoch.
  assert sorted(single["eval"]) == list(range(203))
  flat = [i for batch in single["train"] for i in batch]
  assert len(set(flat)) == len(flat) == 32
  # Each host loaded only its half of the data.
  assert first["loaded"] + second["loaded"] == single["loaded"]
  assert abs(first["loaded"] - second["loaded"]) <= 2


MULTISCALE_WORKER = r"""
import json, sys
import jax
import numpy as np
process_id, num_processes, port, out, root, cache = sys.argv[1:4] + sys.argv[4:7]
process_id, num_processes = int(process_id), int(num_processes)
if num_processes > 1:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=num_processes, process_id=process_id)
from jax.experimental import multihost_utils
from resnet_jax import data

config = data.default_config("image_folder")
config.data_dir, config.eval_split, config.cache_dir, config.mean = root, "val", cache, "per_channel"
ds = data.create(config, jax.make_mesh((4,), ("data",)))
batches = []
for batch in ds.eval_batches(4, "multiscale"):
  views = data.views(batch)
  # Flat images whose colour is 20 * id.
  colours = np.asarray(multihost_utils.process_allgather(views[0], tiled=True))[:, 50, 50, 0]
  mask = np.asarray(multihost_utils.process_allgather(batch.mask, tiled=True))
  ids = np.rint((colours + ds.mean[0, 0, 0]) / 20).astype(int)
  batches.append({"shapes": [list(view.shape[1:3]) for view in views],
                  "ids": [int(i) for i, m in zip(ids, mask) if m]})
with open(out, "w") as f:
  json.dump({"batches": batches, "mean": ds.mean.tolist()}, f)
"""


@pytest.mark.slow
def test_two_processes_batch_multiscale_views_by_aspect_as_one(tmp_path):
  # Flat-colour evaluation images of assorted aspect ratios: 10 examples over 4 buckets.
  sizes = [(100, 100), (90, 120), (120, 90), (90, 120), (80, 160), (100, 100), (72, 96),
           (160, 80), (100, 100), (96, 72)]
  from resnet_jax.data.sources import tensorflow  # pylint: disable=g-import-not-at-top
  tf = tensorflow()
  for split, count in (("train", 2), ("val", len(sizes))):
    (tmp_path / "images" / split / "a").mkdir(parents=True)
    for index in range(count):
      height, width = sizes[index]
      image = np.full((height, width, 3), 20 * index, np.uint8)
      (tmp_path / "images" / split / "a" / f"{index}.png").write_bytes(tf.io.encode_png(image).numpy())
  # Apart caches: two processes read the sizes and the mean in shares and gather them.
  images = str(tmp_path / "images")
  (single,) = _run(tmp_path, 1, MULTISCALE_WORKER, images, str(tmp_path / "cache1"))
  first, second = _run(tmp_path, 2, MULTISCALE_WORKER, images, str(tmp_path / "cache2"))
  assert first == second == single
  assert single["mean"] == [[[20 * 0.5] * 3]]  # Images 0 and 1: colours 0 and 20.
  single = single["batches"]
  assert sorted(i for batch in single for i in batch["ids"]) == list(range(len(sizes)))
  for batch in single:  # One aspect bucket per batch: here each image's own ratio.
    for i in batch["ids"]:
      scale = lambda side, length: round(side * length / min(sizes[i]))
      assert batch["shapes"] == [[scale(side, sizes[i][0]), scale(side, sizes[i][1])]
                                 for side in (224, 256, 384, 480, 640)]
