"""Evaluates a saved run: its best or latest checkpoint, or a given step, by any protocol.

  python -m resnet_jax.training.evaluate --workdir=/tmp/resnet110
  python -m resnet_jax.training.evaluate --workdir=/tmp/resnet50 --checkpoint=latest --eval_protocol=10crop

The run's config is the workdir's config.json (written by the trainer as it starts); the
checkpoint is read without changing anything under checkpoints/ and without claiming the
workdir, so a run may be evaluated while it is still training. Only the evaluation split is
read (the training images too, once, if their per-pixel mean is not in the cache). The result
goes to WORKDIR/evaluations/<step>-<protocol>.json, and one line sums it up.

  --checkpoint     best (default): the kept checkpoint with the lowest top-1 error in the
                   run's own evaluations; latest; or a step number
  --eval_protocol  center, 10crop (the paper's ImageNet crops) or multiscale (its fully
                   convolutional scales); default the run's own; the multi-view ones need
                   images larger than 64 pixels (ImageNet, image folders)

Exit status: 0 done; 2 nothing was evaluated (a bad command line, no such workdir, step or
protocol, an unreadable or vanished checkpoint, a missing dataset); 1 the evaluation failed
once it had begun (a corrupt image, a failing disk).

On a TPU pod slice or a multi-process GPU job every process runs this same command, as for
the trainer (--coordinator_address, --num_processes, --process_id).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import jax
import ml_collections
from absl import app, flags, logging
from etils import epath

from resnet_jax.training import checkpoints, cli, optim, loop
from resnet_jax import data

def _define_flags() -> None:
  """The command's flags, defined only when it runs (see `cli`)."""
  flags.DEFINE_string("checkpoint", "best", "Which checkpoint: best (lowest top-1 error in the "
                      "run's own evaluations), latest, or a step number.")
  flags.DEFINE_string("eval_protocol", None, "center, 10crop or multiscale (default: the run's "
                      "own).")
  flags.DEFINE_integer("eval_batch_size", None, "Global evaluation batch size (default: the "
                       "run's own); a multiple of the device count.")
  flags.DEFINE_string("data_dir", None, "Where the run's dataset is now, if it moved (default: "
                      "the run's dataset.data_dir).")
  cli.define_flags()


class EvaluationError(ValueError):
  """Nothing can be evaluated; the message names the problem and the fix."""


def evaluate_run(workdir: epath.PathLike, checkpoint: str = "best", protocol: str | None = None,
                 batch_size: int | None = None, data_dir: str | None = None
                 ) -> tuple[epath.Path, dict[str, Any]]:
  """Evaluates a checkpoint of the run in `workdir`; returns the result file and its record.

  Raises EvaluationError for anything that stops the evaluation before it begins.
  """
  workdir = epath.Path(workdir)
  config = _run_config(workdir)
  protocol = protocol or config.eval_protocol
  if protocol not in data.core.EVAL_PROTOCOLS:
    raise EvaluationError(f"unknown --eval_protocol {protocol!r}; choose one of "
                          f"{', '.join(data.core.EVAL_PROTOCOLS)}.")
  if batch_size is not None and batch_size <= 0:
    raise EvaluationError(f"--eval_batch_size must be positive, got {batch_size}; leave it out "
                          f"for the run's own ({config.eval_batch_size}).")
  if data_dir:
    config.dataset.data_dir = data_dir
  batch_size = batch_size or config.eval_batch_size
  reader = _reader(workdir)
  step = _pick_step(reader, checkpoint)
  mesh = data.core.make_mesh()
  try:
    data.core.check_batch_size(batch_size, mesh)
  except ValueError as error:
    raise EvaluationError(f"--eval_batch_size: {error}") from None
  try:
    checkpoints.check_writable(workdir / "evaluations")
    # The evaluation split alone, the protocol checked before any image is decoded.
    dataset = data.create(loop.dataset_config(config), mesh, train=False, eval_protocol=protocol)
  except ValueError as error:
    raise EvaluationError(str(error)) from None
  info = dataset.info

  saved = _read_checkpoint(workdir, step, lambda: reader.saved_identity(step))
  try:
    checkpoints.check_identity(saved, checkpoints.run_identity(config, info.num_classes))
  except ValueError as error:
    raise EvaluationError(f"{workdir / 'config.json'} is not the config of checkpoint {step}: "
                          f"{error}") from None
  abstract_state = loop.abstract_train_state(config, info.num_classes, mesh,
                                              optim.create(config))
  state, _ = _read_checkpoint(workdir, step, lambda: reader.restore(step, abstract_state))
  logging.info("Evaluating step %d of %s (%s checkpoint) on %s %s by %s.", step, workdir,
               checkpoint, info.name, config.dataset.eval_split, protocol)

  eval_fn = loop.jit_eval_step(mesh)
  result = loop.evaluate(eval_fn, state, dataset.eval_batches(batch_size, protocol))
  record = {"step": step, "checkpoint": checkpoint, "protocol": protocol, **result,
            "model": config.model, "dataset": info.name, "eval_split": config.dataset.eval_split,
            "eval_batch_size": batch_size,
            "written": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
  path = workdir / "evaluations" / f"{step}-{protocol}.json"
  if jax.process_index() == 0:
    path.write_text(json.dumps(record, indent=2) + "\n")
  return path, record


def _run_config(workdir: epath.Path) -> ml_collections.ConfigDict:
  """The run's config, as the trainer recorded it in config.json."""
  if workdir.exists() and not workdir.is_dir():
    raise EvaluationError(f"workdir {workdir} is a file, not a directory; pass the --workdir of a "
                          "run, the directory the trainer was given.")
  if not workdir.is_dir():
    raise EvaluationError(f"workdir {workdir} does not exist; pass the --workdir of a run.")
  path = workdir / "config.json"
  if not path.exists():
    raise EvaluationError(f"{workdir} holds no config.json, so no run has started there; pass "
                          "the --workdir the trainer was given.")
  try:
    config = ml_collections.ConfigDict(json.loads(path.read_text()))
  except ValueError as error:
    raise EvaluationError(f"{path} is not a config the trainer wrote ({error}); restore it, or "
                          "rerun the trainer on this workdir, which writes it again.") from None
  return loop.recorded_config(config)


def _reader(workdir: epath.Path) -> checkpoints.Reader:
  try:
    reader = checkpoints.Reader(workdir)
    steps = reader.steps()
  except Exception as error:  # pylint: disable=broad-except  # orbax's, of many types.
    raise EvaluationError(
        f"could not list the checkpoints in {workdir / 'checkpoints'} ({type(error).__name__}: "
        f"{_first_line(error)}); rerun, since a training run may have been removing one.") from None
  if not steps:
    raise EvaluationError(
        f"{workdir} has no checkpoint yet; the run saves one every checkpoint_every_steps steps "
        "and at its end: rerun once it has.")
  return reader


def _pick_step(reader: checkpoints.Reader, checkpoint: str) -> int:
  """The step `checkpoint` ("best", "latest" or a step number) names."""
  steps = reader.steps()
  if checkpoint == "latest":
    return reader.latest_step()
  if checkpoint == "best":
    best = reader.best_step()
    if best is None:
      raise EvaluationError(
          f"no checkpoint in {reader.directory} records an evaluation (they were saved between "
          f"evaluations, or by an older trainer); pass --checkpoint=latest or a step of {steps}.")
    return best
  if not checkpoint.isdigit():
    raise EvaluationError(f"--checkpoint={checkpoint} is none of best, latest or a step number; "
                          f"the steps in {reader.directory} are {steps}.")
  if int(checkpoint) not in steps:
    raise EvaluationError(f"no checkpoint of step {checkpoint} in {reader.directory}; its steps "
                          f"are {steps}.")
  return int(checkpoint)


def _read_checkpoint(workdir: epath.Path, step: int, read):
  """`read()`, whose failure is an EvaluationError that says whether the step vanished."""
  try:
    return read()
  except Exception as error:  # pylint: disable=broad-except  # Any damage or a deletion.
    reader = checkpoints.Reader(workdir)
    if step not in reader.steps():
      raise EvaluationError(
          f"checkpoint {step} was removed while it was read (a training run keeps only its "
          f"last checkpoints and the best); rerun, with one of the steps kept now: "
          f"{reader.steps()}.") from None
    raise EvaluationError(
        f"checkpoint {step} in {reader.directory} is unreadable ({type(error).__name__}: "
        f"{_first_line(error)[:200]}); evaluate another with --checkpoint=STEP, one of "
        f"{reader.steps()}.") from None


def _first_line(error: Exception) -> str:
  return (str(error).splitlines() or [""])[0]


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, but every bad command line is one line and exit status 2."""
  cli.help_if_asked(argv)
  if any(arg.lstrip("-").split("=")[0].split(".")[0] == "config" for arg in argv[1:]):
    cli.fail("--config is not taken: the run's own config is read from WORKDIR/config.json.")
  try:
    argv = flags.FLAGS(argv)
  except flags.Error as error:
    cli.fail(str(error))
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])} (flags take the form --name=value).")
  if not flags.FLAGS.workdir:
    cli.fail("--workdir is missing or empty; pass the workdir of the run to evaluate.")
  return argv


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


def main(argv):
  del argv  # Checked by _parse_flags.
  cli.start()  # The run's own compilation cache may hold the evaluation step.
  logging.get_absl_handler().addFilter(checkpoints.quiet_orbax_info)
  sys.unraisablehook = _unless_orbax_loop_closed
  try:
    path, record = evaluate_run(flags.FLAGS.workdir, flags.FLAGS.checkpoint,
                                flags.FLAGS.eval_protocol, flags.FLAGS.eval_batch_size,
                                flags.FLAGS.data_dir)
  except EvaluationError as error:
    cli.fail(str(error))
  # OSError: a disk failing; CorruptImageError: an image that does not decode; NonFiniteError:
  # finite weights whose scores overflow (no result is written).
  except (OSError, data.CorruptImageError, loop.NonFiniteError) as error:
    cli.fail(str(error), cli.RUN_FAILED)
  if jax.process_index() == 0:
    print(f"{record['model']} step {record['step']} ({record['checkpoint']}) on "
          f"{record['dataset']} {record['eval_split']}, {record['protocol']}: top-1 error "
          f"{record['top1_error']:.2f}%  top-5 error {record['top5_error']:.2f}%  loss "
          f"{record['loss']:.4f}  ({record['examples']} examples); written to {path}")


if __name__ == "__main__":
  _define_flags()
  for _name in cli.FLAG_NAMES:
    flags.declare_key_flag(_name)
  app.run(main, flags_parser=_parse_flags)
