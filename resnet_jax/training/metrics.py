"""What a run reports (a console progress line, TensorBoard scalars, a JSON-lines log and a
summary), and the training curves read back from its log (Figs. 1, 4, 6).

Files in the workdir (written by process 0 only, through etils.epath: local or gs://):
  metrics.jsonl   one JSON object per train log or evaluation: {"step", "kind", ...}; errors
                  (`top1_error`, `top5_error`) in percent for both kinds; at the end of each
                  command that trained to the end or was preempted, a "run" record: how it
                  ended, its steps and seconds by part;
                  a "warmup_end" record at the iteration the ResNet-110 warm-up ended
  events.out.*    TensorBoard event files (tensorboardX: no TensorFlow needed): the same scalars
                  and the config; a resumed run hides the steps after its checkpoint that the
                  interrupted run had logged (they are logged again)
  config.json     the run's full config
  summary.json    the final evaluation, parameter count, dataset and best checkpoint's step:
                  the same bytes for the same run, however often it was resumed

The console's throughput and ETA count training steps only: the time spent evaluating and
checkpointing is measured apart (`Writer.paused`), and compilation happens before the timer
starts; the closing line (`Writer.write_summary`) gives each total.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any, Iterator, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from resnet_jax.training import optim


def log_line(message: str, *args: Any) -> None:
  """A line on the console, from the first process only (every process would repeat it)."""
  if jax.process_index() == 0:
    logging.info(message, *args)


def _duration(seconds: float) -> str:
  minutes, seconds = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class _EventFile:
  """A TensorBoard event file written through epath, whose gs:// files live inside a `with`."""

  def __init__(self, path: str):
    self._context = contextlib.ExitStack()
    self._file = self._context.enter_context(epath.Path(path).open("wb"))

  def write(self, data: bytes) -> None:
    self._file.write(data)

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    self._context.close()


class _EpathEventFiles:
  """tensorboardX's file access for a URI workdir: through epath. (Its own gs:// writer needs
  google-cloud-storage, and it writes any other URI to the local disk.)"""

  def open(self, path: str) -> _EventFile:
    return _EventFile(path)

  def directory_check(self, path: str) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)


class Writer:
  """Writes a run's metrics; a no-op on every process but the first."""

  def __init__(self, workdir: epath.Path, *, total_steps: int, batch_size: int, train_size: int,
               dataset_name: str, start_step: int):
    self.workdir = workdir
    self.total_steps, self.batch_size, self.train_size = total_steps, batch_size, train_size
    self.dataset_name = dataset_name
    self.active = jax.process_index() == 0
    self._tensorboard = None
    if self.active:
      from tensorboardX import SummaryWriter, record_writer
      scheme, separator, _ = str(workdir).partition("://")
      if separator:
        record_writer.register_writer_factory(scheme, _EpathEventFiles())
      # TensorBoard drops the steps from purge_step on that earlier event files hold.
      self._tensorboard = SummaryWriter(str(workdir), purge_step=start_step + 1 if start_step
                                        else None)
    self._last_step, self._last_time = start_step, time.perf_counter()
    self._paused_in_window = 0.0
    # Seconds spent in each part of the run since this process started it.
    self.seconds = {"training": 0.0, "evaluation": 0.0, "checkpoints": 0.0}

  def start_timer(self, step: int) -> None:
    """Starts timing training steps from `step` (after compilation)."""
    self._last_step, self._last_time, self._paused_in_window = step, time.perf_counter(), 0.0

  @contextlib.contextmanager
  def paused(self, part: str) -> Iterator[None]:
    """Times a `part` of the run ("evaluation", "checkpoints") apart from training throughput."""
    started = time.perf_counter()
    try:
      yield
    finally:
      elapsed = time.perf_counter() - started
      self._paused_in_window += elapsed
      self.seconds[part] += elapsed

  def _append(self, record: dict[str, Any]) -> None:
    with (self.workdir / "metrics.jsonl").open("a") as log:
      log.write(json.dumps(record) + "\n")

  def write_config(self, config: ml_collections.ConfigDict) -> None:
    if self.active:
      text = config.to_json_best_effort(indent=2)
      (self.workdir / "config.json").write_text(text)
      # Indented four spaces: a Markdown code block in TensorBoard's text tab.
      self._tensorboard.add_text("config", "".join(f"    {line}\n" for line in text.splitlines()))

  def write_train(self, step: int, step_metrics: Sequence[dict[str, np.ndarray]]) -> None:
    """Averages the metrics of the steps since the last call and reports them."""
    now = time.perf_counter()
    training_seconds = max(now - self._last_time - self._paused_in_window, 1e-9)
    self.seconds["training"] += training_seconds
    images_per_second = (step - self._last_step) * self.batch_size / training_seconds
    self._last_step, self._last_time, self._paused_in_window = step, now, 0.0
    if not self.active:
      return
    means = {key: float(np.mean([m[key] for m in step_metrics])) for key in step_metrics[0]}
    means["learning_rate"] = float(step_metrics[-1]["learning_rate"])  # The current rate.
    record = {"step": step, "kind": "train", "epoch": step * self.batch_size / self.train_size,
              "images_per_second": images_per_second, **means}
    eta = (self.total_steps - step) * self.batch_size / max(images_per_second, 1e-9)
    logging.info("[%s] step %d/%d  epoch %.2f  loss %.4f  train error %.2f%%  lr %.4g  "
                 "%.0f img/s  ETA %s", self.dataset_name, step, self.total_steps, record["epoch"],
                 means["loss"], means["top1_error"], means["learning_rate"],
                 images_per_second, _duration(eta))
    self._append(record)
    for key in (*means, "images_per_second"):
      self._tensorboard.add_scalar(f"train/{key}", record[key], step)

  def write_warmup_end(self, step: int, train_error: float, rule: optim.WarmupRule) -> None:
    """Reports the iteration the warm-up by `rule` ended at (Sec. 4.2) and the error that
    ended it."""
    if not self.active:
      return
    logging.info("warm-up: over after iteration %d, the mean training error of the last %d "
                 "iterations being %.2f%% (below %.0f%%); the schedule's learning rate from "
                 "iteration %d", step, rule.window, 100 * train_error,
                 100 * rule.until_train_error, step + 1)
    self._append({"step": step, "kind": "warmup_end", "top1_error": 100 * train_error})

  def write_eval(self, step: int, result: dict[str, float], split: str = "eval",
                 logged: bool = True) -> None:
    """Reports an evaluation; `logged=False`: on the console only (a repeat of a logged step)."""
    if not self.active:
      return
    logging.info("[%s] step %d  %s: top-1 error %.2f%%  top-5 error %.2f%%  loss %.4f  (%d examples)",
                 self.dataset_name, step, split, result["top1_error"], result["top5_error"],
                 result["loss"], result["examples"])
    if not logged:
      return
    self._append({"step": step, "kind": split, **result})
    for key in ("top1_error", "top5_error", "loss"):
      self._tensorboard.add_scalar(f"{split}/{key}", result[key], step)
    self._tensorboard.flush()

  def write_summary(self, model: str, result: dict[str, float], *, num_params: int,
                    steps_run: int, wall_seconds: float, compile_seconds: float,
                    best_checkpoint: epath.Path | None) -> None:
    """Writes summary.json for the run of `model` (a name of `models.create`) and its closing
    line."""
    if not self.active:
      return
    summary_path = self.workdir / "summary.json"
    summary = {"model": model, "dataset": self.dataset_name, "steps": self.total_steps,
               "num_params": num_params, **result,
               "best_checkpoint_step": int(best_checkpoint.name) if best_checkpoint else None}
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    self.write_run(self.total_steps, steps_run=steps_run, wall_seconds=wall_seconds,
                   compile_seconds=compile_seconds, ended="done")
    logging.info("done: %d steps, %d in this run, in %s (compile %.1f s, training %.1f s, "
                 "evaluation %.1f s, checkpoints %.1f s); final top-1 error %.2f%%; summary %s; "
                 "best checkpoint %s", self.total_steps, steps_run, _duration(wall_seconds),
                 compile_seconds, self.seconds["training"], self.seconds["evaluation"],
                 self.seconds["checkpoints"], result["top1_error"], summary_path,
                 best_checkpoint or "none (no evaluation was saved with a checkpoint)")

  def write_run(self, step: int, *, steps_run: int, wall_seconds: float, compile_seconds: float,
                ended: str) -> None:
    """The command's "run" record: the step it `ended` at ("done" or "preempted"), its steps and
    its seconds by part."""
    if self.active:
      self._append({"step": step, "kind": "run", "ended": ended, "steps": steps_run, "seconds": {
          "wall": wall_seconds, "compile": compile_seconds, **self.seconds}})

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()


def read_metrics(workdir: epath.PathLike) -> list[dict]:
  """The records of a workdir's metrics.jsonl (local or gs://); [] when there is none."""
  path = epath.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def training_curves(workdirs: Sequence[epath.PathLike]) -> dict[str, dict[str, np.ndarray]]:
  """Training and test error (%) against iterations, per workdir (keyed by str(workdir)).

  Returns {"train_step", "train_error", "test_step", "test_error"} arrays for each
  workdir. A resumed run logs again the steps between its last checkpoint and the
  stop; the record written last for a step wins. Training records give `top1_error`
  in percent; those of runs older than that, `train_error` as a fraction.
  """
  curves = {}
  for workdir in workdirs:
    by_step = {"train": {}, "eval": {}}
    for record in read_metrics(workdir):
      if record.get("kind") in by_step:
        by_step[record["kind"]][record["step"]] = record
    train_steps, test_steps = sorted(by_step["train"]), sorted(by_step["eval"])
    curves[str(workdir)] = {
        "train_step": np.asarray(train_steps, np.int64),
        "train_error": np.asarray([_train_error(by_step["train"][s]) for s in train_steps]),
        "test_step": np.asarray(test_steps, np.int64),
        "test_error": np.asarray([by_step["eval"][s]["top1_error"] for s in test_steps]),
    }
  return curves


def _train_error(record: dict) -> float:
  return record["top1_error"] if "top1_error" in record else 100 * record["train_error"]
