"""Faults injected into training: kills, preemption, damage, NaNs, full disks, bad input.

RELIABILITY.md lists every fault with the test that injects it. Trainer processes run through
tests/processes.py; faults inside them come from tests/faulty_trainer.py, never from the package.
"""
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

import processes
from configs import cifar_resnet20
from resnet_jax.training import checkpoints, optim, loop
from resnet_jax import data

REPO = processes.REPO


def trainer_args(num_train_steps: int) -> list[str]:
  """ResNet-8, checkpoints every 4 steps and evaluations every 6; one compiled program for all."""
  return ["--config=configs/cifar_resnet20.py:smoke", "--config.model=cifar_resnet8",
          f"--config.num_train_steps={num_train_steps}", "--config.lr_boundaries=(3,)",
          "--config.log_every_steps=2", "--config.eval_every_steps=6",
          "--config.checkpoint_every_steps=4"]


ARGS = trainer_args(12)


def smoke_config(**overrides):
  config = cifar_resnet20.get_config("smoke")
  config.model = "cifar_resnet8"
  config.update(overrides)
  return config


def assert_bitwise_equal(tree_a, tree_b):
  leaves_a, leaves_b = jax.tree.leaves(tree_a), jax.tree.leaves(tree_b)
  assert len(leaves_a) == len(leaves_b) > 50
  for a, b in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_kill_9_anywhere_resumes_from_the_newest_complete_checkpoint_bitwise(
    tmp_path, compilation_cache):
  (reference,) = processes.train(tmp_path / "reference", ARGS, **compilation_cache)
  assert reference.returncode == 0, reference.stderr[-3000:]
  workdir = tmp_path / "faulty"
  killed = False
  # One workdir through every fault in turn, each run restarted with the same command.
  for fault, status in [("compile", -signal.SIGKILL), ("step:6", -signal.SIGKILL),
                        ("commit:8", -signal.SIGKILL), ("committed:8", -signal.SIGKILL),
                        ("sigterm:9", loop.PREEMPTED_EXIT_CODE), ("restore", -signal.SIGKILL),
                        ("eval", -signal.SIGKILL), (None, 0)]:
    newest = processes.newest_checkpoint(workdir)
    (run,) = processes.train(workdir, ARGS, faults={0: fault} if fault else None,
                             **compilation_cache)
    assert run.returncode == status, (fault, run.stderr[-3000:])
    if fault:
      assert f"fault: {fault}" in run.stderr
    # A killed run leaves its claim on the workdir, which the next run takes over.
    assert (f"Took over workdir {workdir} from process" in run.stderr) == killed, fault
    assert (workdir / "claim").exists() == (status == -signal.SIGKILL), fault
    killed = status == -signal.SIGKILL
    if newest is None:
      assert "restore: no checkpoint in" in run.stderr, fault
    else:  # "restore" dies while resuming, before it can say so.
      resumed = f"restore: resumed at step {newest} of" in run.stderr
      assert resumed == (fault != "restore"), (fault, newest)
    if fault == "commit:8":  # Killed mid-write: the files exist, but not as a checkpoint.
      assert processes.newest_checkpoint(workdir) == 4
      assert [p.name for p in (workdir / "checkpoints").iterdir() if p.name.startswith("8.")]
    if fault == "committed:8":
      assert processes.newest_checkpoint(workdir) == 8
    if fault == "sigterm:9":  # Preempted: a checkpoint at the step the notice came.
      assert "Preempted: saved step 9" in run.stderr
      assert processes.newest_checkpoint(workdir) == 9
  assert_bitwise_equal(processes.checkpointed_state(workdir, 12),
                       processes.checkpointed_state(tmp_path / "reference", 12))
  summaries = [(path / "summary.json").read_text() for path in (workdir, tmp_path / "reference")]
  assert summaries[0] == summaries[1]


@pytest.mark.slow
def test_two_runs_with_the_same_seed_are_bitwise_identical(tmp_path, compilation_cache):
  for name in ("a", "b"):
    (run,) = processes.train(tmp_path / name, trainer_args(4), **compilation_cache)
    assert run.returncode == 0, run.stderr[-3000:]
  assert_bitwise_equal(processes.checkpointed_state(tmp_path / "a", 4),
                       processes.checkpointed_state(tmp_path / "b", 4))
  summaries = [(tmp_path / name / "summary.json").read_text() for name in ("a", "b")]
  assert summaries[0] == summaries[1]


def _damage(kind: str, step_dir) -> None:
  files = sorted(path for path in (step_dir / "state").rglob("*") if path.is_file())
  if kind == "truncated":  # the largest file, the array data, cut in half
    largest = max(files, key=lambda path: path.stat().st_size)
    os.truncate(largest, largest.stat().st_size // 2)
  elif kind == "flipped":  # bytes of the largest file, the array data, inverted in place
    largest = max(files, key=lambda path: path.stat().st_size)
    data = bytearray(largest.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4] = bytes(255 - byte for byte in data[middle:middle + 4])
    largest.write_bytes(bytes(data))
  elif kind == "deleted":  # the array data
    shutil.rmtree(step_dir / "state" / "ocdbt.process_0")
    shutil.rmtree(step_dir / "state" / "d")
  else:
    for path in files:
      path.write_bytes(b"garbage")


def _checkpointed_workdir(workdir, steps):
  """A workdir with a checkpoint of an untrained state at each of `steps` (no training)."""
  config = smoke_config()
  state = loop.create_train_state(loop.create_model(config, 10, 0, "cpu"),
                                  optim.create(config))
  manager = checkpoints.Manager(epath.Path(workdir), config, keep=3, num_classes=10)
  for step in steps:
    manager.save(step, state.replace(step=jnp.asarray(step, jnp.int32)), None, None)
  manager.wait()
  return config, state


# Orbax leaves the reads it abandoned on a truncated file to fail again when collected.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("kind", ["truncated", "deleted", "garbage", "flipped", "nonfinite"])
def test_damaged_newest_checkpoint_is_reported_in_one_line_and_skipped(tmp_path, caplog, kind):
  config, state = _checkpointed_workdir(tmp_path, (2,) if kind == "nonfinite" else (2, 4))
  if kind == "nonfinite":  # Saved with the checksums of its NaN weights (as no trainer would).
    manager = checkpoints.Manager(epath.Path(tmp_path), config, keep=3, num_classes=10)
    nan_params = jax.tree.map(lambda leaf: jnp.full_like(leaf, jnp.nan), state.params)
    manager.save(4, state.replace(step=jnp.asarray(4, jnp.int32), params=nan_params), None, None)
    manager.wait()
  else:
    _damage(kind, tmp_path / "checkpoints" / "4")
  manager = checkpoints.Manager(epath.Path(tmp_path), config, keep=3, num_classes=10)
  with caplog.at_level("INFO"):
    restored, _ = manager.restore_latest(state)
  assert int(restored.step) == 2
  reports = [r.getMessage() for r in caplog.records
             if r.getMessage().startswith("Checkpoint at step")]
  assert len(reports) == 1 and "\n" not in reports[0], reports
  expected = {"flipped": "is damaged (1 arrays differ from their saved checksums (",
              "nonfinite": "is damaged (non-finite weights in "}.get(kind, "is unreadable (")
  assert reports[0].startswith(f"Checkpoint at step 4 {expected}"), reports[0]
  names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
  assert names[0] == "2" and names[1].startswith("4.unreadable-") and len(names) == 2


def test_no_readable_checkpoint_is_an_error_that_a_rerun_repeats(tmp_path):
  config, state = _checkpointed_workdir(tmp_path, (2, 4))
  for step in (2, 4):
    _damage("garbage", tmp_path / "checkpoints" / str(step))
  for _ in range(2):  # Never "no checkpoints, start from scratch" on the second try.
    manager = checkpoints.Manager(epath.Path(tmp_path), config, keep=3, num_classes=10)
    with pytest.raises(ValueError, match=r"none of the checkpoints \[4, 2\] .* is readable"):
      manager.restore_latest(state)
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "4"]


def test_checkpoint_of_another_config_is_refused(tmp_path):
  _checkpointed_workdir(tmp_path, (2,))  # 10 classes
  config = smoke_config()
  config.dataset.num_classes = 5
  with pytest.raises(loop.StartupError, match="different run"):
    loop.train_and_evaluate(config, str(tmp_path))


def test_nan_in_a_batch_stops_at_that_step_and_never_saves_it(tmp_path, monkeypatch):
  train_batch = data.OnDeviceDataset.train_batch

  def poisoned(self, step, batch_size):  # step counts updates done: 2 is the third step
    batch = train_batch(self, step, batch_size)
    return batch.replace(images=jnp.where(step == 2, jnp.nan, batch.images))

  monkeypatch.setattr(data.OnDeviceDataset, "train_batch", poisoned)
  # Checkpoints at 2, 4 and 6; the first check after step 3 is the save of step 4.
  config = smoke_config(num_train_steps=6, lr_boundaries=(5,), log_every_steps=6,
                        eval_every_steps=2, checkpoint_every_steps=2)
  with pytest.raises(loop.NonFiniteError, match=r"non-finite loss, gradient or weights at step 3;"):
    loop.train_and_evaluate(config, str(tmp_path))
  manager = ocp.CheckpointManager(tmp_path / "checkpoints")
  assert manager.all_steps() == [2]  # the only checkpoint, and so the only best one
  state = processes.checkpointed_state(tmp_path, 2)
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(state)
             if np.issubdtype(leaf.dtype, np.floating))


def _in_namespace(script: str, env: dict[str, str]) -> subprocess.CompletedProcess:
  """Runs a shell script as root of its own mount namespace, where it can mount a tmpfs."""
  return subprocess.run(["unshare", "--map-root-user", "--mount", "sh", "-c", script], cwd=REPO,
                        env=processes.environment(8, **env), capture_output=True, text=True,
                        timeout=300)


def _trainer(workdir: str, args: list[str] = ARGS, fault: str | None = None) -> str:
  head = [sys.executable, processes.FAULTY_TRAINER, fault] if fault else [
      sys.executable, "-m", "resnet_jax.main"]
  return shlex.join([*head, *args, f"--workdir={workdir}"])


def test_read_only_workdir_fails_at_start_up(tmp_path, compilation_cache):
  completed = _in_namespace(
      f"mount -t tmpfs tmpfs {tmp_path} && mkdir {tmp_path}/w && mount -o remount,ro {tmp_path} "
      f"&& exec {_trainer(f'{tmp_path}/w')}", compilation_cache)
  assert completed.returncode == 2, completed.stderr[-3000:]
  assert f"error: workdir {tmp_path}/w is not writable (Read-only file system)" in completed.stderr
  assert "Traceback" not in completed.stderr


def test_full_workdir_fails_at_start_up(tmp_path, compilation_cache):
  # 300 kB: less than one checkpoint of ResNet-8 (0.6 MiB).
  completed = _in_namespace(f"mount -t tmpfs -o size=300k tmpfs {tmp_path} && exec "
                            f"{_trainer(f'{tmp_path}/w')}", compilation_cache)
  assert completed.returncode == 2, completed.stderr[-3000:]
  assert f"error: workdir {tmp_path}/w has 0.3 MiB free, but one checkpoint" in completed.stderr
  assert "Traceback" not in completed.stderr


@pytest.mark.slow
def test_disk_full_mid_run_is_one_error_and_leaves_no_checkpoint_to_resume(
    tmp_path, compilation_cache):
  # Four steps: the last one's checkpoint, written in the background, is the first to fail.
  args, workdir = trainer_args(4), f"{tmp_path}/w"
  completed = _in_namespace(
      f"mount -t tmpfs -o size=2m tmpfs {tmp_path} || exit 9\n"
      f"{_trainer(workdir, args, fault='fill:3')}\n"
      "echo exit status $? >&2\n"
      f"ls {workdir}/checkpoints >&2\n"
      f"rm {workdir}.fill\n"
      f"exec {_trainer(workdir, args, fault='compile')}", compilation_cache)
  first, restart = completed.stderr.split("exit status ")
  assert "fault: fill:3" in first
  errors = [line for line in first.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "could not write a checkpoint" in errors[0], (
      [line for line in first.splitlines() if "error" in line.lower()][-20:], first[-3000:])
  assert "No space left on device" in errors[0]
  status, listing = restart.split("\n", 2)[:2]
  assert status == "1" and listing == "4.orbax-checkpoint-tmp"  # no step 4 to resume from
  assert "restore: no checkpoint in" in restart and "restore: resumed" not in restart


BAD_CONFIG = "import ml_collections\ndef get_config(:\n"
CONFIG, WORKDIR = "--config=configs/cifar_resnet20.py:smoke", "--workdir={tmp}/w"
# (command line, the start of its one error line)
BAD_COMMAND_LINES = [
    ([CONFIG, WORKDIR, "--config.bogus=1"], "--config.bogus: the config has no field 'bogus'"),
    ([CONFIG, WORKDIR, "--config.dataset.colour=1"], "--config.dataset.colour: the config has no"),
    ([CONFIG, WORKDIR, "--config.batchsize=3"],
     "--config.batchsize: the config has no field 'batchsize'; did you mean --config.batch_size?"),
    ([CONFIG, WORKDIR, "--config.seed.x=1"], "--config.seed.x: the config's field 'seed' holds 0,"),
    ([CONFIG, WORKDIR, "--config.batch_size=abc"], "flag --config.batch_size=abc: invalid literal"),
    (["--config=configs/cifar_resnet20.py:bogus", WORKDIR],
     "--config=configs/cifar_resnet20.py:bogus: unknown config argument 'bogus'; valid: smoke"),
    (["--config=configs/no_such_config.py", WORKDIR],
     "--config=configs/no_such_config.py: no such file"),
    (["--config={tmp}/broken.py", WORKDIR],
     "--config={tmp}/broken.py: invalid syntax (broken.py, line 2)"),
    ([WORKDIR], "--config is missing; pass a config's name, e.g. --config=cifar_resnet20"),
    ([CONFIG], "--workdir is missing or empty"),
    ([CONFIG, "--workdir="], "--workdir is missing or empty"),
    ([CONFIG, WORKDIR, "extra"], "unexpected arguments: extra"),
    ([CONFIG, WORKDIR, "--epochs=3"], "Unknown command line flag 'epochs'"),
    ([CONFIG, WORKDIR, "--config.learning_rate=-0.1"], "learning_rate must be positive, got -0.1"),
    ([CONFIG, WORKDIR, "--config.learning_rate=nan"], "learning_rate must be a finite number, got nan"),
    ([CONFIG, WORKDIR, "--config.weight_decay=inf"], "weight_decay must be a finite number, got inf"),
    ([CONFIG, WORKDIR, "--config.momentum=1.5"], "momentum must be in [0, 1), got 1.5"),
    ([CONFIG, WORKDIR, "--config.weight_decay=-1"], "weight_decay must be non-negative"),
    ([CONFIG, WORKDIR, "--config.batch_size=20"], "batch_size 20 does not divide across 8 devices"),
    ([CONFIG, WORKDIR, "--config.num_train_steps=0"], "num_train_steps must be positive"),
    ([CONFIG, WORKDIR, "--config.lr_boundaries=(15,10)"], "lr_boundaries must be positive and"),
    ([CONFIG, WORKDIR, "--config.lr_boundaries=(10,30)"], "the schedule ends before it starts"),
    ([CONFIG, WORKDIR, "--config.model=resnet7"], "Unknown model 'resnet7'"),
    ([CONFIG, WORKDIR, "--config.model_overrides.shortcut=Z"], "Unknown shortcut option 'Z'"),
    ([CONFIG, WORKDIR, "--config.dtype=float16"], "dtype must be 'float32' or 'bfloat16'"),
    ([CONFIG, WORKDIR, "--config.eval_protocol=5crop"], "unknown eval_protocol '5crop'"),
    ([CONFIG, WORKDIR, "--config.eval_protocol=10crop"], "eval_protocol '10crop' is not available for synthetic(32x32x3,10 classes)"),
    ([CONFIG, WORKDIR, "--config.keep_checkpoints=0"], "keep_checkpoints must be positive"),
    ([CONFIG, WORKDIR, "--config.dataset.name=mnist"], "unknown dataset name 'mnist'"),
    ([CONFIG, WORKDIR, "--config.dataset.name=cifar10", "--config.dataset.data_dir={tmp}/empty"],
     "TFDS dataset 'cifar10' is not prepared in {tmp}/empty"),
    ([CONFIG, WORKDIR, "--config.dataset.name=image_folder", "--config.dataset.data_dir={tmp}/no"],
     "image folder {tmp}/no does not exist"),
    ([CONFIG, "--workdir={tmp}/broken.py"],
     "workdir {tmp}/broken.py is a file, not a directory; pass a --workdir that is a directory"),
]


@pytest.mark.parametrize("args,message", BAD_COMMAND_LINES, ids=[
    " ".join(arg for arg in args if arg not in (CONFIG, WORKDIR))
    or ("no --workdir" if CONFIG in args else "no --config") for args, _ in BAD_COMMAND_LINES])
def test_bad_command_line_is_one_error_line_and_exit_status_2(tmp_path, args, message):
  (tmp_path / "broken.py").write_text(BAD_CONFIG)
  (tmp_path / "empty").mkdir()
  completed = subprocess.run(
      [sys.executable, "-m", "resnet_jax.main", *[arg.format(tmp=tmp_path) for arg in args]],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  errors = [line for line in completed.stderr.splitlines() if line.startswith("error: ")]
  assert completed.returncode == 2 and len(errors) == 1, completed.stderr[-3000:]
  assert errors[0].startswith(f"error: {message.format(tmp=tmp_path)}"), errors[0]
  assert "Traceback" not in completed.stderr
  assert not (tmp_path / "w").exists()  # Nothing written: a workdir made at start-up is removed.
  assert os.listdir(tmp_path / "empty") == []  # TFDS was never asked to download


def test_orbax_info_lines_are_filtered_but_its_warnings_kept():
  record = lambda level, path: logging.LogRecord("absl", level, path, 1, "message", (), None)
  orbax = "/site-packages/orbax/checkpoint/checkpoint_manager.py"
  keep = checkpoints.quiet_orbax_info
  assert not keep(record(logging.INFO, orbax))
  assert keep(record(logging.WARNING, orbax)) and keep(record(logging.ERROR, orbax))
  assert keep(record(logging.INFO, "/work/resnet_jax/loop.py"))
