"""Every file the package reads or writes goes through a path abstraction that takes gs:// URIs.

The trainer runs with its workdir, image folder and mean cache on TensorFlow's in-memory
`ram://` file system, registered with etils.epath as gs:// is (through tf.io.gfile): a path that
went around the abstraction (open, os.path, pathlib) would fail there or create `./ram:` in the
working directory. Orbax is the one exception: its array writes go through TensorStore, which
takes only absolute local paths and gs:// (its own GCS driver), so the run's checkpoints go to
a local directory here, and a test shows that orbax refuses a ram:// one.
"""
import json
import os
import pathlib
import re
from unittest import mock

import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from etils.epath import backend, gpath, register

from configs import cifar_resnet20
from resnet_jax.training import checkpoints, loop
from resnet_jax.data import sources

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "resnet_jax"
# Local-disk-only ways to reach a file; `path.open(...)` (epath's) is not one of them.
BYPASSES = re.compile(r"(?<![\w.])(?<!def )open\(|\bpathlib\b|\bshutil\b|\btempfile\b|"
                      r"\bglob\.glob\b|\bos\.(path|scandir|listdir|makedirs|mkdir|replace|"
                      r"rename|remove|unlink|walk|stat)\b")
# (file, what): where the path can never be remote.
ALLOWED = {
    # The throughput benchmark writes its generated JPEGs to a scratch folder of this machine.
    ("tools/input_benchmark.py", "tempfile"),
    # The free-space check asks the local disk; a gs:// workdir fails it (OSError) and is skipped.
    ("training/checkpoints.py", "shutil"),
    # The mean cache's key takes a local file's modification time in nanoseconds, which epath's
    # stat rounds to seconds; a URI's is read through epath.
    ("data/sources.py", "os.stat"),
    # A claim's holder is told from a later process with its id by this host's /proc, never a URI.
    ("training/claim.py", "open"),
}


def test_no_file_access_around_the_path_abstractions():
  found = []
  for path in sorted(PACKAGE.rglob("*.py")):
    name = path.relative_to(PACKAGE).as_posix()
    for number, line in enumerate(path.read_text().splitlines(), 1):
      code = line.split("#")[0]
      found += [f"resnet_jax/{name}:{number}: {line.strip()}" for match in BYPASSES.finditer(code)
                if (name, match.group(0).rstrip("(")) not in ALLOWED]
  assert not found, "use etils.epath (or tf.io.gfile) instead:\n" + "\n".join(found)


@pytest.fixture
def ram():
  """A fresh `ram://<bucket>` root that epath reaches through tf.io.gfile, as it does gs://."""
  with mock.patch.object(gpath, "_URI_PREFIXES", gpath._URI_PREFIXES + ("ram://",)), \
       mock.patch.object(gpath, "_URI_SCHEMES", gpath._URI_SCHEMES | {"ram"}), \
       mock.patch.dict(gpath._URI_MAP_ROOT, {"ram://": "/ram/"}), \
       mock.patch.dict(gpath._PREFIX_TO_BACKEND, {"ram": backend.tf_backend}), \
       mock.patch.dict(register._URI_PREFIXES_TO_CLS, {"ram://": gpath.PosixGPath}):
    yield epath.Path(f"ram://bucket-{os.urandom(4).hex()}")


def write_image_folder(root: epath.Path) -> None:
  tf = sources.tensorflow()
  rng = np.random.default_rng(0)
  for split, count in (("train", 16), ("test", 8)):
    for name in ("a", "b"):
      (root / split / name).mkdir(parents=True)
      for index in range(count):
        image = tf.io.encode_jpeg(rng.integers(0, 256, (32, 32, 3), np.uint8)).numpy()
        (root / split / name / f"{index}.jpg").write_bytes(image)


def smoke_config():
  config = cifar_resnet20.get_config("smoke")
  config.update(model="cifar_resnet8", num_train_steps=4, lr_boundaries=(2,), log_every_steps=2,
                eval_every_steps=2, checkpoint_every_steps=2)
  return config


@pytest.mark.parametrize("dataset", ["synthetic", "image_folder"])
def test_trainer_runs_with_every_path_a_uri(ram, tmp_path, monkeypatch, dataset):
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  config = smoke_config()
  if dataset == "image_folder":
    write_image_folder(ram / "images")
    config.dataset.update(name="image_folder", data_dir=str(ram / "images"),
                          cache_dir=str(ram / "cache"), num_classes=2)
    config.eval_batch_size = 16
  workdir = ram / "run"
  handed_to_orbax = []

  class LocalCheckpoints(checkpoints.Manager):
    def __init__(self, directory, config, **options):
      handed_to_orbax.append(str(directory))
      super().__init__(epath.Path(tmp_path / "orbax"), config, **options)

  monkeypatch.setattr(checkpoints, "Manager", LocalCheckpoints)
  loop.train_and_evaluate(config, str(workdir))

  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["kind"]) for r in records] == [(2, "train"), (2, "eval"), (4, "train"),
                                                        (4, "eval"), (4, "run")]
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["steps"] == 4 and summary["top1_error"] == records[-2]["top1_error"]
  assert json.loads((workdir / "config.json").read_text())["model"] == "cifar_resnet8"
  events = list(workdir.glob("events.out.tfevents.*"))
  assert len(events) == 1 and len(events[0].read_bytes()) > 100
  if dataset == "image_folder":
    assert summary["dataset"] == f"image_folder({ram}/images)"
    assert records[1]["examples"] == 16
    assert [p.name.startswith("mean_image_folder") for p in (ram / "cache").iterdir()] == [True]
  assert handed_to_orbax == [str(workdir)]
  assert sorted(p.name for p in (tmp_path / "orbax" / "checkpoints").iterdir()) == ["2", "4"]
  assert os.listdir(cwd) == []  # Nothing fell through to the local disk as ./ram:/...


def test_orbax_writes_arrays_only_to_local_paths_and_gs(ram, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # Orbax writes part of the failed save to ./ram:/... here.
  manager = checkpoints.Manager(ram / "run", smoke_config(), keep=1)
  manager.save(1, {"w": jnp.ones(8)}, None, None)  # Asynchronous: the failure comes at wait().
  with pytest.raises(checkpoints.CheckpointError,
                     match="Checkpoint path should be absolute. Got ram:/"):
    manager.wait()
