"""TFDS datasets prepared by `python -m resnet_jax.tools.prepare` with TFDS's own builders, offline,
and read by the trainer: CIFAR-10 from the shared JPEGs, CIFAR-100 and a small ImageNet from
generated images (resnet_jax/tools/source_files.py writes the files the builders read).

Each dataset is prepared once per session; all but CIFAR-10 are tiny.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile

import jax
import numpy as np
import pytest
from PIL import Image

import processes
from resnet_jax import data
from resnet_jax.tools import source_files
from resnet_jax.data import sources

REPO = processes.REPO
CIFAR100_TRAIN_PER_CLASS, CIFAR100_TEST_PER_CLASS = 2, 1
IMAGENET_CLASSES, IMAGENET_TRAIN_PER_CLASS, IMAGENET_VAL = 10, 4, 10


def prepare(*args: str, **env: str) -> subprocess.CompletedProcess:
  """The README's preparation command."""
  return subprocess.run([sys.executable, "-m", "resnet_jax.tools.prepare", *args], cwd=REPO,
                        env=dict(os.environ, PYTHONPATH=REPO, **env), capture_output=True,
                        text=True, timeout=600)


def error_lines(completed: subprocess.CompletedProcess) -> list[str]:
  return [line for line in completed.stderr.splitlines() if line.startswith("error: ")]


def tfds_builder(name, data_dir):
  return sources.tensorflow_datasets().builder(name, data_dir=str(data_dir))


def read_all(name, data_dir, split):
  """{TFDS id or file name: (label, encoded image)} of every example."""
  tfds = sources.tensorflow_datasets()
  builder = tfds_builder(name, data_dir)
  decoders = {"image": tfds.decode.SkipDecoding()}
  if builder.info.file_format.value == "array_record":
    examples = builder.as_data_source(split=split, decoders=decoders)
  else:
    examples = tfds.as_numpy(builder.as_dataset(split=split, decoders=decoders))
  key = "file_name" if name == "imagenet2012" else "id"
  return {example[key].decode(): (int(example["label"]), example["image"]) for example in examples}


def decode(contents) -> np.ndarray:
  return sources.tensorflow().io.decode_image(contents, channels=3).numpy()


@pytest.fixture(scope="session")
def cifar10_tfds(cifar10_dir, tmp_path_factory):
  """TFDS's cifar10 prepared from the shared JPEGs: the README's command on the extracted
  binary version, with no network."""
  root = tmp_path_factory.mktemp("cifar10_tfds")
  source_files.write_cifar_binaries(cifar10_dir, root / "manual")
  completed = prepare("cifar10", f"--data_dir={root / 'data'}", f"--manual_dir={root / 'manual'}")
  assert completed.returncode == 0, completed.stderr[-3000:]
  assert "cifar10 3.0.2 is prepared in" in completed.stdout
  assert "(tfrecord): train 50000, test 10000 examples" in completed.stdout
  shutil.rmtree(root / "manual")
  return root / "data"


def test_cifar10_prepared_from_the_shared_jpegs_holds_them_exactly(cifar10_tfds, cifar10_dir):
  for split, per_class in (("train", 5000), ("test", 1000)):
    folder = sources.folder_records(cifar10_dir, split)
    examples = read_all("cifar10", cifar10_tfds, split)
    assert len(examples) == len(folder) == 10 * per_class
    labels = np.asarray([examples[f"{split}_{i:05d}"][0] for i in range(len(folder))])
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), [per_class] * 10)
    # The builder numbers examples in file order, which is the folder's (class, file) order.
    np.testing.assert_array_equal(labels, folder.labels)
    for index in np.random.default_rng(0).choice(len(folder), 5, replace=False):
      stored = decode(examples[f"{split}_{index:05d}"][1])  # PNG: lossless
      with Image.open(folder.paths[index]) as image:  # PIL's pixels, as torchvision reads them.
        source = np.asarray(image.convert("RGB"))
      np.testing.assert_array_equal(stored, source)
  names = tfds_builder("cifar10", cifar10_tfds).info.features["label"].names
  assert names == list(source_files.CIFAR10_CLASSES)


@pytest.mark.slow
def test_the_papers_command_trains_and_evaluates_on_tfds_cifar10(cifar10_tfds, tmp_path,
                                                                  compilation_cache):
  args = ["--config=configs/cifar_resnet110.py", f"--config.dataset.data_dir={cifar10_tfds}",
          "--config.model=cifar_resnet8", "--config.num_train_steps=4", "--config.batch_size=16",
          "--config.batch_norm_group=8",  # Two groups, as the paper's two GPUs.
          "--config.lr_boundaries=(2,3)", "--config.log_every_steps=2",
          "--config.eval_every_steps=4", "--config.checkpoint_every_steps=4"]
  (run,) = processes.train(tmp_path, args, RESNET_JAX_CACHE_DIR=str(tmp_path / "cache"),
                           **compilation_cache)
  assert run.returncode == 0, run.stderr[-3000:]
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  training = [r for r in records if r["kind"] == "train"]
  assert [r["step"] for r in training] == [2, 4]
  # Sec. 4.2's warm-up: 0.01 while the training error is above 80%, as it is after 4 steps.
  assert all(r["learning_rate"] == pytest.approx(0.01) and r["top1_error"] > 80
             for r in training)
  (evaluation,) = [r for r in records if r["kind"] == "eval"]
  assert evaluation["step"] == 4 and evaluation["examples"] == 10_000  # the whole test set
  assert 80 <= evaluation["top1_error"] <= 100 and 30 <= evaluation["top5_error"] <= 70  # chance
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["dataset"] == "cifar10" and summary["best_checkpoint_step"] == 4


def _cifar100_images(root, seed=0):
  """root/{train,test}/<class>/<k>.png of random pixels; returns {split: (images, labels)}."""
  tf = sources.tensorflow()
  rng = np.random.default_rng(seed)
  arrays = {}
  for split, per_class in (("train", CIFAR100_TRAIN_PER_CLASS), ("test", CIFAR100_TEST_PER_CLASS)):
    labels = np.repeat(np.arange(100), per_class)
    images = rng.integers(0, 256, (len(labels), 32, 32, 3), np.uint8)
    for k, (image, label) in enumerate(zip(images, labels)):
      path = root / split / source_files.CIFAR100_CLASSES[label] / f"{k:04d}.png"
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_bytes(tf.io.encode_png(image).numpy())
    arrays[split] = images, labels
  return arrays


@pytest.fixture(scope="session")
def cifar100_tfds(tmp_path_factory):
  """(data_dir, source arrays) of TFDS's cifar100, prepared from 3 generated images a class."""
  root = tmp_path_factory.mktemp("cifar100_tfds")
  arrays = _cifar100_images(root / "images")
  source_files.write_cifar_binaries(root / "images", root / "manual", dataset="cifar100")
  completed = prepare("cifar100", f"--data_dir={root / 'data'}", f"--manual_dir={root / 'manual'}")
  assert completed.returncode == 0, completed.stderr[-3000:]
  assert "(tfrecord): train 200, test 100 examples" in completed.stdout
  return root / "data", arrays


def test_cifar100_prepared_from_generated_images_holds_them_exactly(cifar100_tfds):
  data_dir, arrays = cifar100_tfds
  builder = tfds_builder("cifar100", data_dir)
  assert builder.info.features["label"].names == list(source_files.CIFAR100_CLASSES)
  assert builder.info.features["coarse_label"].names == list(source_files.CIFAR100_SUPERCLASSES)
  tfds = sources.tensorflow_datasets()
  for split, (images, labels) in arrays.items():
    stored = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    order = np.argsort(stored["id"])  # "train_00000", ...: the order of the binary file
    np.testing.assert_array_equal(stored["image"][order], images)
    np.testing.assert_array_equal(stored["label"][order], labels)
    coarse = np.asarray(source_files.CIFAR100_SUPERCLASS_OF)[labels]
    np.testing.assert_array_equal(stored["coarse_label"][order], coarse)
    per_class = len(labels) // 100
    np.testing.assert_array_equal(np.bincount(coarse, minlength=20), [5 * per_class] * 20)
  # TFDS's label of "beaver" is 4 and its superclass "aquatic_mammals" is 0.
  beaver = stored["label"] == 4
  assert beaver.sum() == CIFAR100_TEST_PER_CLASS and (stored["coarse_label"][beaver] == 0).all()


def test_tfds_cifar100_through_data_create(cifar100_tfds, tmp_path, monkeypatch):
  data_dir, arrays = cifar100_tfds
  config = data.default_config("cifar100")
  config.data_dir, config.cache_dir = str(data_dir), str(tmp_path)
  ds = data.create(config, data.core.make_mesh())
  assert ds.info.name == "cifar100" and ds.info.num_classes == 100
  assert (ds.info.train_size, ds.info.eval_size) == (200, 100)
  train_images, _ = arrays["train"]
  np.testing.assert_allclose(np.asarray(ds.mean), train_images.mean(axis=0), atol=1e-4)
  test_images, test_labels = arrays["test"]
  seen = []
  for batch in ds.eval_batches(16):
    mask = np.asarray(batch.mask)
    images = np.asarray(batch.images)[mask] + np.asarray(ds.mean)
    for image, label in zip(images, np.asarray(batch.labels)[mask]):
      np.testing.assert_allclose(image, test_images[test_labels == label][0], atol=1e-4)
      seen.append(int(label))
  assert sorted(seen) == list(range(100))  # every test image once
  # An evaluator's dataset reads the test split alone; the mean is the one cached above.
  read, tfds_records = [], sources.tfds_records
  monkeypatch.setattr(sources, "tfds_records", lambda name, data_dir, split: (
      read.append(split), tfds_records(name, data_dir, split))[1])
  evaluation_only = data.create(config, data.core.make_mesh(), train=False)
  assert read == ["test"] and evaluation_only.info.eval_size == 100
  for name in ("eval_images", "eval_labels", "eval_mask", "mean"):
    np.testing.assert_array_equal(*(np.asarray(getattr(d, name)) for d in (ds, evaluation_only)))


def test_cifar100_prepared_as_array_record_reads_as_the_tfrecord_one(cifar100_tfds, tmp_path):
  tfrecord_dir, _ = cifar100_tfds
  array_record_dir = tmp_path / "array_record"
  completed = prepare("cifar100", f"--data_dir={array_record_dir}",
                      f"--manual_dir={tfrecord_dir.parent / 'manual'}", "--file_format=array_record")
  assert completed.returncode == 0, completed.stderr[-3000:]
  assert "(array_record): train 200, test 100 examples" in completed.stdout
  datasets = []
  for data_dir in (tfrecord_dir, array_record_dir):
    config = data.default_config("cifar100")
    config.data_dir, config.cache_dir = str(data_dir), str(tmp_path / data_dir.name)
    datasets.append(data.create(config, data.core.make_mesh()))
  for name in ("train_images", "train_labels", "eval_images", "eval_labels", "eval_mask", "mean"):
    np.testing.assert_array_equal(*(np.asarray(getattr(ds, name)) for ds in datasets), err_msg=name)


@pytest.fixture(scope="session")
def imagenet_tfds(tmp_path_factory):
  """(data_dir, manual dir, IlsvrcFiles) of TFDS's imagenet2012 in array_record, prepared by
  TFDS's own builder from 40 generated training and 10 validation images."""
  root = tmp_path_factory.mktemp("imagenet_tfds")
  files = source_files.write_ilsvrc2012_tars(root / "manual", IMAGENET_CLASSES,
                                             IMAGENET_TRAIN_PER_CLASS, IMAGENET_VAL, image_size=64)
  completed = prepare("imagenet2012", f"--data_dir={root / 'data'}",
                      f"--manual_dir={root / 'manual'}", "--file_format=array_record")
  assert completed.returncode == 0, completed.stderr[-3000:]
  assert "(array_record): train 40, validation 10 examples" in completed.stdout
  return root / "data", root / "manual", files


def test_imagenet_prepared_from_generated_tars_holds_their_jpegs_and_labels(imagenet_tfds):
  data_dir, _, files = imagenet_tfds
  label = tfds_builder("imagenet2012", data_dir).info.features["label"]
  assert label.num_classes == 1000
  train = read_all("imagenet2012", data_dir, "train")
  assert sorted(train) == sorted(f"{s}_{k}.JPEG" for s in files.synsets
                                 for k in range(IMAGENET_TRAIN_PER_CLASS))
  for name, (index, _) in train.items():
    assert label.int2str(index) == name.split("_")[0]
  validation = read_all("imagenet2012", data_dir, "validation")
  with tarfile.open(files.val_tar) as archive:
    jpegs = {member.name: archive.extractfile(member).read() for member in archive}
  assert sorted(validation) == sorted(jpegs) and len(jpegs) == IMAGENET_VAL
  for i, name in enumerate(sorted(jpegs)):
    index, contents = validation[name]
    assert label.int2str(index) == files.val_synsets[i]
    assert contents == jpegs[name]  # TFDS keeps the JPEG's bytes
    assert decode(contents).shape[0] == 64
  # The validation images are those of TFDS's own label file: its first ten synsets.
  assert set(files.val_synsets) == set(files.synsets)
  assert list(files.val_synsets) == source_files.imagenet_validation_synsets()[:IMAGENET_VAL]


def imagenet_args(data_dir, steps=8):
  """The paper's ImageNet config on the tiny dataset: ResNet-8, batch 8 in batch norm groups of
  4, the plateau schedule deciding every 2 steps, checkpoints every 2 steps and an evaluation
  at 4 and 8."""
  return ["--config=configs/imagenet_resnet18.py", f"--config.dataset.data_dir={data_dir}",
          "--config.model=cifar_resnet8", f"--config.num_train_steps={steps}",
          "--config.batch_size=8", "--config.batch_norm_group=4", "--config.eval_batch_size=8",
          "--config.plateau_accumulation_steps=2", "--config.plateau_patience=1",
          "--config.log_every_steps=2", "--config.eval_every_steps=4",
          "--config.checkpoint_every_steps=2"]


@pytest.mark.slow
def test_streaming_imagenet_killed_mid_run_resumes_bitwise(imagenet_tfds, tmp_path,
                                                          compilation_cache):
  data_dir, _, _ = imagenet_tfds
  args = imagenet_args(data_dir)
  (reference,) = processes.train(tmp_path / "reference", args, **compilation_cache)
  assert reference.returncode == 0, reference.stderr[-3000:]
  assert "restore: no checkpoint in" in reference.stderr
  workdir = tmp_path / "killed"
  (killed,) = processes.train(workdir, args, faults={0: "step:7"}, **compilation_cache)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  # Checkpoint 4 is complete, as the save of step 6 waited for it; 6 may be.
  newest = processes.newest_checkpoint(workdir)
  assert newest in (4, 6)
  (resumed,) = processes.train(workdir, args, **compilation_cache)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"restore: resumed at step {newest} of" in resumed.stderr
  leaves = jax.tree.leaves(processes.checkpointed_state(workdir, 8))
  reference_leaves = jax.tree.leaves(processes.checkpointed_state(tmp_path / "reference", 8))
  assert len(leaves) == len(reference_leaves) > 50
  for a, b in zip(leaves, reference_leaves):
    np.testing.assert_array_equal(a, b)
  summaries = [(path / "summary.json").read_text() for path in (workdir, tmp_path / "reference")]
  assert summaries[0] == summaries[1]


# Records every read of a TFDS random-access source (TFDS's class, not ours) as [split, index].
READS_WORKER = r"""
import json, sys
import jax
process_id, port, data_dir, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
import tensorflow_datasets as tfds
from configs import imagenet_resnet18
from resnet_jax import data

source_class = type(tfds.builder("imagenet2012", data_dir=data_dir).as_data_source("validation"))
reads, getitem, getitems = [], source_class.__getitem__, source_class.__getitems__
def read_one(self, key):
  reads.append([self.split, int(key)])
  return getitem(self, key)
def read_many(self, keys):
  reads.extend([self.split, int(key)] for key in keys)
  return getitems(self, keys)
source_class.__getitem__, source_class.__getitems__ = read_one, read_many

config = imagenet_resnet18.get_config().dataset
config.data_dir, config.cache_dir = data_dir, out + "-cache"  # Each host its own cache.
ds = data.create(config, data.core.make_mesh())
start_reads = reads[:]  # The per-pixel mean's share.
del reads[:]
batches = ds.train_iterator(8)
for _ in range(ds.steps_per_epoch(8)):
  next(batches)
batches.close()
evaluated = sum(int(jax.numpy.sum(batch.mask)) for batch in ds.eval_batches(8))
with open(out, "w") as f:
  json.dump({"start_reads": start_reads, "reads": reads, "evaluated": evaluated}, f)
"""


def test_two_processes_read_only_their_own_imagenet_records(imagenet_tfds, tmp_path):
  data_dir, _, _ = imagenet_tfds
  port = processes.free_port()
  outputs = [tmp_path / f"{i}.json" for i in range(2)]
  results = processes.run(
      [[sys.executable, "-c", READS_WORKER, str(i), str(port), str(data_dir), str(outputs[i])]
       for i in range(2)], processes.environment(4), timeout=400)
  for result in results:
    assert result.returncode == 0, result.stderr[-3000:]
  reports = [json.loads(path.read_text()) for path in outputs]
  num_train = IMAGENET_CLASSES * IMAGENET_TRAIN_PER_CLASS
  block = num_train // 8
  # The fixed seeded deal of training examples into one block per device (seed 0); process p
  # holds devices 4p..4p+3. Evaluation gives each device a contiguous chunk. The per-pixel mean
  # (of every training image, fewer than imagenet.MEAN_SAMPLE) is read in alternate shares.
  deal = np.random.default_rng([0, 1]).permutation(num_train)
  chunks = np.array_split(np.arange(IMAGENET_VAL), 8)
  read = {}
  for p, report in enumerate(reports):
    assert report["evaluated"] == IMAGENET_VAL
    assert sorted(index for _, index in report["start_reads"]) == list(range(p, num_train, 2))
    assert {name for name, _ in report["start_reads"]} == {"train"}
    for split in ("train", "validation"):
      read[p, split] = {index for name, index in report["reads"] if name == split}
    assert read[p, "train"] == set(deal[4 * p * block:(4 * p + 4) * block].tolist())
    assert read[p, "validation"] == set(np.concatenate(chunks[4 * p:4 * p + 4]).tolist())
  for split in ("train", "validation"):
    assert not read[0, split] & read[1, split]


def test_offline_mistakes_are_one_error_line_and_exit_status_2(tmp_path, imagenet_tfds,
                                                               cifar100_tfds):
  _, manual, _ = imagenet_tfds
  empty, data_dir = tmp_path / "empty", tmp_path / "data"
  empty.mkdir()
  truncated = tmp_path / "truncated" / "cifar-10-batches-bin"
  truncated.mkdir(parents=True)
  for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
    (truncated / name).write_bytes(bytes(3073 * 2))
  (truncated / "test_batch.bin").write_bytes(bytes(3073 + 100))
  (truncated / "batches.meta.txt").write_text("\n".join(source_files.CIFAR10_CLASSES))
  repacked = tmp_path / "repacked"
  repacked.mkdir()
  with tarfile.open(repacked / "cifar-100-binary.tar.gz", "w:gz") as archive:
    archive.add(truncated, arcname="cifar-100-binary")
  swapped = tmp_path / "swapped"
  swapped.mkdir()
  shutil.copy(manual / "ILSVRC2012_img_val.tar", swapped / "ILSVRC2012_img_train.tar")
  shutil.copy(manual / "ILSVRC2012_img_val.tar", swapped / "ILSVRC2012_img_val.tar")
  unreachable = f"http://127.0.0.1:{processes.free_port()}"  # nothing listens there
  cases = [
      (["cifar10", f"--manual_dir={empty}"],
       f"error: {empty} holds neither cifar-10-binary.tar.gz nor the folder it extracts to"),
      (["cifar10", f"--manual_dir={tmp_path}/truncated"],
       f"error: {truncated}/test_batch.bin holds 3173 bytes, not a whole number of 3073-byte"),
      (["cifar100", f"--manual_dir={repacked}"],
       f"error: {repacked}/cifar-100-binary.tar.gz is not the original cifar-100-binary.tar.gz"),
      (["cifar10"], "error: preparing cifar10 needs network, and https://www.cs.toronto.edu/"),
      (["imagenet2012"], "error: imagenet2012 is prepared from ILSVRC2012_img_train.tar and "),
      (["imagenet2012", f"--manual_dir={swapped}"],
       f"error: {swapped}/ILSVRC2012_img_train.tar should hold one <synset>.tar per class"),
      (["cifar100", f"--data_dir={cifar100_tfds[0]}", "--file_format=array_record"],
       f"error: cifar100 is already prepared in {cifar100_tfds[0]}/cifar100/3.0.2 as tfrecord, not"),
      (["mnist"], "error: unknown dataset 'mnist'; choose one of cifar10, cifar100, imagenet2012"),
      (["cifar10", "--file_format=parquet"], "error: flag --file_format=parquet: value should be"),
  ]
  for args, message in cases:
    completed = prepare(f"--data_dir={data_dir}", *args, HTTPS_PROXY=unreachable,
                        HTTP_PROXY=unreachable)
    assert completed.returncode == 2 and len(error_lines(completed)) == 1, (args, completed.stderr)
    assert error_lines(completed)[0].startswith(message), (args, error_lines(completed)[0])
    assert "Traceback" not in completed.stderr
    assert not (data_dir / "cifar10").exists() and not (data_dir / "imagenet2012" / "5.1.0").exists()


@pytest.mark.parametrize("unwritable", ["under_a_file", "read_only"])
def test_an_unwritable_data_dir_is_one_error_line_and_exit_status_2(tmp_path, unwritable):
  # A tiny extracted CIFAR-10 binary version: preparing it gets as far as writing.
  extracted = tmp_path / "manual" / "cifar-10-batches-bin"
  extracted.mkdir(parents=True)
  for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
    (extracted / name).write_bytes(bytes(3073 * 2))
  (extracted / "batches.meta.txt").write_text("\n".join(source_files.CIFAR10_CLASSES))
  if unwritable == "under_a_file":
    (tmp_path / "file").write_text("")
    data_dir, reason = tmp_path / "file" / "data", f"{tmp_path}/file is a file, not a folder"
  else:
    if os.geteuid() == 0:
      pytest.skip("root writes into a read-only folder")
    data_dir, reason = tmp_path / "read_only", f"{tmp_path}/read_only is not writable by this user"
    data_dir.mkdir(mode=0o555)
  completed = prepare("cifar10", f"--data_dir={data_dir}", f"--manual_dir={tmp_path / 'manual'}")
  assert completed.returncode == 2, completed.stderr[-3000:]
  assert error_lines(completed) == [completed.stderr.rstrip().splitlines()[-1]]
  assert error_lines(completed)[0].startswith(
      f"error: cannot prepare into {data_dir}/cifar10/3.0.2: {reason}; pass a --data_dir")
  assert "Traceback" not in completed.stderr
