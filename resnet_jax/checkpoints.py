"""Orbax checkpoints of a run: save asynchronously, keep the last N plus the best, resume.

A checkpoint holds the whole `TrainState` (parameters, BN statistics, optimizer
state, step, warm-up state), the streaming pipeline's iterator state when there
is one, and the identity of the run (model and its overrides, class count), so
a workdir of another model is refused with a clear error instead of a shape
mismatch deep inside orbax. An unreadable newest checkpoint is reported in one
line, renamed to `<step>.unreadable-<time>` (kept, never overwritten) and the
next older one is used.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

BEST_METRIC = "top1_error"


def check_writable(workdir: epath.Path) -> None:
  """Raises ValueError if the workdir cannot be created or written."""
  probe = workdir / f".write_probe_{uuid.uuid4().hex}"
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe.write_text("ok")
    probe.unlink()
  except OSError as error:
    raise ValueError(f"workdir {workdir} is not writable ({error.strerror or error}); "
                     "pass a --workdir you can write to.") from None


def run_identity(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What a checkpoint must match to be resumed by `config`."""
  return {"model": config.model, "model_overrides": config.model_overrides.to_dict(),
          "dataset": config.dataset.name}


class Manager:
  """Saves and restores one run's checkpoints under `workdir/checkpoints`."""

  def __init__(self, workdir: epath.Path, config: ml_collections.ConfigDict, keep: int):
    self.identity = run_identity(config)
    policy = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(n=keep),
        checkpoint_managers.BestN(get_metric_fn=lambda m: m[BEST_METRIC], reverse=True, n=1,
                                  keep_checkpoints_without_metrics=False),
    ])
    self._manager = ocp.CheckpointManager(
        workdir / "checkpoints",
        options=ocp.CheckpointManagerOptions(preservation_policy=policy, create=True),
        item_names=("state", "data", "identity"))

  def save(self, step: int, state, data_state: dict | None, eval_metrics: dict | None) -> None:
    items = {"state": ocp.args.StandardSave(state), "identity": ocp.args.JsonSave(self.identity)}
    if data_state is not None:
      items["data"] = ocp.args.JsonSave(data_state)
    metrics = {BEST_METRIC: eval_metrics[BEST_METRIC]} if eval_metrics else None
    self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

  def restore_latest(self, state):
    """The newest readable checkpoint's (state, data state), or (`state`, None) if there is none."""
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      return state, None
    self._check_identity(steps[0])
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    for step in steps:
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract),
            **({"data": ocp.args.JsonRestore()} if self._has_item(step, "data") else {})))
      except Exception as error:  # Any damage: truncated, missing or garbage files.
        logging.error("Checkpoint at step %d is unreadable (%s: %s); trying the previous one.",
                      step, type(error).__name__, str(error).splitlines()[0][:200])
        self._set_aside(step)
        continue
      logging.info("Resumed from the checkpoint at step %d.", step)
      return restored.state, restored.get("data")
    raise ValueError(f"none of the checkpoints {steps} in {self._manager.directory} is readable; "
                     "move the directory away to start afresh, or restore it from a backup.")

  def _set_aside(self, step: int) -> None:
    """Renames a damaged step out of orbax's view (kept for inspection, not overwritten)."""
    damaged = self._manager.directory / str(step)
    if jax.process_index() == 0:
      damaged.rename(damaged.parent / f"{step}.unreadable-{int(time.time())}")
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
    self._manager.reload()

  def _has_item(self, step: int, name: str) -> bool:
    return (self._manager.directory / str(step) / name).exists()

  def _check_identity(self, step: int) -> None:
    try:
      saved = self._manager.restore(step, args=ocp.args.Composite(
          identity=ocp.args.JsonRestore())).identity
    except Exception:  # Unreadable: restore_latest reports it and falls back.
      return
    if saved != self.identity:
      raise ValueError(
          f"the workdir holds checkpoints of a different run ({saved}) than this config "
          f"({self.identity}); use a new --workdir, or the config that wrote them.")

  def wait(self) -> None:
    self._manager.wait_until_finished()
