r"""Evaluates a saved run, or any weights, by any protocol.

  python -m resnet_jax.training.evaluate --workdir=/tmp/resnet110
  python -m resnet_jax.training.evaluate --workdir=/tmp/resnet50 --checkpoint=latest --eval_protocol=10crop
  python -m resnet_jax.training.evaluate --weights=resnet50.pth --weights_format=torchvision \
      --config=imagenet_resnet50 --config.dataset.data_dir=/data/tfds --workdir=/tmp/scores

A run (--workdir alone): its config is the workdir's config.json (written by the trainer as it
starts); the checkpoint is read without changing anything under checkpoints/ and without
claiming the workdir (`runs`), so a run may be evaluated while it is still training. Only the
evaluation split is read (the training images too, once, if their per-pixel mean is not in the
cache), mean-subtracted by the pipeline as in training. The result goes to
WORKDIR/evaluations/<step>-<protocol>.json, and one line sums it up.

  --checkpoint     best (default): the kept checkpoint with the lowest top-1 error in the
                   run's own evaluations; latest; or a step number
  --eval_protocol  center, 10crop (the paper's ImageNet crops) or multiscale (its fully
                   convolutional scales); default the run's own; the multi-view ones need
                   images larger than 64 pixels (ImageNet, image folders)

Weights (--weights): scored on the evaluation split of --config's dataset (with the trainer's
--config.FIELD=VALUE overrides: --config.dataset.data_dir=...), with the preprocessing they
expect: the pipeline gives raw pixels (`dataset.mean` "none": no training image is read) and
the jitted step applies the weights' `pretrained.Preprocessing` to each view. The result goes to
WORKDIR/evaluations/<weights' file name>-<protocol>.json (a run's: <its name>-<step>-<protocol>),
with the weights' path, format and SHA-256, and one line sums it up.

  --weights_format torchvision (a .pth, .pt or .npz state dict: `pretrained.from_torchvision`),
                   keras (a .h5 weights file or a .keras model: `pretrained.from_keras`),
                   akamaster (akamaster/pytorch_resnet_cifar10's CIFAR ResNets:
                   `pretrained.from_akamaster`) or workdir (the workdir of a run of ours, its
                   --checkpoint: `runs.load_model`)
  --model          the network (default: the config's model; a run's own for workdir)
  --eval_protocol, --eval_batch_size  default the config's

Exit status: 0 done; 2 nothing was evaluated (a bad command line, no such workdir, weights,
step or protocol, an unreadable or vanished checkpoint, weights of another class count than the
dataset's, a missing dataset); 1 the evaluation failed once it had begun (a corrupt image, a
failing disk).

On a TPU pod slice or a multi-process GPU job every process runs this same command, as for
the trainer (--coordinator_address, --num_processes, --process_id).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from typing import Any

import jax
import ml_collections
from absl import flags, logging
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from resnet_jax.models import pretrained
from resnet_jax.training import checkpoints, cli, loop, runs
from resnet_jax import data

WEIGHTS_FORMATS = ("torchvision", "keras", "akamaster", "workdir")


def _define_flags() -> None:
  flags.DEFINE_string("checkpoint", "best", "Which checkpoint of a run: best (lowest top-1 error "
                      "in the run's own evaluations), latest, or a step number.")
  flags.DEFINE_string("eval_protocol", None, "center, 10crop or multiscale (default: the run's "
                      "own, or the config's).")
  flags.DEFINE_integer("eval_batch_size", None, "Global evaluation batch size (default: the "
                       "run's own, or the config's); a multiple of the device count.")
  flags.DEFINE_string("data_dir", None, "Where the run's dataset is now, if it moved (default: "
                      "the run's dataset.data_dir); with --weights, --config.dataset.data_dir.")
  flags.DEFINE_string("weights", None, "Weights to score instead of a run: a file, or the "
                      "workdir of a run (--weights_format=workdir); --workdir is then where the "
                      "result is written.")
  flags.DEFINE_string("weights_format", None, f"The layout of --weights: "
                      f"{', '.join(WEIGHTS_FORMATS)}.")
  flags.DEFINE_string("model", None, "The network of --weights (default: the config's model; a "
                      "run's own for --weights_format=workdir).")
  cli.define_config_flag()
  cli.define_run_flags()


class EvaluationError(ValueError):
  """Nothing can be evaluated; the message names the problem and the fix."""


def evaluate_run(workdir: epath.PathLike, checkpoint: str = "best", protocol: str | None = None,
                 batch_size: int | None = None, data_dir: str | None = None
                 ) -> tuple[epath.Path, dict[str, Any]]:
  """Evaluates a checkpoint of the run in `workdir`; returns the result file and its record.

  Raises EvaluationError (or `runs.RunError`, reading the run) for anything that stops the
  evaluation before it begins.
  """
  workdir = epath.Path(workdir)
  config = runs.read_config(workdir)
  protocol = protocol or config.eval_protocol
  _check_protocol_and_batch_size(protocol, batch_size, config, "the run's own")
  if data_dir:
    config.dataset.data_dir = data_dir
  batch_size = batch_size or config.eval_batch_size
  reader = runs.checkpoint_reader(workdir)
  step = runs.pick_step(reader, checkpoint)
  mesh = _mesh(batch_size)
  # The evaluation split alone, the protocol checked before any image is decoded.
  dataset = _eval_dataset(loop.dataset_config(config), mesh, protocol, workdir / "evaluations")
  info = dataset.info
  state = runs.restore(workdir, config, reader, step, info.num_classes, mesh)
  logging.info("Evaluating step %d of %s (%s checkpoint) on %s %s by %s.", step, workdir,
               checkpoint, info.name, config.dataset.eval_split, protocol)

  eval_fn = loop.jit_eval_step(mesh)
  result = loop.evaluate(eval_fn, state, dataset.eval_batches(batch_size, protocol))
  record = {"step": step, "checkpoint": checkpoint, "protocol": protocol, **result,
            "model": config.model, "dataset": info.name, "eval_split": config.dataset.eval_split,
            "eval_batch_size": batch_size, "written": _now()}
  return _write(workdir / "evaluations" / f"{step}-{protocol}.json", record), record


def evaluate_weights(weights: epath.PathLike, weights_format: str,
                     config: ml_collections.ConfigDict, workdir: epath.PathLike,
                     model: str | None = None, checkpoint: str = "best",
                     protocol: str | None = None, batch_size: int | None = None
                     ) -> tuple[epath.Path, dict[str, Any]]:
  """Scores `weights` of `weights_format` (one of WEIGHTS_FORMATS), the network `model` (default:
  `config.model`; a run's own for "workdir", its checkpoint `checkpoint`), on the evaluation
  split of `config.dataset`, by `protocol` at `batch_size` (default: the config's), with the
  preprocessing the weights expect; writes the result under `workdir`/evaluations and returns the
  file and its record.

  Raises EvaluationError (or `runs.RunError`, reading a run) for anything that stops the
  evaluation before it begins, all before anything is compiled: an unknown format, missing
  weights, a model the format has no weights of, unreadable weights, a protocol the dataset
  cannot evaluate, a class count other than the dataset's.
  """
  weights, workdir = epath.Path(weights), epath.Path(workdir)
  if weights_format not in WEIGHTS_FORMATS:
    raise EvaluationError(f"unknown --weights_format {weights_format!r}; choose one of "
                          f"{', '.join(WEIGHTS_FORMATS)}.")
  if not weights.exists():
    raise EvaluationError(f"--weights={weights} does not exist; pass a file of "
                          f"{weights_format} weights" + (", or the workdir of a run."
                                                         if weights_format == "workdir" else "."))
  if weights.is_dir() != (weights_format == "workdir"):
    raise EvaluationError(
        f"--weights={weights} is a {'directory' if weights.is_dir() else 'file'}; "
        "--weights_format=workdir takes the workdir of a run, every other format a file.")
  protocol = protocol or config.eval_protocol
  _check_protocol_and_batch_size(protocol, batch_size, config, "the config's")
  batch_size = batch_size or config.eval_batch_size
  mesh = _mesh(batch_size)
  dtype = loop.dtype_for(config, data.core.platform(mesh))
  sha256 = None if weights_format == "workdir" else _sha256(weights)
  name, step, trained = _load_weights(weights, weights_format, model, config.model, checkpoint,
                                      dtype)
  dataset_config = loop.dataset_config(config)
  dataset_config.mean = "none"  # Raw pixels: the weights' own preprocessing follows.
  dataset = _eval_dataset(dataset_config, mesh, protocol, workdir / "evaluations")
  info = dataset.info
  num_classes = trained.model.head.out_features
  if num_classes != info.num_classes:
    raise EvaluationError(
        f"--weights={weights} classify {num_classes} classes, but {info.name} has "
        f"{info.num_classes}; score them on a dataset of {num_classes} classes, or pass weights "
        f"of a {info.num_classes}-class {name}.")
  logging.info("Evaluating %s (%s weights of %s) on %s %s by %s.", weights, weights_format, name,
               info.name, dataset_config.eval_split, protocol)

  state = jax.device_put(loop.Weights.of(trained.model), NamedSharding(mesh, PartitionSpec()))
  eval_fn = loop.jit_eval_step(mesh, trained.preprocessing)
  result = loop.evaluate(eval_fn, state, dataset.eval_batches(batch_size, protocol))
  record = {"weights": str(weights), "weights_format": weights_format,
            "weights_sha256": sha256,
            "step": step, "checkpoint": None if step is None else checkpoint,
            "protocol": protocol, **result, "model": name, "dataset": info.name,
            "eval_split": dataset_config.eval_split, "eval_batch_size": batch_size,
            "written": _now()}
  stem = weights.name if step is None else f"{weights.name}-{step}"
  return _write(workdir / "evaluations" / f"{stem}-{protocol}.json", record), record


def _load_weights(weights: epath.Path, weights_format: str, model: str | None,
                  config_model: str, checkpoint: str, dtype
                  ) -> tuple[str, int | None, pretrained.Trained]:
  """(the network's name, the run's step or None, the model and its preprocessing) of
  `evaluate_weights`'s arguments."""
  if weights_format == "workdir":
    config = runs.read_config(weights)
    if model not in (None, config.model):
      raise EvaluationError(f"--model={model}: the run in {weights} trained {config.model}; "
                            "leave --model out for a run's weights.")
    step = runs.pick_step(runs.checkpoint_reader(weights), checkpoint)
    return config.model, step, runs.load_model(weights, step)
  model = model or config_model
  names = {"torchvision": pretrained.TORCHVISION_NAMES, "keras": pretrained.KERAS_NAMES}
  if weights_format in names and model not in names[weights_format]:
    raise EvaluationError(f"--model={model}: {weights_format} has no weights of it; pass "
                          f"--model= one of {', '.join(names[weights_format])}.")
  try:
    if weights_format == "torchvision":
      trained = pretrained.Trained(pretrained.from_torchvision(weights, model, dtype=dtype),
                                   pretrained.TORCHVISION_PREPROCESSING)
    elif weights_format == "keras":
      trained = pretrained.Trained(pretrained.from_keras(weights, model, dtype=dtype),
                                   pretrained.KERAS_PREPROCESSING)
    else:
      trained = pretrained.Trained(pretrained.from_akamaster(weights, model, dtype=dtype),
                                   pretrained.AKAMASTER_PREPROCESSING)
  except ValueError as error:
    raise EvaluationError(cli.first_line(error)) from None
  return model, None, trained


def _check_protocol_and_batch_size(protocol: str, batch_size: int | None,
                                   config: ml_collections.ConfigDict, whose: str) -> None:
  if protocol not in data.core.EVAL_PROTOCOLS:
    raise EvaluationError(f"unknown --eval_protocol {protocol!r}; choose one of "
                          f"{', '.join(data.core.EVAL_PROTOCOLS)}.")
  if batch_size is not None and batch_size <= 0:
    raise EvaluationError(f"--eval_batch_size must be positive, got {batch_size}; leave it out "
                          f"for {whose} ({config.eval_batch_size}).")


def _mesh(batch_size: int) -> jax.sharding.Mesh:
  mesh = data.core.make_mesh()
  try:
    data.core.check_batch_size(batch_size, mesh)
  except ValueError as error:
    raise EvaluationError(f"--eval_batch_size: {error}") from None
  return mesh


def _eval_dataset(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, protocol: str,
                  output: epath.Path) -> data.Dataset:
  """The evaluation side of the dataset of `config`, once `output` is found writable."""
  try:
    checkpoints.check_writable(output)
    return data.create(config, mesh, train=False, eval_protocol=protocol)
  except ValueError as error:
    raise EvaluationError(str(error)) from None


def _sha256(path: epath.Path) -> str:
  digest = hashlib.sha256()
  with path.open("rb") as stream:
    for chunk in iter(lambda: stream.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _now() -> str:
  return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())


def _write(path: epath.Path, record: dict[str, Any]) -> epath.Path:
  if jax.process_index() == 0:
    path.write_text(json.dumps(record, indent=2) + "\n")
  return path


def _unless_orbax_loop_closed(unraisable) -> None:
  """A sys.unraisablehook: Python's own, but silent on the "Event loop is closed" of the reads
  of a checkpoint removed while it was read.

  Orbax reads a checkpoint's arrays together, in an event loop of its own that it closes as soon
  as one read fails (the trainer removed the step): each read still in flight then completes in
  a tensorstore thread, whose call into the closed loop raises there, and Python prints each as
  a traceback, dozens of them, around the one error line that says what happened. Orbax offers
  no way to wait for those reads, and no other error is silenced.
  """
  error = unraisable.exc_value
  if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
    sys.__unraisablehook__(unraisable)


def main(argv: list[str]) -> None:
  del argv  # No positional arguments (cli.run).
  options = flags.FLAGS
  if options.weights is None:
    if options.config is not None:
      cli.fail("--config is not taken: the run's own config is read from WORKDIR/config.json. "
               "It goes with --weights, whose dataset it names.")
    if options.weights_format or options.model:
      cli.fail("--weights_format and --model go with --weights, the weights they describe; a "
               "run's are its --workdir's.")
    if not options.workdir:
      cli.fail("--workdir is missing or empty; pass the workdir of the run to evaluate.")
  else:
    if options.config is None:
      cli.fail("--weights needs --config, whose dataset they are scored on (e.g. "
               "--config=imagenet_resnet50 --config.dataset.data_dir=...).")
    if options.data_dir:
      cli.fail("--data_dir is for a run's dataset (--workdir alone); with --weights, pass "
               "--config.dataset.data_dir.")
    if not options.workdir:
      cli.fail("--workdir is missing or empty; with --weights, pass the directory to write the "
               "result to (WORKDIR/evaluations/).")
  cli.start_run()  # The run's own compilation cache may hold the evaluation step.
  logging.get_absl_handler().addFilter(checkpoints.quiet_orbax_info)
  sys.unraisablehook = _unless_orbax_loop_closed
  try:
    if options.weights is None:
      path, record = evaluate_run(options.workdir, options.checkpoint, options.eval_protocol,
                                  options.eval_batch_size, options.data_dir)
    else:
      path, record = evaluate_weights(options.weights, options.weights_format, options.config,
                                      options.workdir, options.model, options.checkpoint,
                                      options.eval_protocol, options.eval_batch_size)
  except (EvaluationError, runs.RunError) as error:
    cli.fail(str(error))
  # OSError: a disk failing; CorruptImageError: an image that does not decode; NonFiniteError:
  # finite weights whose scores overflow (no result is written).
  except (OSError, data.CorruptImageError, loop.NonFiniteError) as error:
    cli.fail(str(error), cli.RUN_FAILED)
  if jax.process_index() == 0:
    print(f"{_summary(record)}; written to {path}")


def _summary(record: dict[str, Any]) -> str:
  """The line that sums up an evaluation's `record`."""
  if "weights" not in record:
    what = f"step {record['step']} ({record['checkpoint']})"
  elif record["step"] is None:
    what = f"{record['weights_format']} weights {record['weights']}"
  else:
    what = f"step {record['step']} ({record['checkpoint']}) of {record['weights']}"
  return (f"{record['model']} {what} on {record['dataset']} {record['eval_split']}, "
          f"{record['protocol']}: top-1 error {record['top1_error']:.2f}%  top-5 error "
          f"{record['top5_error']:.2f}%  loss {record['loss']:.4f}  ({record['examples']} "
          "examples)")


if __name__ == "__main__":
  cli.run(main, _define_flags, optional_config=True)
