"""Orbax checkpoints of a run: save asynchronously, keep the last N plus the best, resume.

A checkpoint holds the whole `TrainState` (parameters, BN statistics, optimizer
state, step, warm-up state), the streaming pipeline's iterator state when there
is one, and the identity of the run (model and its overrides, class count), so
a workdir of another model is refused with a clear error instead of a shape
mismatch deep inside orbax. An unreadable newest checkpoint is reported in one
line, renamed to `<step>.unreadable-<time>` (kept, never overwritten) and the
next older one is used; if none is readable, nothing is renamed and the run
stops. A checkpoint is damaged, and handled the same way, when its arrays differ
from the CRC-32 checksums saved beside them (a flipped byte) or its weights are not
finite. A failed write raises `CheckpointError`. Each checkpoint written after an
evaluation also records that evaluation's top-1 error, which picks the best one.

`Reader` reads a run's checkpoints without writing, renaming or deleting anything,
so it may read those of a run that is still training (`resnet_jax.training.evaluate`).
"""

from __future__ import annotations

import itertools
import logging as std_logging
import os
import shutil
import time
import uuid
import zlib
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

BEST_METRIC = "top1_error"
_JSON_ITEMS = ("data", "identity", "checksums")
# Orbax warnings about what this module does on purpose: a save without metrics (a checkpoint
# between evaluations, or at a preemption, has none) and a read-only manager (`Reader`).
_EXPECTED_ORBAX_WARNINGS = ("did not provide metrics", "Given directory is read only")


def quiet_orbax_info(record: std_logging.LogRecord) -> bool:
  """A logging filter: False for orbax's INFO records and expected warnings, else True.

  Orbax logs every save step at INFO through absl (dozens of lines a checkpoint on
  many hosts); its warnings and errors stay, but for those about what this module
  does on purpose. Records carry the standard library's levels, not absl's (whose
  WARNING is -1).
  """
  if "/orbax/" not in record.pathname:
    return True
  message = record.getMessage()
  return (record.levelno >= std_logging.WARNING
          and not any(expected in message for expected in _EXPECTED_ORBAX_WARNINGS))


def check_writable(workdir: epath.Path) -> list[epath.Path]:
  """Creates the workdir if needed; returns the directories made for it, the deepest first.
  Raises ValueError if it cannot be created or written."""
  if workdir.exists() and not workdir.is_dir():
    raise ValueError(f"workdir {workdir} is a file, not a directory; pass a --workdir that is a "
                     "directory, or one that does not exist yet.")
  created = list(itertools.takewhile(lambda path: not path.exists(), [workdir, *workdir.parents]))
  probe = workdir / f".write_probe_{uuid.uuid4().hex}"
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe.write_text("ok")
  except Exception as error:  # OSError locally; tf.errors.OpError (not an OSError) on gs://.
    reason = getattr(error, "strerror", None) or getattr(error, "message", None) or error
    raise ValueError(f"workdir {workdir} is not writable ({reason}); "
                     "pass a --workdir you can write to.") from None
  finally:
    if probe.exists():  # A full disk creates the probe, then fails to write it.
      probe.unlink()
  return created


def remove_if_empty(directories: list[epath.Path]) -> None:
  """Removes each of `directories` (`check_writable`'s, the deepest first) while it holds no file
  (only directories, such as the empty checkpoints/): what a run stopped at start-up made."""
  for directory in directories:
    try:
      if any(files for _, _, files in directory.walk()):
        return
      directory.rmtree()
    except Exception:  # pylint: disable=broad-except  # Removed by another process of the job.
      pass  # The start-up error that brought us here is what matters.


def check_space(workdir: epath.Path, state) -> None:
  """Raises ValueError if a local workdir lacks the space for one checkpoint of `state`."""
  try:
    free = shutil.disk_usage(os.fspath(workdir)).free
  except OSError:  # Not a local path (gs://...): the bucket has no fixed size.
    return
  needed = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
  if free < needed:
    raise ValueError(f"workdir {workdir} has {free / 2**20:.1f} MiB free, but one checkpoint of "
                     f"this run needs {needed / 2**20:.1f} MiB; free some space or pass another "
                     "--workdir.")


class CheckpointError(OSError):
  """A checkpoint could not be written (a full disk, a lost mount)."""


class DamagedCheckpointError(ValueError):
  """A checkpoint read back is not what was saved, or holds non-finite weights."""


def checksums(state) -> dict[str, str]:
  """The CRC-32 of each array of `state` (replicated, as a TrainState is), by its tree path."""
  leaves = jax.tree_util.tree_leaves_with_path(state)
  # The first local copy of a replicated array is all of it, on every process.
  values = jax.device_get([leaf.addressable_data(0) for _, leaf in leaves])
  return {jax.tree_util.keystr(path): f"{zlib.crc32(np.asarray(value).tobytes()):08x}"
          for (path, _), value in zip(leaves, values)}


def check_restored(restored, saved_checksums: dict[str, str] | None) -> None:
  """Raises DamagedCheckpointError if `restored` (a state as it was saved) differs from its
  `saved_checksums` (None: a checkpoint from before they were saved) or holds non-finite weights."""
  if saved_checksums is not None:
    differ = [path for path, crc in checksums(restored).items() if saved_checksums.get(path) != crc]
    if differ:
      raise DamagedCheckpointError(f"{len(differ)} arrays differ from their saved checksums "
                                   f"({', '.join(differ[:3])})")
  # Only the weights: the optimizer may hold infinities by design (reduce_on_plateau's best loss).
  nonfinite = [jax.tree_util.keystr(path)
               for path, leaf in jax.tree_util.tree_leaves_with_path(restored)
               if _is_weight(path) and not np.isfinite(jax.device_get(leaf.addressable_data(0))).all()]
  if nonfinite:
    raise DamagedCheckpointError(f"non-finite weights in {', '.join(nonfinite[:3])}")


def _is_weight(path) -> bool:
  """Whether a tree path of a TrainState (or its older dict) leads into params or batch_stats."""
  first = path[0]
  return getattr(first, "name", getattr(first, "key", None)) in ("params", "batch_stats")


def run_identity(config: ml_collections.ConfigDict, num_classes: int | None) -> dict[str, Any]:
  """What a checkpoint must match to be resumed by `config` (and its model's class count)."""
  identity = {"model": config.model, "model_overrides": config.model_overrides.to_dict(),
              "dataset": config.dataset.name}
  if num_classes is not None:
    identity["num_classes"] = num_classes
  return identity


def _best_metric(metrics: dict[str, float]) -> float:
  return metrics[BEST_METRIC]


def _orbax_manager(workdir: epath.Path, **options) -> ocp.CheckpointManager:
  # Each array is written whole by its first replica: orbax's default on CPU and TPU splits a
  # replicated array among its replicas with a jitted slice per shape, compiled at the first
  # save of a process, which may be a preemption's (BENCHMARKS.md, "Checkpoint saves").
  arrays = ocp.type_handlers.create_type_handler_registry(
      (jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False)))
  # best_fn (lowest first) makes orbax write each save's metrics and answer best_step().
  return ocp.CheckpointManager(
      workdir / "checkpoints",
      options=ocp.CheckpointManagerOptions(best_fn=_best_metric, best_mode="min", **options),
      item_handlers={"state": ocp.PyTreeCheckpointHandler(type_handler_registry=arrays),
                     **{name: ocp.JsonCheckpointHandler() for name in _JSON_ITEMS}})


def check_identity(saved: dict[str, Any], identity: dict[str, Any]) -> None:
  """Raises ValueError if a checkpoint's `saved` identity is not the run's `identity`."""
  # Checkpoints written before a field joined the identity still match on the others.
  if any(saved.get(key, value) != value for key, value in identity.items()):
    raise ValueError(
        f"the workdir holds checkpoints of a different run ({saved}) than this config "
        f"({identity}); use a new --workdir, or the config that wrote them.")


class Reader:
  """Reads one run's checkpoints under `workdir/checkpoints`; changes nothing there."""

  def __init__(self, workdir: epath.Path, **writing_options):
    # `writing_options`: orbax's CheckpointManagerOptions for a `Manager`, which writes.
    if writing_options:
      self._manager = _orbax_manager(workdir, **writing_options)
      return
    # Orbax warns, through absl's logger, that a read-only manager's directory is read only.
    absl_logger = std_logging.getLogger("absl")
    absl_logger.addFilter(quiet_orbax_info)
    try:
      self._manager = _orbax_manager(workdir, read_only=True, create=False,
                                     save_interval_steps=0)
    finally:
      absl_logger.removeFilter(quiet_orbax_info)

  @property
  def directory(self) -> epath.Path:
    """The folder of the checkpoints, one subfolder per step."""
    return self._manager.directory

  def steps(self) -> list[int]:
    """The steps of the checkpoints, oldest first."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The kept step with the lowest eval top-1 error; None if no checkpoint records one."""
    return self._manager.best_step()

  def saved_identity(self, step: int) -> dict[str, Any]:
    """The identity of the run that wrote `step` (see `run_identity`)."""
    return self._manager.restore(step, args=ocp.args.Composite(
        identity=ocp.args.JsonRestore())).identity

  def restore(self, step: int, state) -> tuple[Any, dict | None]:
    """The (state, data state) saved at `step`, laid out as `state` (arrays or their shapes)."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    has_data = (self.directory / str(step) / "data").exists()
    has_checksums = (self.directory / str(step) / "checksums").exists()
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)),
        **({"data": ocp.args.JsonRestore()} if has_data else {}),
        **({"checksums": ocp.args.JsonRestore()} if has_checksums else {})))
    check_restored(restored.state, restored.get("checksums"))
    return restored.state, restored.get("data")


class Manager(Reader):
  """Saves and restores one run's checkpoints under `workdir/checkpoints`."""

  def __init__(self, workdir: epath.Path, config: ml_collections.ConfigDict, keep: int,
               num_classes: int | None = None):
    self.identity = run_identity(config, num_classes)
    policy = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(n=keep),
        checkpoint_managers.BestN(get_metric_fn=_best_metric, reverse=True, n=1,
                                  keep_checkpoints_without_metrics=False),
    ])
    super().__init__(workdir, preservation_policy=policy, create=True)

  def save(self, step: int, state, data_state: dict | None, eval_metrics: dict | None) -> None:
    items = {"state": ocp.args.PyTreeSave(state), "identity": ocp.args.JsonSave(self.identity),
             "checksums": ocp.args.JsonSave(checksums(state))}
    if data_state is not None:
      items["data"] = ocp.args.JsonSave(data_state)
    metrics = {BEST_METRIC: eval_metrics[BEST_METRIC]} if eval_metrics else None
    try:  # Also reports the failure of the previous, asynchronous save.
      self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
    except Exception as error:
      raise self._save_error(error) from error

  def restore_latest(self, state):
    """The newest readable checkpoint's (state, data state), or (`state`, None) if there is none."""
    steps = self.steps()[::-1]
    if not steps:
      return state, None
    try:
      saved = self.saved_identity(steps[0])
    except Exception:  # Unreadable: reported below, where the older ones are tried.
      saved = {}
    check_identity(saved, self.identity)
    damaged = []
    for step in steps:
      try:
        restored = self.restore(step, state)
      except DamagedCheckpointError as error:
        logging.error("Checkpoint at step %d is damaged (%s); trying the previous one.", step,
                      error)
        damaged.append(step)
        continue
      except Exception as error:  # Any other damage: truncated, missing or garbage files.
        logging.error("Checkpoint at step %d is unreadable (%s: %s); trying the previous one.",
                      step, type(error).__name__, _first_line(error)[:200])
        damaged.append(step)
        continue
      for bad in damaged:
        self._set_aside(bad)
      return restored
    # Left in place: a rerun must fail the same way, not silently train from scratch.
    raise ValueError(f"none of the checkpoints {steps} in {self.directory} is readable; "
                     "move the directory away to start afresh, or restore it from a backup.")

  def _set_aside(self, step: int) -> None:
    """Renames a damaged step out of orbax's view (kept for inspection, not overwritten)."""
    damaged = self.directory / str(step)
    if jax.process_index() == 0:
      damaged.rename(damaged.parent / f"{step}.unreadable-{int(time.time())}")
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
    self._manager.reload()

  def wait(self) -> None:
    try:
      self._manager.wait_until_finished()
    except Exception as error:
      raise self._save_error(error) from error

  def _save_error(self, error: Exception) -> CheckpointError:
    return CheckpointError(f"could not write a checkpoint to {self._manager.directory} "
                           f"({type(error).__name__}: {_first_line(error)}); free some space or "
                           "check the filesystem, then rerun to resume from the last complete one.")


def _first_line(error: Exception) -> str:
  return (str(error).splitlines() or [""])[0]
