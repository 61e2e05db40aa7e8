"""What a run tells its user: start-up phases, honest throughput, the closing line, resume
messages, and the persistent compilation cache that spares a resumed run its compile."""
import json
import logging
import re
import time

import pytest

import processes
from resnet_jax import checkpoints, train
from test_cli import SMOKE, trainer
from test_train import smoke_config

PAUSE = 2.0  # Seconds each slowed-down part of the run takes on top of its own work.


def records(workdir, kind):
  return [record for record in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
          if record["kind"] == kind]


def console(caplog) -> list[str]:
  """The lines the package logged (orbax logs through absl too)."""
  return [record.getMessage() for record in caplog.records
          if record.name == "absl" and "/resnet_jax/" in record.pathname]


def test_throughput_and_eta_exclude_compilation_evaluation_and_checkpoints(tmp_path, monkeypatch):
  # Each of the three takes PAUSE seconds more than it would; no training window may see them.
  def slowed(function):
    def slow(*args, **kwargs):
      time.sleep(PAUSE)
      return function(*args, **kwargs)
    return slow
  monkeypatch.setattr(train, "_compile", slowed(train._compile))
  monkeypatch.setattr(train, "evaluate", slowed(train.evaluate))
  monkeypatch.setattr(checkpoints.Manager, "save", slowed(checkpoints.Manager.save))
  config = smoke_config(num_train_steps=6, lr_boundaries=(4,), log_every_steps=1,
                        eval_every_steps=2, checkpoint_every_steps=3)
  train.train_and_evaluate(config, str(tmp_path))

  windows = [config.batch_size / record["images_per_second"] for record in records(tmp_path, "train")]
  assert len(windows) == 6 and max(windows) < PAUSE, windows
  (run,) = records(tmp_path, "run")
  assert run["steps"] == 6
  seconds = run["seconds"]
  assert seconds["evaluation"] >= 3 * PAUSE  # steps 2, 4, 6
  assert seconds["checkpoints"] >= 2 * PAUSE  # steps 3, 6
  assert seconds["training"] == pytest.approx(sum(windows), rel=1e-3)
  assert seconds["wall"] >= 6 * PAUSE + seconds["compile"] + seconds["training"]


def test_start_up_phases_then_the_closing_line_with_error_summary_and_best_checkpoint(
    tmp_path, caplog):
  caplog.set_level(logging.INFO)
  config = smoke_config(num_train_steps=4, lr_boundaries=(2,), log_every_steps=2,
                        eval_every_steps=2, checkpoint_every_steps=2)
  result = train.train_and_evaluate(config, str(tmp_path))

  lines = console(caplog)
  phases = [line.split(":", 1)[0] for line in lines if re.match(r"[a-z]+: ", line)]
  assert phases == ["run", "data", "model", "restore", "compile", "train", "done"], lines
  compile_line = next(line for line in lines if line.startswith("compile:"))
  assert re.fullmatch(r"compile: train step in \d+\.\d s \(no persistent compilation cache\)",
                      compile_line)
  done = lines[-1]
  assert done.startswith("done: 4 steps, 4 in this run, in ")
  assert f"final top-1 error {result['top1_error']:.2f}%" in done
  assert f"summary {tmp_path / 'summary.json'}" in done
  # The best of the evaluations at steps 2 and 4 is the kept checkpoint the line names.
  evaluations = {record["step"]: record["top1_error"] for record in records(tmp_path, "eval")}
  best = min(evaluations, key=lambda step: (evaluations[step], -step))
  assert done.endswith(f"best checkpoint {tmp_path / 'checkpoints' / str(best)}")
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["best_checkpoint_step"] == best
  assert summary["top1_error"] == result["top1_error"]
  (run,) = records(tmp_path, "run")
  compile_seconds = float(re.search(r"in (\d+\.\d) s", compile_line).group(1))
  assert run["steps"] == 4
  assert run["seconds"]["compile"] == pytest.approx(compile_seconds, abs=0.05)


def test_resume_and_rerun_of_a_finished_run_say_what_they_do(tmp_path, caplog):
  caplog.set_level(logging.INFO)
  config = smoke_config(num_train_steps=2, lr_boundaries=(1,), log_every_steps=1,
                        eval_every_steps=2, checkpoint_every_steps=2)
  train.train_and_evaluate(config, str(tmp_path))
  assert f"restore: no checkpoint in {tmp_path / 'checkpoints'}; training from step 0" in console(caplog)

  caplog.clear()
  config.num_train_steps = 4
  train.train_and_evaluate(config, str(tmp_path))
  (restore,) = [line for line in console(caplog) if line.startswith("restore:")]
  assert restore.startswith(f"restore: resumed at step 2 of 4 from {tmp_path / 'checkpoints' / '2'}")
  assert console(caplog)[-1].startswith("done: 4 steps, 2 in this run")

  caplog.clear()
  logged = (tmp_path / "metrics.jsonl").read_text()
  rerun = train.train_and_evaluate(config, str(tmp_path))
  lines = console(caplog)
  (restore,) = [line for line in lines if line.startswith("restore:")]
  assert restore.startswith("restore: the run finished already (step 4 of 4")
  assert restore.endswith("evaluating its final state again, nothing to train")
  assert not any(line.startswith(("compile:", "train:")) for line in lines)
  assert f"step 4  eval: top-1 error {rerun['top1_error']:.2f}%" in "\n".join(lines)
  assert lines[-1].startswith("done: 4 steps, 0 in this run")
  # The repeated evaluation is shown, not logged a second time: only the command's run record.
  (new,) = (tmp_path / "metrics.jsonl").read_text()[len(logged):].splitlines()
  assert json.loads(new)["kind"] == "run" and json.loads(new)["steps"] == 0


@pytest.mark.slow
def test_persistent_compilation_cache_in_the_workdir_serves_the_resumed_run(tmp_path):
  cache_settings = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  args = [SMOKE, "--config.model=cifar_resnet8", "--config.lr_boundaries=(1,)",
          "--config.eval_every_steps=4", "--config.checkpoint_every_steps=2"]
  workdir = tmp_path / "run"

  def compile_line(*more):
    run = trainer(tmp_path, *args, f"--workdir={workdir}", *more,
                  unset=("JAX_COMPILATION_CACHE_DIR",), **cache_settings)
    assert run.returncode == 0, run.stderr[-3000:]
    (line,) = [line for line in run.stderr.splitlines() if "] compile: " in line]
    return line.split("] ", 1)[1]

  cache = workdir / "compilation_cache"
  assert compile_line("--config.num_train_steps=2").endswith(
      f"(compiled, and stored in the persistent compilation cache {cache})")
  assert any(cache.iterdir())
  assert compile_line("--config.num_train_steps=4").endswith(
      f"(loaded from the persistent compilation cache {cache})")

  # Off with one flag: the resumed run compiles, and nothing is cached anywhere.
  cache_files = sorted(cache.iterdir())
  assert compile_line("--config.num_train_steps=6", "--compilation_cache=off").endswith(
      "(no persistent compilation cache)")
  assert sorted(cache.iterdir()) == cache_files

  # Elsewhere, e.g. one cache shared by a sweep's runs.
  shared = tmp_path / "shared_cache"
  assert compile_line("--config.num_train_steps=8", f"--compilation_cache={shared}").endswith(
      f"(compiled, and stored in the persistent compilation cache {shared})")
  assert any(shared.iterdir())
