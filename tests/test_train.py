"""The training loop: resume equality, preemption, start-up errors, one compilation, real data."""
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jax.sharding import NamedSharding, PartitionSpec
from tensorboardX.proto import event_pb2

from configs import cifar_resnet20
from resnet_jax.training import checkpoints, optim, loop
from resnet_jax import data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_config(**overrides):
  config = cifar_resnet20.get_config("smoke")
  config.model = "cifar_resnet8"
  config.update(overrides)
  return config


def first_batch(config) -> np.ndarray:
  """The images of the first training batch the trainer would draw for `config`."""
  config.dataset.update(synthetic_train_size=64, synthetic_eval_size=8)
  dataset = data.create(loop.dataset_config(config), data.core.make_mesh())
  return np.asarray(dataset.train_batch(jnp.zeros((), jnp.int32), config.batch_size).images)


def test_the_run_seed_sets_initialisation_and_data_and_dataset_seed_sets_data_alone():
  run_seed_1 = smoke_config(seed=1)
  data_alone, init_alone = smoke_config(), smoke_config(seed=1)
  data_alone.dataset.seed, init_alone.dataset.seed = 1, 0
  batches = {name: first_batch(config) for name, config in [
      ("seed 0", smoke_config()), ("seed 1", run_seed_1), ("data alone", data_alone),
      ("init alone", init_alone)]}
  assert not np.array_equal(batches["seed 0"], batches["seed 1"])
  np.testing.assert_array_equal(batches["data alone"], batches["seed 1"])
  np.testing.assert_array_equal(batches["init alone"], batches["seed 0"])
  kernel = lambda config: np.asarray(
      loop.create_model(config, 10, config.seed, "cpu").stem_conv.kernel[...])
  assert not np.array_equal(kernel(smoke_config()), kernel(init_alone))
  np.testing.assert_array_equal(kernel(smoke_config()), kernel(data_alone))


def final_state(workdir):
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                  item_names=("state", "data", "identity", "checksums"))
  step = manager.latest_step()
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return step, restored.state


def test_stop_and_resume_gives_bitwise_the_same_parameters(tmp_path, monkeypatch):
  assert jax.device_count() == 8
  config = smoke_config(num_train_steps=8, lr_boundaries=(4, 6), log_every_steps=2,
                        eval_every_steps=4, checkpoint_every_steps=4)
  result = loop.train_and_evaluate(config, str(tmp_path / "straight"))

  # Preempted after step 3 (between checkpoints), then resumed with the same command.
  monkeypatch.setattr(loop._Preemption, "reached", lambda self, step: step == 3)
  with pytest.raises(SystemExit) as exit_info:
    loop.train_and_evaluate(config, str(tmp_path / "stopped"))
  assert exit_info.value.code == loop.PREEMPTED_EXIT_CODE
  assert final_state(str(tmp_path / "stopped"))[0] == 3
  monkeypatch.undo()
  resumed = loop.train_and_evaluate(config, str(tmp_path / "stopped"))

  step_a, state_a = final_state(str(tmp_path / "straight"))
  step_b, state_b = final_state(str(tmp_path / "stopped"))
  assert step_a == step_b == 8
  leaves_a, leaves_b = jax.tree.leaves(state_a), jax.tree.leaves(state_b)
  assert len(leaves_a) == len(leaves_b) > 50
  for a, b in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(a, b)
  assert resumed["top1_error"] == result["top1_error"]


def test_streaming_run_resumes_bitwise_from_its_data_state(tmp_path, monkeypatch):
  # Synthetic images larger than 64 pixels stream from a host iterator whose step is saved.
  config = smoke_config(num_train_steps=4, lr_boundaries=(3,), log_every_steps=2,
                        eval_every_steps=4, checkpoint_every_steps=4, batch_size=16)
  config.dataset.image_size, config.dataset.synthetic_train_size = 72, 64
  config.dataset.synthetic_eval_size = 16
  result = loop.train_and_evaluate(config, str(tmp_path / "straight"))
  assert result["examples"] == 16

  monkeypatch.setattr(loop._Preemption, "reached", lambda self, step: step == 1)
  with pytest.raises(SystemExit):
    loop.train_and_evaluate(config, str(tmp_path / "stopped"))
  manager = ocp.CheckpointManager(str(tmp_path / "stopped" / "checkpoints"))
  assert manager.restore(1, args=ocp.args.Composite(data=ocp.args.JsonRestore())).data == {"step": 1}
  monkeypatch.undo()
  resumed = loop.train_and_evaluate(config, str(tmp_path / "stopped"))

  (step_a, state_a), (step_b, state_b) = final_state(str(tmp_path / "straight")), final_state(str(tmp_path / "stopped"))
  assert step_a == step_b == 4
  for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b), strict=True):
    np.testing.assert_array_equal(a, b)
  assert resumed["loss"] == result["loss"]


def event_files(workdir) -> list[list[event_pb2.Event]]:
  """The events of each TensorBoard file of `workdir`, files in the order they were written."""
  files = []
  for path in sorted(workdir.glob("events.out.tfevents.*")):  # Named by their creation time.
    data, offset, events = path.read_bytes(), 0, []
    while offset < len(data):  # TFRecords: length (8 bytes), its CRC (4), data, its CRC (4).
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      events.append(event_pb2.Event.FromString(data[offset + 12:offset + 12 + length]))
      offset += 16 + length
    files.append(events)
  return files


def shown_by_tensorboard(files) -> list[tuple[str, int]]:
  """(tag, step) of each summary TensorBoard shows: a session START at step s hides every
  earlier event at step s or later (its `purge_step`)."""
  shown = []
  for event in (event for events in files for event in events):
    if event.session_log.status == event_pb2.SessionLog.START:
      shown = [(tag, step) for tag, step in shown if step < event.step]
    shown += [(value.tag, event.step) for value in event.summary.value]
  return shown


def test_run_writes_metrics_tensorboard_and_summary(tmp_path):
  config = smoke_config(num_train_steps=4, lr_boundaries=(2,), log_every_steps=2,
                        eval_every_steps=2, checkpoint_every_steps=2)
  loop.train_and_evaluate(config, str(tmp_path))
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  kinds = [(r["step"], r["kind"]) for r in records]
  assert kinds == [(2, "train"), (2, "eval"), (4, "train"), (4, "eval"), (4, "run")]
  records.pop()  # The command's run record, checked by the tests of progress below.
  assert records[0]["learning_rate"] == pytest.approx(0.1)
  assert records[2]["learning_rate"] == pytest.approx(0.01)
  assert records[1]["examples"] == 200  # every synthetic eval example, once
  # Errors in percent for training as for evaluation: about 90% at chance on 10 classes.
  for record in records:
    assert 50 <= record["top1_error"] <= 100 and record["top5_error"] <= record["top1_error"]
  assert all(r["grad_norm"] > 0 and r["param_norm"] > 1 for r in records if r["kind"] == "train")
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["model"] == "cifar_resnet8" and summary["num_params"] == 75_290  # ResNet-20 less 2 x 97,216
  assert "synthetic" in summary["dataset"]
  (events,) = event_files(tmp_path)
  tags = {value.tag: value for event in events for value in event.summary.value}
  assert {"train/top1_error", "train/top5_error", "train/grad_norm", "train/param_norm",
          "train/loss", "train/learning_rate", "eval/top1_error"} <= tags.keys()
  config_text = tags["config/text_summary"].tensor.string_val[0].decode()
  assert '      "model": "cifar_resnet8",' in config_text.splitlines()  # JSON in a code block


def test_a_resumed_run_hides_in_tensorboard_the_steps_it_logs_again(tmp_path):
  config = smoke_config(num_train_steps=4, lr_boundaries=(2,), log_every_steps=2,
                        eval_every_steps=2, checkpoint_every_steps=2)
  loop.train_and_evaluate(config, str(tmp_path))
  shutil.rmtree(tmp_path / "checkpoints" / "4")  # As if stopped before saving step 4.
  loop.train_and_evaluate(config, str(tmp_path))  # Resumes at step 2, logs step 4 again.
  files = event_files(tmp_path)
  assert len(files) == 2
  logged = [(value.tag, event.step) for events in files for event in events
            for value in event.summary.value if value.tag == "train/loss"]
  assert logged == [("train/loss", 2), ("train/loss", 4), ("train/loss", 4)]
  shown = [key for key in shown_by_tensorboard(files) if key[0].startswith(("train/", "eval/"))]
  assert len(shown) == len(set(shown))
  assert [step for tag, step in shown if tag == "train/loss"] == [2, 4]


@pytest.mark.parametrize("overrides,message", [
    ({"model": "cifar_resnet9"}, "Unknown model 'cifar_resnet9'"),
    ({"batch_size": 12}, "does not divide across 8 devices"),
    ({"batch_norm_group": 24}, "batch_size 32 is not a whole number of batch norm groups of 24"),
    ({"lr_warmup_steps": 11}, "lr_warmup_steps=11 reaches past the first of lr_boundaries"),
    ({"num_train_steps": 12}, "ends before it starts"),
    ({"lr_schedule": "cosine"}, "unknown lr_schedule"),
    ({"eval_every_steps": 0}, "eval_every_steps must be positive"),
    ({"eval_protocol": "5crop"}, "unknown eval_protocol '5crop'"),
    ({"eval_protocol": "10crop"}, r"eval_protocol '10crop' is not available for synthetic\(32x32x3,10 "
                                  r"classes\), whose 32x32 images are evaluated by 'center'"),
])
def test_bad_configs_fail_at_start_up(tmp_path, overrides, message):
  with pytest.raises(loop.StartupError, match=message):
    loop.train_and_evaluate(smoke_config(**overrides), str(tmp_path))


@pytest.mark.parametrize("image_size", [32, 72])  # Held on the devices; streamed.
def test_batch_larger_than_the_training_set_fails_at_start_up(tmp_path, image_size):
  config = smoke_config()
  config.dataset.image_size, config.dataset.synthetic_train_size = image_size, 16
  with pytest.raises(loop.StartupError, match="^batch size 32 exceeds the 16 training examples"):
    loop.train_and_evaluate(config, str(tmp_path))


def test_unknown_dataset_and_unwritable_workdir_fail_at_start_up(tmp_path):
  config = smoke_config()
  config.dataset.name = "mnist"
  with pytest.raises(loop.StartupError, match="unknown dataset name 'mnist'"):
    loop.train_and_evaluate(config, str(tmp_path))
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  with pytest.raises(loop.StartupError, match="is not writable"):
    loop.train_and_evaluate(smoke_config(), str(blocker / "workdir"))


def test_a_run_stopped_at_start_up_leaves_no_workdir_it_made(tmp_path):
  missing = smoke_config()
  missing.dataset.update(name="image_folder", data_dir=str(tmp_path / "missing"))
  too_large = smoke_config()  # Fails once checkpoints/ is made.
  too_large.dataset.synthetic_train_size = 16
  for config, message in ((missing, "does not exist"), (too_large, "batch size 32 exceeds")):
    with pytest.raises(loop.StartupError, match=message):
      loop.train_and_evaluate(config, str(tmp_path / "new" / "run"))
    assert sorted(os.listdir(tmp_path)) == []
  # A workdir that was there is left as it was, empty folders and all.
  (tmp_path / "kept" / "notes").mkdir(parents=True)
  with pytest.raises(loop.StartupError, match="does not exist"):
    loop.train_and_evaluate(missing, str(tmp_path / "kept"))
  assert os.listdir(tmp_path / "kept") == ["notes"]


def test_checkpoint_of_another_model_is_refused(tmp_path):
  config = smoke_config(num_train_steps=2, lr_boundaries=(1,), checkpoint_every_steps=2,
                        eval_every_steps=2, log_every_steps=2)
  loop.train_and_evaluate(config, str(tmp_path))
  config.model = "cifar_plain8"
  with pytest.raises(loop.StartupError, match="different run"):
    loop.train_and_evaluate(config, str(tmp_path))


def test_main_reports_one_line_and_exit_status_2(tmp_path):
  completed = subprocess.run(
      [sys.executable, "-m", "resnet_jax.main", f"--config={REPO}/configs/cifar_resnet20.py:smoke",
       "--config.batch_size=12", f"--workdir={tmp_path}"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert completed.returncode == 2
  assert "error: batch_size 12 does not divide across 8 devices" in completed.stderr
  assert "Traceback" not in completed.stderr


def _preempt(workdir, fault, *overrides):
  """Runs the faulty trainer with `fault` (a SIGTERM); its stderr, and the seconds from the
  fault's announcement to the process's exit."""
  command = [sys.executable, os.path.join(REPO, "tests", "faulty_trainer.py"), fault,
             f"--config={REPO}/configs/cifar_resnet20.py:smoke", "--config.model=cifar_resnet8",
             "--config.num_train_steps=400", "--config.lr_boundaries=(200,)", *overrides,
             f"--workdir={workdir}"]
  # One device: jax runs ahead of it asynchronously there (on 8 simulated CPU devices it does not).
  process = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS=""))
  stderr, struck = [], None
  for line in process.stderr:
    stderr.append(line)
    if line.startswith("fault: "):
      struck = time.monotonic()
  process.wait(timeout=300)
  return process.returncode, "".join(stderr), time.monotonic() - struck


def test_sigterm_saves_within_two_steps_of_the_one_running_and_exits_75(tmp_path):
  # Logs, evaluations and checkpoints far apart: nothing but the bound on the steps queued ahead
  # keeps the host near the device (unbounded, it ran 32 steps ahead here).
  status, stderr, seconds = _preempt(tmp_path, "sigterm-running:5", "--config.log_every_steps=1000",
                                     "--config.eval_every_steps=1000",
                                     "--config.checkpoint_every_steps=1000")
  assert status == loop.PREEMPTED_EXIT_CODE, stderr[-2000:]
  step, _ = final_state(str(tmp_path))
  assert 5 <= step <= 5 + loop.MAX_STEPS_AHEAD + 1
  assert f"Preempted: saved step {step} " in stderr
  assert seconds < 10, seconds
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert records[-1] == {**records[-1], "kind": "run", "ended": "preempted", "step": step,
                         "steps": step}
  assert not (tmp_path / "claim").exists()


def test_sigterm_during_start_up_exits_75_with_a_line_and_releases_the_claim(tmp_path):
  status, stderr, _ = _preempt(tmp_path, "sigterm-startup")
  assert status == loop.PREEMPTED_EXIT_CODE, stderr[-2000:]
  assert "Preempted during start-up: nothing was trained or saved" in stderr
  assert "Traceback" not in stderr
  assert not (tmp_path / "claim").exists()
  assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").iterdir())


@pytest.mark.slow
def test_trains_on_real_cifar10_far_above_chance(cifar10_dir, tmp_path):
  # The command a user runs, on one CPU device (the other tests cover sharding).
  env = dict(os.environ, XLA_FLAGS="")
  completed = subprocess.run(
      [sys.executable, "-m", "resnet_jax.main", f"--config={REPO}/configs/cifar_resnet20.py",
       "--config.model=cifar_resnet8", "--config.dataset.name=image_folder",
       f"--config.dataset.data_dir={cifar10_dir}", "--config.batch_size=64",
       "--config.num_train_steps=400", "--config.lr_boundaries=(300,)",
       "--config.log_every_steps=100", "--config.eval_every_steps=400",
       "--config.checkpoint_every_steps=400", f"--workdir={tmp_path}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
  assert completed.returncode == 0, completed.stderr[-3000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  print("cifar_resnet8, 400 steps of 64 on the shared CIFAR-10:", summary)
  assert summary["examples"] == 10_000
  assert summary["top1_error"] < 60.0  # chance is 90%


@pytest.mark.slow
def test_multi_view_protocols_average_softmax_scores_over_every_example(tmp_path):
  from PIL import Image
  rng = np.random.default_rng(0)
  for split, count in [("train", 8), ("test", 12)]:
    for index in range(count):
      folder = tmp_path / split / f"class{index % 2}"
      folder.mkdir(parents=True, exist_ok=True)
      pixels = rng.integers(0, 256, (260 + 10 * index, 300, 3), np.uint8)
      Image.fromarray(pixels).save(folder / f"{index}.jpg")
  mesh = jax.make_mesh((8,), ("data",))
  dataset_config = data.default_config("image_folder")
  dataset_config.data_dir = str(tmp_path)
  dataset = data.create(dataset_config, mesh)
  config = smoke_config()
  model = loop.create_model(config, 2, 0, "cpu")
  state = jax.device_put(loop.create_train_state(model, optim.create(config)),
                         NamedSharding(mesh, PartitionSpec()))
  eval_fn = jax.jit(loop.eval_step)
  for protocol, num_views in [("center", 1), ("10crop", 10), ("multiscale", 5)]:
    batch = next(iter(dataset.eval_batches(8, protocol=protocol)))
    assert len(data.views(batch)) == num_views
    result = loop.evaluate(eval_fn, state, dataset.eval_batches(8, protocol=protocol))
    assert result["examples"] == 12, protocol
  # The 10-crop score is the mean of the views' softmax scores.
  batch = next(iter(dataset.eval_batches(8, protocol="10crop")))
  model.eval()
  scores = np.mean([jax.nn.softmax(model(view)) for view in data.views(batch)], axis=0)
  expected = loop.topk_errors(scores, batch.labels, batch.mask)
  got = eval_fn(state, batch)
  assert int(got["top1_errors"]) == int(expected["top1_errors"])
  assert int(got["count"]) == int(np.sum(batch.mask))


def test_divergence_stops_at_the_first_non_finite_step_and_saves_nothing_bad(tmp_path):
  config = smoke_config(num_train_steps=6, lr_boundaries=(4,), learning_rate=1e12,
                        log_every_steps=1, eval_every_steps=6, checkpoint_every_steps=1)
  with pytest.raises(loop.NonFiniteError, match=r"non-finite loss, gradient or weights at step \d+"):
    loop.train_and_evaluate(config, str(tmp_path))
  # Whatever was saved before the divergence is finite.
  if ocp.CheckpointManager(str(tmp_path / "checkpoints")).latest_step() is not None:
    _, state = final_state(str(tmp_path))
    floats = [leaf for leaf in jax.tree.leaves(state) if np.issubdtype(leaf.dtype, np.floating)]
    assert floats and all(np.all(np.isfinite(leaf)) for leaf in floats)


def test_uniform_nan_and_tied_scores_count_as_errors():
  scores = np.zeros((5, 10), np.float32)  # Row 0: uniform, every class tied.
  scores[1] = np.nan
  scores[2, [2, 5]] = 1.0  # The label ties another class for the top.
  scores[3, 3] = 1.0  # The label alone at the top: the only correct row.
  scores[4, 4], scores[4, 7] = 1.0, np.nan  # The label on top, but a NaN in the row.
  labels, mask = jnp.arange(5), jnp.ones(5, bool)
  errors = loop.topk_errors(jnp.asarray(scores), labels, mask)
  assert (int(errors["top1_errors"]), int(errors["top5_errors"])) == (4, 3)
  # Averaged over views (10-crop, multi-scale), one NaN view makes the mean NaN: an error too.
  views = np.stack([scores[3:4], np.full((1, 10), np.nan, np.float32)])
  errors = loop.topk_errors(jnp.asarray(views.mean(axis=0)), labels[3:4], mask[:1])
  assert int(errors["top1_errors"]) == 1


def test_non_finite_scores_are_never_scored():
  config = smoke_config()
  mesh = data.core.make_mesh()
  dataset = data.create(loop.dataset_config(config), mesh)
  state = jax.device_put(
      loop.create_train_state(loop.create_model(config, 10, 0, "cpu"),
                              optim.create(config)), NamedSharding(mesh, PartitionSpec()))
  nan_state = state.replace(params=jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), state.params))
  with pytest.raises(loop.NonFiniteError,
                     match="scores are not finite for 200 of the 200 evaluation images at step 0"):
    loop.evaluate(loop.jit_eval_step(mesh), nan_state,
                   dataset.eval_batches(config.eval_batch_size, config.eval_protocol))
  # Weights without a run (`evaluate --weights`): no step to name, their preprocessing suspect.
  weights = loop.Weights(params=nan_state.params, batch_stats=nan_state.batch_stats,
                         graphdef=nan_state.graphdef)
  with pytest.raises(loop.NonFiniteError, match=re.escape(
      "scores are not finite for 200 of the 200 evaluation images; check the weights and their "
      "preprocessing, or use float32")):
    loop.evaluate(loop.jit_eval_step(mesh, lambda pixels: pixels - 127.5), weights,
                  dataset.eval_batches(config.eval_batch_size, config.eval_protocol))


def test_a_step_that_makes_weights_non_finite_is_never_evaluated_or_saved(tmp_path):
  # The learning rate overflows the first update's weights while its loss and gradient are finite.
  config = smoke_config(learning_rate=1e38, log_every_steps=1, eval_every_steps=1,
                        checkpoint_every_steps=1)
  with pytest.raises(loop.NonFiniteError, match="non-finite loss, gradient or weights at step 1;"):
    loop.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").iterdir())
  assert not (tmp_path / "metrics.jsonl").exists()  # Not even the step's training metrics.


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
  config = smoke_config(num_train_steps=4, lr_boundaries=(3,), log_every_steps=2,
                        eval_every_steps=4, checkpoint_every_steps=2)
  loop.train_and_evaluate(config, str(tmp_path))
  newest = tmp_path / "checkpoints" / "4" / "state"
  for path in newest.rglob("*"):
    if path.is_file():
      path.write_bytes(b"garbage")
  config.num_train_steps = 6
  config.lr_boundaries = (5,)
  with caplog.at_level("INFO"):
    result = loop.train_and_evaluate(config, str(tmp_path))
  messages = [r.getMessage() for r in caplog.records]
  assert any("Checkpoint at step 4 is unreadable" in m for m in messages), messages
  assert any("restore: resumed at step 2 of" in m for m in messages), messages
  assert result["examples"] == 200 and final_state(str(tmp_path))[0] == 6
  assert list((tmp_path / "checkpoints").glob("4.unreadable-*"))  # kept for inspection


# What a run tells its user: start-up phases, honest throughput, the closing line, resume
# messages.
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
  monkeypatch.setattr(loop, "_compile", slowed(loop._compile))
  monkeypatch.setattr(loop, "evaluate", slowed(loop.evaluate))
  monkeypatch.setattr(checkpoints.Manager, "save", slowed(checkpoints.Manager.save))
  config = smoke_config(num_train_steps=6, lr_boundaries=(4,), log_every_steps=1,
                        eval_every_steps=2, checkpoint_every_steps=3)
  loop.train_and_evaluate(config, str(tmp_path))

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
  result = loop.train_and_evaluate(config, str(tmp_path))

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
  loop.train_and_evaluate(config, str(tmp_path))
  assert f"restore: no checkpoint in {tmp_path / 'checkpoints'}; training from step 0" in console(caplog)

  caplog.clear()
  config.num_train_steps = 4
  loop.train_and_evaluate(config, str(tmp_path))
  (restore,) = [line for line in console(caplog) if line.startswith("restore:")]
  assert restore.startswith(f"restore: resumed at step 2 of 4 from {tmp_path / 'checkpoints' / '2'}")
  assert console(caplog)[-1].startswith("done: 4 steps, 2 in this run")
  # orbax's step metadata is found where it is: no "Metadata file does not exist" warning.
  assert not [record for record in caplog.records if "_CHECKPOINT_METADATA" in record.getMessage()]

  caplog.clear()
  logged = (tmp_path / "metrics.jsonl").read_text()
  rerun = loop.train_and_evaluate(config, str(tmp_path))
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


def test_warm_up_ends_at_the_iteration_its_window_says_and_the_run_reports_it(tmp_path, caplog):
  caplog.set_level(logging.INFO)
  # An error threshold every batch meets: the warm-up ends once the 3-batch window is full.
  config = smoke_config(num_train_steps=6, lr_boundaries=(), log_every_steps=1,
                        eval_every_steps=6, checkpoint_every_steps=6, warmup_learning_rate=0.01,
                        warmup_window=3, warmup_until_train_error=1.01)
  loop.train_and_evaluate(config, str(tmp_path))
  rates = [record["learning_rate"] for record in records(tmp_path, "train")]
  assert rates == pytest.approx([0.01] * 3 + [0.1] * 3)
  (end,) = records(tmp_path, "warmup_end")
  first_errors = [record["top1_error"] for record in records(tmp_path, "train")[:3]]
  assert end["step"] == 3 and end["top1_error"] == pytest.approx(sum(first_errors) / 3, abs=1e-4)
  assert [line for line in console(caplog) if line.startswith("warm-up:")] == [
      f"warm-up: over after iteration 3, the mean training error of the last 3 iterations being "
      f"{end['top1_error']:.2f}% (below 101%); the schedule's learning rate from iteration 4"]


# Compiles a CPU step whose convolution runs on oneDNN (the trainer's CPU options) through the
# trainer's `_compile`, with jax's persistent compilation cache in the folder argv[1], after
# another program that the cache stores; prints whether this jaxlib can serialise the step.
_COMPILE_A_ONEDNN_STEP = """
import logging, sys
import jax, jax.numpy as jnp
from jax import lax
from jax.experimental import serialize_executable
jax.config.update("jax_compilation_cache_dir", sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
from resnet_jax.models import cpu_kernels
from resnet_jax.training import loop
logging.getLogger("absl").setLevel(logging.INFO)
jax.jit(lambda x: x + 1).lower(jnp.ones(3)).compile()  # Not the step, but in the cache.
step = jax.jit(lambda x, w: lax.conv_general_dilated(
    x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")).sum(),
               compiler_options=cpu_kernels.compiler_options("cpu"))
compiled, _ = loop._compile(step, jnp.ones((2, 8, 8, 16)), jnp.ones((3, 3, 16, 16)))
try:
  serialize_executable.serialize(compiled)
  print("storable")
except Exception:
  print("unstorable")
"""


def test_the_compile_line_never_says_loaded_of_a_step_this_jaxlib_cannot_store(tmp_path):
  def compile_line():
    run = subprocess.run([sys.executable, "-c", _COMPILE_A_ONEDNN_STEP, str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=REPO,
                         env=dict(os.environ, PYTHONPATH=REPO))
    assert run.returncode == 0, run.stderr[-3000:]
    (line,) = [line for line in run.stderr.splitlines() if "compile: train step in" in line]
    return run.stdout.split()[-1], line

  first, second = compile_line(), compile_line()
  assert first[0] == second[0]
  if first[0] == "storable":  # jaxlib 0.10.2, 0.12.1
    assert first[1].endswith(f"(compiled, and stored in the persistent compilation cache {tmp_path})")
    assert second[1].endswith(f"(loaded from the persistent compilation cache {tmp_path})")
  else:  # jaxlib 0.12.0.1, whose oneDNN calls do not serialise
    for _, line in (first, second):
      assert "(compiled; this jaxlib cannot store it in the persistent compilation cache (" in line
