"""The on-device pipeline across two real JAX processes (CPU collectives over gloo).

Each process holds 2 of the mesh's 4 devices, loads only its own blocks, and the
global batches it assembles must equal those of one process holding all 4.
"""
import json
import sys

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


def _run(tmp_path, num_processes):
  port = processes.free_port()
  outputs = [tmp_path / f"{num_processes}-{i}.json" for i in range(num_processes)]
  results = processes.run(
      [[sys.executable, "-c", WORKER, str(i), str(num_processes), str(port), str(outputs[i])]
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
