"""A saved run, read-only: its config, its checkpoints, its trained model.

A run's workdir holds what the trainer writes as it starts and trains: `config.json` (the run's
config), `input_mean.npy` (the mean its pipeline subtracts from pixels, `loop.INPUT_MEAN_FILE`)
and `checkpoints/` (orbax, a folder per step). This module reads them without writing, renaming
or deleting anything there and without claiming the workdir, so a run may be read while it still
trains. The evaluator (`resnet_jax.training.evaluate`) reads runs through it, and so may you:

  from resnet_jax.training import runs
  model, preprocessing = runs.load_model("/tmp/resnet110")  # its best checkpoint
  logits = model(preprocessing(images))  # images: float [N, H, W, 3], RGB pixels in [0, 255]

Whatever stops a run from being read raises `RunError`: one line naming the problem and the fix,
in the evaluator's flags (--workdir, --checkpoint: `load_model`'s arguments).
"""

from __future__ import annotations

import io
import json
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import nnx

from resnet_jax import data, models
from resnet_jax.models import pretrained
from resnet_jax.training import checkpoints, cli, loop, optim


class RunError(ValueError):
  """A run cannot be read; the message names the problem and the fix."""


def read_config(workdir: epath.Path) -> ml_collections.ConfigDict:
  """The run's config, as the trainer recorded it in config.json (`loop.recorded_config`)."""
  if workdir.exists() and not workdir.is_dir():
    raise RunError(f"workdir {workdir} is a file, not a directory; pass the --workdir of a "
                   "run, the directory the trainer was given.")
  if not workdir.is_dir():
    raise RunError(f"workdir {workdir} does not exist; pass the --workdir of a run.")
  path = workdir / "config.json"
  if not path.exists():
    raise RunError(f"{workdir} holds no config.json, so no run has started there; pass "
                   "the --workdir the trainer was given.")
  try:
    config = ml_collections.ConfigDict(json.loads(path.read_text()))
  except ValueError as error:
    raise RunError(f"{path} is not a config the trainer wrote ({error}); restore it, or "
                   "rerun the trainer on this workdir, which writes it again.") from None
  return loop.recorded_config(config)


def checkpoint_reader(workdir: epath.Path) -> checkpoints.Reader:
  """A read-only `checkpoints.Reader` of the run's checkpoints, of which there is at least one."""
  try:
    reader = checkpoints.Reader(workdir)
    steps = reader.steps()
  except Exception as error:  # pylint: disable=broad-except  # orbax's, of many types.
    raise RunError(
        f"could not list the checkpoints in {workdir / 'checkpoints'} ({type(error).__name__}: "
        f"{cli.first_line(error)}); rerun, since a training run may have been removing one."
    ) from None
  if not steps:
    raise RunError(
        f"{workdir} has no checkpoint yet; the run saves one every checkpoint_every_steps steps "
        "and at its end: rerun once it has.")
  return reader


def pick_step(reader: checkpoints.Reader, checkpoint: str | int) -> int:
  """The step `checkpoint` names: "best" (the kept checkpoint of the lowest top-1 error in the
  run's own evaluations), "latest", or a step number."""
  checkpoint = str(checkpoint)
  steps = reader.steps()
  if checkpoint == "latest":
    return reader.latest_step()
  if checkpoint == "best":
    best = reader.best_step()
    if best is None:
      raise RunError(
          f"no checkpoint in {reader.directory} records an evaluation (they were saved between "
          f"evaluations, or by an older trainer); pass --checkpoint=latest or a step of {steps}.")
    return best
  if not checkpoint.isdigit():
    raise RunError(f"--checkpoint={checkpoint} is none of best, latest or a step number; "
                   f"the steps in {reader.directory} are {steps}.")
  if int(checkpoint) not in steps:
    raise RunError(f"no checkpoint of step {checkpoint} in {reader.directory}; its steps "
                   f"are {steps}.")
  return int(checkpoint)


def read_checkpoint(workdir: epath.Path, step: int, read: Callable[[], Any]) -> Any:
  """`read()`, whose failure is a RunError that says whether the step vanished meanwhile (a
  training run removes the checkpoints past its keep_checkpoints)."""
  try:
    return read()
  except Exception as error:  # pylint: disable=broad-except  # Any damage or a deletion.
    reader = checkpoints.Reader(workdir)
    if step not in reader.steps():
      raise RunError(
          f"checkpoint {step} was removed while it was read (a training run keeps only its "
          f"last checkpoints and the best); rerun, with one of the steps kept now: "
          f"{reader.steps()}.") from None
    raise RunError(
        f"checkpoint {step} in {reader.directory} is unreadable ({type(error).__name__}: "
        f"{cli.first_line(error)[:200]}); evaluate another with --checkpoint=STEP, one of "
        f"{reader.steps()}.") from None


def restore(workdir: epath.Path, config: ml_collections.ConfigDict, reader: checkpoints.Reader,
            step: int, num_classes: int, mesh: jax.sharding.Mesh) -> loop.TrainState:
  """The train state saved at `step`, replicated on `mesh`, once its checkpoint is found to be
  of `config`'s run (`checkpoints.check_identity`) for a model of `num_classes`."""
  saved = read_checkpoint(workdir, step, lambda: reader.saved_identity(step))
  try:
    checkpoints.check_identity(saved, checkpoints.run_identity(config, num_classes))
  except ValueError as error:
    raise RunError(f"{workdir / 'config.json'} is not the config of checkpoint {step}: "
                   f"{error}") from None
  abstract_state = loop.abstract_train_state(config, num_classes, mesh, optim.create(config))
  state, _ = read_checkpoint(workdir, step, lambda: reader.restore(step, abstract_state))
  return state


def input_mean(workdir: epath.Path, config: ml_collections.ConfigDict) -> np.ndarray:
  """The mean the run's pipeline subtracted from pixels (`data.Dataset.mean`): float32 [H, W, 3]
  or [1, 1, 3], as the trainer recorded it in WORKDIR/input_mean.npy; for a run started before
  the trainer recorded it, its dataset's (`config.dataset`, which must then be at hand; a
  per-pixel mean is read from the dataset's cache, else computed from its training images)."""
  path = workdir / loop.INPUT_MEAN_FILE
  if path.exists():
    try:
      return np.load(io.BytesIO(path.read_bytes()), allow_pickle=False)
    except Exception as error:  # pylint: disable=broad-except  # numpy's, OSError, gs://.
      raise RunError(f"{path} is unreadable ({error}); rerun the trainer on {workdir}, which "
                     "writes it again as it starts.") from None
  logging.info("%s holds no %s (a run started before the trainer recorded it): reading the mean "
               "of its dataset, %s.", workdir, loop.INPUT_MEAN_FILE, config.dataset.name)
  try:
    dataset = data.create(loop.dataset_config(config), data.core.make_mesh(), train=False)
  except ValueError as error:
    raise RunError(f"{workdir} holds no {loop.INPUT_MEAN_FILE} (a run started before the "
                   f"trainer recorded it), and the mean of its dataset cannot be read: "
                   f"{cli.first_line(error)}") from None
  return data.core.host_copy(dataset.mean)


def load_model(workdir: epath.PathLike, checkpoint: str | int = "best") -> pretrained.Trained:
  """The trained model of checkpoint `checkpoint` ("best", "latest" or a step, as `pick_step`
  reads it) of the run in `workdir`, and the preprocessing it was trained with.

  The model is the run's network (its config's model, model_overrides and class count), built
  with flax's own layers (`models.create`'s defaults, not the trainer's CPU training kernels:
  the same variables and, in eval mode, the same computation), its compute dtype the run's for
  the default device's platform (`loop.dtype_for`), in eval mode, its arrays on the default
  device. The preprocessing is the run's mean, subtracted from RGB pixels in [0, 255]
  (`input_mean`, std 1), so `model(preprocessing(pixels))` scores images as the run's evaluation
  did. Reads as the evaluator does, changing nothing under `workdir`; raises `RunError` for a
  missing workdir or checkpoint, a bad step, a checkpoint of another run or an unreadable one.
  """
  workdir = epath.Path(workdir)
  config = read_config(workdir)
  reader = checkpoint_reader(workdir)
  step = pick_step(reader, checkpoint)
  try:
    num_classes = data.config.num_classes(data.config.resolve(config.dataset))
  except ValueError as error:
    raise RunError(f"{workdir / 'config.json'} holds a dataset config the data package does not "
                   f"read ({error}); restore the config.json the trainer wrote.") from None
  mesh = data.core.make_mesh(jax.devices()[:1])
  state = restore(workdir, config, reader, step, num_classes, mesh)
  dtype = loop.dtype_for(config, data.core.platform(mesh))
  # Shapes only: every array is the checkpoint's.
  model = nnx.eval_shape(lambda: models.create(config.model, num_classes=num_classes,
                                               rngs=nnx.Rngs(0), dtype=dtype,
                                               **config.model_overrides))
  nnx.update(model, state.params, state.batch_stats)
  model.eval()
  return pretrained.Trained(model, pretrained.Preprocessing(mean=input_mean(workdir, config)))
