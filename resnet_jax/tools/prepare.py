"""Prepares a TFDS dataset for training, online or offline, through TFDS's own builders.

  python -m resnet_jax.tools.prepare cifar10 --data_dir=DIR                 # downloads, as TFDS does
  python -m resnet_jax.tools.prepare cifar10 --data_dir=DIR --manual_dir=M  # offline
  python -m resnet_jax.tools.prepare imagenet2012 --data_dir=DIR --manual_dir=M

This is `tfds build` without apache_beam. Offline, `--manual_dir` holds what TFDS would download:
for cifar10 and cifar100 the original cifar-10-binary.tar.gz / cifar-100-binary.tar.gz (checked
against TFDS's registered checksum) or the folder it extracts to (cifar-10-batches-bin/,
cifar-100-binary/); for imagenet2012, which TFDS never downloads, ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar (by default from DIR/downloads/manual, TFDS's own manual dir).
`--file_format` defaults to what the trainer reads: array_record for imagenet2012 (the streaming
pipeline reads examples by index), tfrecord for CIFAR (read whole onto the devices).
A mistake is one `error:` line naming the fix, exit status 2.
"""
import hashlib
import os
import re
import tarfile
from typing import Any

import requests
from absl import flags
from etils import epath

from resnet_jax.data import sources
from resnet_jax.tools import source_files
from resnet_jax.training import cli

DATASETS = ("cifar10", "cifar100", "imagenet2012")
IMAGENET_TARS = {"ILSVRC2012_img_train.tar": (r"n\d{8}\.tar", "one <synset>.tar per class"),
                 "ILSVRC2012_img_val.tar": (r"ILSVRC2012_val_\d{8}\.JPEG", "the validation JPEGs")}
FILE_FORMATS = {"cifar10": "tfrecord", "cifar100": "tfrecord", "imagenet2012": "array_record"}


class UserError(Exception):
  """A mistake the user can fix; the message says how."""


def prepare(name: str, data_dir: str | None = None, manual_dir: str | None = None,
            file_format: str | None = None) -> Any:
  """Prepares TFDS dataset `name` in `data_dir` (downloading it when `manual_dir` is None, for
  CIFAR) in `file_format` (default `FILE_FORMATS[name]`); returns its builder. `UserError` for a
  missing or wrong file, or a failed download."""
  if name not in DATASETS:
    raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
  tfds = sources.tensorflow_datasets()
  file_format = file_format or FILE_FORMATS[name]
  builder = tfds.builder(name, data_dir=data_dir)
  if builder.is_prepared():
    stored = builder.info.file_format.value
    if stored != file_format:
      raise UserError(f"{name} is already prepared in {builder.data_dir} as {stored}, not "
                      f"{file_format}; delete that folder, or pass another --data_dir")
    return builder
  _check_writable(epath.Path(builder.data_dir))
  kwargs = dict(data_dir=data_dir, file_format=file_format)
  builder = tfds.builder(name, **kwargs)
  # Never the prepared copies on TFDS's servers: they are tfrecord, and offline a lookup hangs.
  config = dict(try_download_gcs=False)
  explicit = manual_dir is not None
  if explicit:
    manual_dir = sources.absolute(manual_dir)
    if not manual_dir.is_dir():
      raise UserError(f"--manual_dir {manual_dir} is not a folder")
  if name == "imagenet2012":
    manual_dir = manual_dir or epath.Path(builder.data_dir).parents[1] / "downloads" / "manual"
    _check_imagenet(manual_dir, explicit)
    config.update(manual_dir=manual_dir)
  elif explicit:
    url, info = next(iter(tfds.builder_cls(name).url_infos.items()))
    folder_name = source_files.CIFAR_LAYOUTS[name][0]
    if (manual_dir / info.filename).exists():
      _check_archive(manual_dir / info.filename, info, folder_name)
      config.update(manual_dir=manual_dir)  # TFDS takes it instead of downloading.
    elif (manual_dir / folder_name).is_dir():
      _check_cifar_folder(name, manual_dir / folder_name)
      builder = _from_extracted(name, manual_dir)(**kwargs)
    else:
      raise UserError(f"{manual_dir} holds neither {info.filename} nor the folder it extracts to, "
                      f"{folder_name}/; copy the archive there from {url}")
  else:
    url = next(iter(tfds.builder_cls(name).url_infos))
    _check_network(name, url)
  try:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(**config))
  except (requests.RequestException, tfds.download.DownloadError) as error:
    raise UserError(f"downloading {name} failed ({type(error).__name__}); rerun with network, "
                    "or pass --manual_dir with the files (see python -m "
                    "resnet_jax.tools.prepare --help)") from None
  return tfds.builder(name, data_dir=data_dir)


def _check_writable(folder: epath.Path) -> None:
  """`UserError` unless `folder` can be made and written, judged by its nearest existing folder
  (so that nothing is made before the other checks pass)."""
  existing = next(path for path in [folder, *folder.parents] if path.exists())
  if not existing.is_dir():
    raise UserError(f"cannot prepare into {folder}: {existing} is a file, not a folder; pass a "
                    "--data_dir that is a folder, or one that does not exist yet")
  if "://" not in str(existing) and not os.access(existing, os.W_OK | os.X_OK):
    raise UserError(f"cannot prepare into {folder}: {existing} is not writable by this user; pass "
                    "a --data_dir you can write to")


def _check_network(name: str, url: str) -> None:
  """A quick look at `url` (through any proxy the environment sets), so that a machine without
  network hears so at once rather than after TFDS's minutes of retries."""
  try:
    requests.head(url, timeout=20, allow_redirects=True).raise_for_status()
  except requests.RequestException as error:
    filename = url.rsplit("/", 1)[1]
    raise UserError(f"preparing {name} needs network, and {url} is unreachable "
                    f"({type(error).__name__}); offline, copy {filename} from a machine with "
                    "network into a folder and pass --manual_dir=<folder>") from None


def _check_archive(path: epath.Path, info: Any, folder_name: str) -> None:
  digest = hashlib.sha256()
  with path.open("rb") as file:
    while chunk := file.read(1 << 22):
      digest.update(chunk)
  if digest.hexdigest() != info.checksum:
    raise UserError(f"{path} is not the original {info.filename} (its sha256 differs from the "
                    f"one TFDS registered, {info.checksum}); copy the original, or put the "
                    f"extracted folder {folder_name}/ in its place")


def _check_cifar_folder(name: str, folder: epath.Path) -> None:
  """The files TFDS's CIFAR builder reads, each a whole number of records."""
  _, _, train_files, test_files = source_files.CIFAR_LAYOUTS[name]
  label_files = (("batches.meta.txt",) if name == "cifar10"
                 else ("coarse_label_names.txt", "fine_label_names.txt"))
  missing = [f for f in train_files + test_files + label_files if not (folder / f).is_file()]
  if missing:
    raise UserError(f"{folder} is not the extracted {name} binary version: it lacks "
                    f"{', '.join(missing)}")
  record = source_files.cifar_record_size(name)
  for file in train_files + test_files:
    size = (folder / file).stat().length
    if size == 0 or size % record:
      raise UserError(f"{folder / file} holds {size} bytes, not a whole number of {record}-byte "
                      f"{name} records (label byte(s) and 3072 pixel bytes); copy it again")


def _from_extracted(name: str, manual_dir: epath.Path) -> type:
  """TFDS's own builder of `name`, reading the extracted archive in `manual_dir` instead of
  downloading and extracting it; it prepares TFDS's `name` dataset, not a new one."""
  base = sources.tensorflow_datasets().builder_cls(name)

  class ExtractedArchive:
    """The one download-manager call TFDS's CIFAR builders make, answered by a local folder."""

    def download_and_extract(self, url: str) -> epath.Path:
      del url
      return manual_dir

  class FromExtracted(base, skip_registration=True):
    name = base.name

    def _split_generators(self, dl_manager):
      del dl_manager
      return super()._split_generators(ExtractedArchive())

  return FromExtracted


def _check_imagenet(manual_dir: epath.Path, explicit: bool) -> None:
  missing = [f for f in IMAGENET_TARS if not (manual_dir / f).is_file()]
  if missing:
    where = "" if explicit else " (or pass --manual_dir=<folder of them>)"
    raise UserError(f"imagenet2012 is prepared from ILSVRC2012_img_train.tar and "
                    f"ILSVRC2012_img_val.tar (https://image-net.org/download-images; TFDS cannot "
                    f"download them), and {manual_dir} lacks {' and '.join(missing)}: put them "
                    f"there{where}")
  for file, (pattern, what) in IMAGENET_TARS.items():
    path = manual_dir / file
    try:
      with path.open("rb") as stream, tarfile.open(fileobj=stream, mode="r:") as archive:
        first = archive.next()
    except tarfile.TarError:
      raise UserError(f"{path} is not a tar file; copy the original again") from None
    if first is None or not re.fullmatch(pattern, first.name):
      found = "nothing" if first is None else repr(first.name)
      raise UserError(f"{path} should hold {what} ({pattern}), but begins with {found}; it is not "
                      "the original ILSVRC2012 file")


def _define_flags() -> None:
  flags.DEFINE_string("data_dir", None, "TFDS data_dir to prepare into (default: TFDS's own).")
  flags.DEFINE_string("manual_dir", None, "Folder of the source files, for preparing without "
                      "network (see above).")
  flags.DEFINE_enum("file_format", None, ["array_record", "tfrecord"],
                    "File format of the prepared dataset (default: the trainer's).")


def main(argv: list[str]) -> None:
  if len(argv) != 2:
    cli.fail(f"name one dataset ({', '.join(DATASETS)}), e.g. "
             "`python -m resnet_jax.tools.prepare cifar10 --data_dir=DIR`")
  try:
    builder = prepare(argv[1], flags.FLAGS.data_dir, flags.FLAGS.manual_dir,
                      flags.FLAGS.file_format)
  except UserError as error:
    cli.fail(str(error))
  splits = ", ".join(f"{split} {info.num_examples}" for split, info in builder.info.splits.items())
  print(f"{builder.name} {builder.version} is prepared in {builder.data_dir} "
        f"({builder.info.file_format.value}): {splits} examples")


if __name__ == "__main__":
  cli.run(main, _define_flags, arguments=True)
