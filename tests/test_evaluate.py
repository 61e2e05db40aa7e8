"""Evaluating a saved run (`python -m resnet_jax.training.evaluate`): which checkpoint, which protocol,
the numbers against the trainer's own, a run still training, and one line for each error."""
import calendar
import functools
import hashlib
import json
import logging
import re
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import processes
from configs import cifar_resnet20, cifar_resnet110
from resnet_jax.training import checkpoints, claim, evaluate, optim, loop, runs
from resnet_jax import data, models
from resnet_jax.data import decoding
from resnet_jax.models import cpu_kernels, pretrained


def smoke_config(**overrides):
  config = cifar_resnet20.get_config("smoke")
  config.model = "cifar_resnet8"
  config.update(overrides)
  return config


def evaluator(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
  """`python -m resnet_jax.training.evaluate ARGS`, or `python -c CODE ARGS` where CODE runs it."""
  head = ["-c", code] if code else ["-m", "resnet_jax.training.evaluate"]
  return subprocess.run([sys.executable, *head, *args], cwd=processes.REPO,
                        env=processes.environment(8), capture_output=True, text=True,
                        timeout=300)


def lines(text: str) -> list[str]:
  return [line for line in text.splitlines() if line.strip()]


def logged_evals(workdir) -> dict[int, dict]:
  records = map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
  return {record["step"]: record for record in records if record["kind"] == "eval"}


def tree(directory) -> dict[str, tuple[int, int]]:
  """Every file under `directory`: its size and modification time."""
  return {str(path.relative_to(directory)): (path.stat().st_size, path.stat().st_mtime_ns)
          for path in sorted(directory.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """A 20-step smoke run, evaluated and checkpointed at steps 10 and 20."""
  workdir = tmp_path_factory.mktemp("trained") / "run"
  loop.train_and_evaluate(smoke_config(), str(workdir))
  return workdir


def fabricated_run(workdir, errors: dict[int, float | None], keep: int):
  """config.json and, at each step, a checkpoint of the model initialised with the step as seed,
  saved with `errors[step]` as the top-1 error of its evaluation (None: saved without one)."""
  config = smoke_config()
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  manager = checkpoints.Manager(epath.Path(workdir), config, keep=keep, num_classes=10)
  for step, error in errors.items():
    manager.save(step, initial_state(config, step), None,
                 None if error is None else {"top1_error": error})
  manager.wait()
  return config, manager


def initial_state(config, seed: int) -> loop.TrainState:
  state = loop.create_train_state(loop.create_model(config, 10, seed, "cpu"),
                                  optim.create(config))
  return state.replace(step=jnp.asarray(seed, jnp.int32))


def test_latest_checkpoint_gives_the_trainers_final_evaluation(trained_run):
  path, record = evaluate.evaluate_run(trained_run, checkpoint="latest")
  summary = json.loads((trained_run / "summary.json").read_text())
  assert record["step"] == 20 and record["protocol"] == "center"
  assert (record["top1_error"], record["top5_error"], record["examples"]) == (
      summary["top1_error"], summary["top5_error"], 200)
  assert record["loss"] == pytest.approx(summary["loss"], rel=1e-6)
  assert path == epath.Path(trained_run) / "evaluations" / "20-center.json"


def test_a_given_step_gives_the_trainers_evaluation_at_that_step_and_its_json(trained_run):
  logged, final = logged_evals(trained_run)[10], logged_evals(trained_run)[20]
  assert logged["loss"] != pytest.approx(final["loss"], rel=1e-6)
  before = time.time()
  path, record = evaluate.evaluate_run(trained_run, checkpoint="10")
  written = json.loads(path.read_text())
  assert written == record
  assert sorted(written) == ["checkpoint", "dataset", "eval_batch_size", "eval_split", "examples",
                             "loss", "model", "protocol", "step", "top1_error", "top5_error",
                             "written"]
  assert {key: written[key] for key in ("step", "checkpoint", "protocol", "top1_error",
                                        "top5_error", "examples", "model", "dataset",
                                        "eval_split", "eval_batch_size")} == {
      "step": 10, "checkpoint": "10", "protocol": "center", "top1_error": logged["top1_error"],
      "top5_error": logged["top5_error"], "examples": 200, "model": "cifar_resnet8",
      "dataset": "synthetic(32x32x3,10 classes)", "eval_split": "test", "eval_batch_size": 64}
  assert written["loss"] == pytest.approx(logged["loss"], rel=1e-6)
  written_at = calendar.timegm(time.strptime(written["written"], "%Y-%m-%d %H:%M:%S UTC"))
  assert before - 1 <= written_at <= time.time() + 1
  # Another batch size evaluates the same examples to the same errors.
  _, halved = evaluate.evaluate_run(trained_run, checkpoint="10", batch_size=32)
  assert (halved["top1_error"], halved["examples"]) == (logged["top1_error"], 200)
  # Nothing else (the probe of the folder's writability) was left behind.
  assert all(re.fullmatch(r"(10|20)-center\.json", p.name)
             for p in (trained_run / "evaluations").iterdir())


def test_best_is_the_kept_step_of_lowest_logged_error_also_after_a_resume(tmp_path):
  workdir = tmp_path / "run"
  # keep=1: the latest (6) and the best (4) are kept.
  config, manager = fabricated_run(workdir, {2: 60.0, 4: 30.0, 6: 50.0}, keep=1)
  assert manager.steps() == [4, 6] and manager.best_step() == 4
  assert manager.directory == epath.Path(workdir) / "checkpoints"
  # A resumed run (a new manager) still knows step 4 as the best: it keeps it, and says so.
  resumed = checkpoints.Manager(epath.Path(workdir), config, keep=1, num_classes=10)
  assert resumed.best_step() == 4
  resumed.save(8, initial_state(config, 8), None, None)
  resumed.wait()
  assert resumed.steps() == [4, 8] and resumed.best_step() == 4
  assert checkpoints.Reader(epath.Path(workdir)).best_step() == 4

  _, best = evaluate.evaluate_run(workdir)
  _, latest = evaluate.evaluate_run(workdir, checkpoint="latest")
  assert (best["step"], best["checkpoint"], latest["step"]) == (4, "best", 8)
  # The numbers are those of the model saved at step 4, evaluated here directly.
  mesh = data.core.make_mesh()
  dataset = data.create(loop.dataset_config(config), mesh)
  direct = {seed: loop.evaluate(jax.jit(loop.eval_step), initial_state(config, seed),
                                 dataset.eval_batches(64, "center")) for seed in (4, 8)}
  assert best["top1_error"] == direct[4]["top1_error"]
  assert best["loss"] == pytest.approx(direct[4]["loss"], rel=1e-6)
  assert latest["loss"] == pytest.approx(direct[8]["loss"], rel=1e-6)
  assert direct[4]["loss"] != pytest.approx(direct[8]["loss"], rel=1e-6)


def test_evaluating_a_claimed_workdir_leaves_the_claim_and_checkpoints_untouched(trained_run):
  held = claim.acquire(epath.Path(trained_run))
  try:
    claim_before, checkpoints_before = (tree(trained_run / "claim"),
                                        tree(trained_run / "checkpoints"))
    completed = evaluator(f"--workdir={trained_run}", "--checkpoint=10")
    assert tree(trained_run / "claim") == claim_before
    assert tree(trained_run / "checkpoints") == checkpoints_before
  finally:
    held.release()
  assert completed.returncode == 0, completed.stderr[-3000:]
  logged = logged_evals(trained_run)[10]
  assert lines(completed.stdout) == [
      f"cifar_resnet8 step 10 (10) on synthetic(32x32x3,10 classes) test, center: top-1 error "
      f"{logged['top1_error']:.2f}%  top-5 error {logged['top5_error']:.2f}%  loss "
      f"{logged['loss']:.4f}  (200 examples); written to {trained_run}/evaluations/10-center.json"]
  assert "Traceback" not in completed.stderr and "WARNING" not in completed.stderr
  assert "_CHECKPOINT_METADATA" not in completed.stderr  # orbax's step metadata, where it is.


@pytest.mark.slow
def test_a_run_still_training_is_evaluated_without_disturbing_it(tmp_path, compilation_cache):
  workdir = tmp_path / "run"
  log = tmp_path / "trainer.log"
  with log.open("w") as stderr:
    trainer = subprocess.Popen(
        [sys.executable, processes.FAULTY_TRAINER, "hold:15",
         f"--config={processes.REPO}/configs/cifar_resnet20.py:smoke",
         "--config.model=cifar_resnet8", f"--workdir={workdir}"],
        cwd=processes.REPO, env=processes.environment(8, **compilation_cache),
        stdout=subprocess.DEVNULL, stderr=stderr)
  try:
    deadline = time.monotonic() + 300
    while "fault: hold:15" not in log.read_text():
      assert trainer.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
      time.sleep(0.5)
    holder = json.loads((workdir / "claim" / "holder.json").read_text())
    completed = evaluator(f"--workdir={workdir}")  # The best: step 10, the one evaluated.
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert json.loads((workdir / "claim" / "holder.json").read_text())["token"] == holder["token"]
    assert trainer.poll() is None
  finally:
    (tmp_path / "run.go").touch()
    assert trainer.wait(timeout=300) == 0, log.read_text()[-3000:]
  record = json.loads((workdir / "evaluations" / "10-center.json").read_text())
  assert (record["step"], record["checkpoint"]) == (10, "best")
  assert record["top1_error"] == logged_evals(workdir)[10]["top1_error"]
  assert not (workdir / "claim").exists()


def write_image_folder(root, sizes: dict[str, int]) -> None:
  """Two classes of random JPEGs, larger than 64 pixels (so streamed, as ImageNet is)."""
  tf = data.sources.tensorflow()
  rng = np.random.default_rng(0)
  for split, count in sizes.items():
    for label in ("a", "b"):
      (root / split / label).mkdir(parents=True)
      for index in range(count):
        height, width = rng.integers(72, 120, 2)
        image = rng.integers(0, 256, (height, width, 3), np.uint8)
        (root / split / label / f"{index}.jpg").write_bytes(tf.io.encode_jpeg(image).numpy())


@pytest.mark.slow
def test_10crop_matches_a_run_evaluated_by_10crop_and_every_protocol_is_sane(tmp_path):
  write_image_folder(tmp_path / "images", {"train": 8, "test": 5})
  config = smoke_config(num_train_steps=2, lr_boundaries=(1,), batch_size=8, batch_norm_group=4,
                        eval_batch_size=8,
                        log_every_steps=1, eval_every_steps=2, checkpoint_every_steps=2,
                        eval_protocol="10crop")
  config.dataset.update(name="image_folder", data_dir=str(tmp_path / "images"), num_classes=2,
                        cache_dir=str(tmp_path / "cache"))
  summary = loop.train_and_evaluate(config, str(tmp_path / "run"))
  # The images moved: --data_dir finds them.
  shutil.move(tmp_path / "images", tmp_path / "moved")
  results = {protocol: evaluate.evaluate_run(tmp_path / "run", protocol=protocol,
                                             data_dir=str(tmp_path / "moved"))[1]
             for protocol in (None, "center", "multiscale")}
  assert results[None]["protocol"] == "10crop"  # The run's own.
  assert results[None]["top1_error"] == summary["top1_error"]
  assert results[None]["loss"] == pytest.approx(summary["loss"], rel=1e-6)
  for result in results.values():
    assert result["examples"] == 10 and result["top1_error"] in np.arange(0, 101, 10)
    assert result["top5_error"] == 0  # Two classes: the true one is always among the top 5.
    assert 0 < result["loss"] < 20
  losses = [result["loss"] for result in results.values()]
  assert len(set(losses)) == 3, losses  # Three protocols, three different averages of views.


def unreadable(workdir):
  for path in (workdir / "checkpoints" / "20" / "state").rglob("*"):
    if path.is_file():
      path.write_bytes(b"garbage")


def flipped(workdir):
  """Bytes inverted inside the largest array file, its size kept: orbax reads it without error."""
  files = [path for path in (workdir / "checkpoints" / "20" / "state").rglob("*") if path.is_file()]
  largest = max(files, key=lambda path: path.stat().st_size)
  data = bytearray(largest.read_bytes())
  data[len(data) // 2:len(data) // 2 + 4] = bytes(255 - b for b in data[len(data) // 2:][:4])
  largest.write_bytes(bytes(data))


def mismatched(workdir):
  config = json.loads((workdir / "config.json").read_text())
  (workdir / "config.json").write_text(json.dumps({**config, "model": "cifar_resnet20"}))


# The steps of trained_run are [10, 20].
@pytest.mark.parametrize("args,damage,message", [
    (["--workdir={tmp}/nowhere"], None,
     "workdir {tmp}/nowhere does not exist; pass the --workdir of a run."),
    (["--workdir={tmp}"], None,
     "{tmp} holds no config.json, so no run has started there; pass the --workdir the trainer "
     "was given."),
    (["--workdir={run}"], lambda run: shutil.rmtree(run / "checkpoints"),
     "{run} has no checkpoint yet; the run saves one every checkpoint_every_steps steps and at "
     "its end: rerun once it has."),
    (["--workdir={run}", "--checkpoint=15"], None,
     "no checkpoint of step 15 in {run}/checkpoints; its steps are [10, 20]."),
    (["--workdir={run}", "--checkpoint=last"], None,
     "--checkpoint=last is none of best, latest or a step number; the steps in "
     "{run}/checkpoints are [10, 20]."),
    (["--workdir={run}", "--eval_protocol=10crop"], None,
     "eval_protocol '10crop' is not available for synthetic(32x32x3,10 classes), whose 32x32 "
     "images are evaluated by 'center'; use one of those."),
    (["--workdir={run}", "--eval_protocol=5crop"], None,
     "unknown --eval_protocol '5crop'; choose one of center, 10crop, multiscale."),
    (["--workdir={run}", "--eval_batch_size=12"], None,
     "--eval_batch_size: global batch size 12 does not divide across 8 devices; use a multiple "
     "of 8 (e.g. 16)."),
    (["--workdir={run}", "--eval_batch_size=0"], None,
     "--eval_batch_size must be positive, got 0; leave it out for the run's own (64)."),
    (["--workdir={run}", "--eval_batch_size=-8"], None,
     "--eval_batch_size must be positive, got -8; leave it out for the run's own (64)."),
    (["--workdir={run}/config.json"], None,
     "workdir {run}/config.json is a file, not a directory; pass the --workdir of a run, the "
     "directory the trainer was given."),
    (["--workdir={run}", "--checkpoint=20"], unreadable,
     "checkpoint 20 in {run}/checkpoints is unreadable ("),
    (["--workdir={run}", "--checkpoint=20"], flipped,
     "checkpoint 20 in {run}/checkpoints is unreadable (DamagedCheckpointError: 1 arrays differ "
     "from their saved checksums ("),
    (["--workdir={run}", "--checkpoint=20"], mismatched,
     "{run}/config.json is not the config of checkpoint 20: the workdir holds checkpoints of a "
     "different run ("),
    (["--workdir={run}", "--config=configs/cifar_resnet20.py"], None,
     "--config is not taken: the run's own config is read from WORKDIR/config.json."),
    (["--workdir={run}", "10"], None,
     "unexpected arguments: 10 (flags take the form --name=value)."),
], ids=["no_workdir", "no_config", "no_checkpoints", "unknown_step", "bad_checkpoint",
        "unsupported_protocol", "unknown_protocol", "bad_batch_size", "zero_batch_size",
        "negative_batch_size", "file_workdir", "unreadable", "flipped", "other_run", "config_flag",
        "stray_argument"])
def test_each_error_is_one_line_and_exit_status_2(trained_run, tmp_path, args, damage, message):
  run = tmp_path / "run"
  shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("evaluations"))
  if damage:
    damage(run)
  checkpoints_before = tree(run / "checkpoints") if (run / "checkpoints").exists() else None
  completed = evaluator(*(arg.format(tmp=tmp_path, run=run) for arg in args))
  assert completed.returncode == 2, completed.stderr[-3000:]
  errors = [line for line in lines(completed.stderr) if line.startswith("error:")]
  assert len(errors) == 1 and errors == lines(completed.stderr)[-1:], completed.stderr[-3000:]
  assert errors[0].startswith(f"error: {message.format(tmp=tmp_path, run=run)}"), errors[0]
  assert "Traceback" not in completed.stderr
  if checkpoints_before is not None:
    assert tree(run / "checkpoints") == checkpoints_before
  assert not (run / "evaluations").exists() or not any((run / "evaluations").iterdir())


def test_best_of_checkpoints_without_an_evaluation_is_one_line_naming_the_fix(tmp_path):
  fabricated_run(tmp_path / "run", {2: None, 4: None}, keep=3)
  completed = evaluator(f"--workdir={tmp_path}/run")
  assert completed.returncode == 2, completed.stderr[-3000:]
  assert lines(completed.stderr)[-1] == (
      f"error: no checkpoint in {tmp_path}/run/checkpoints records an evaluation (they were "
      "saved between evaluations, or by an older trainer); pass --checkpoint=latest or a step "
      "of [2, 4].")


# Stands in for a training run that removes the step (an old one past keep_checkpoints) while
# the evaluator reads it: the step goes as orbax opens its second array, while the first one's
# read is still in flight (it fails a second later, as a large array's would once removed).
REMOVED_WHILE_READ = """
import runpy, shutil, threading, time
import tensorstore
from resnet_jax.training import checkpoints
read, open_array = checkpoints.Reader.restore, tensorstore.open
def removed_while_read(self, step, state):
  opened = []
  def opening(*args, **kwargs):
    opened.append(args)
    if len(opened) == 1:
      promise, future = tensorstore.Promise.new()
      threading.Thread(target=lambda: (time.sleep(1), promise.set_exception(
          FileNotFoundError("removed")))).start()
      return future
    if len(opened) == 2:
      shutil.rmtree(self.directory / str(step))
    return open_array(*args, **kwargs)
  tensorstore.open = opening
  return read(self, step, state)
checkpoints.Reader.restore = removed_while_read
runpy.run_module("resnet_jax.training.evaluate", run_name="__main__", alter_sys=True)
"""


def test_a_step_removed_while_it_is_read_is_one_line_naming_the_kept_steps(trained_run, tmp_path):
  shutil.copytree(trained_run, tmp_path / "run")
  completed = evaluator(f"--workdir={tmp_path}/run", "--checkpoint=10", code=REMOVED_WHILE_READ)
  assert completed.returncode == 2, completed.stderr[-3000:]
  assert lines(completed.stderr)[-1] == (
      "error: checkpoint 10 was removed while it was read (a training run keeps only its last "
      "checkpoints and the best); rerun, with one of the steps kept now: [20].")
  assert "Traceback" not in completed.stderr and "Event loop is closed" not in completed.stderr


def test_the_evaluation_split_alone_is_read_and_the_protocol_checked_first(tmp_path, monkeypatch):
  root = tmp_path / "images"  # 32x32 images: held on the devices, the training split decoded whole.
  tf = data.sources.tensorflow()
  for split in ("train", "test"):
    for label in ("a", "b"):
      (root / split / label).mkdir(parents=True)
      for index in range(8):
        image = np.random.default_rng(index).integers(0, 256, (32, 32, 3), np.uint8)
        (root / split / label / f"{index}.jpg").write_bytes(tf.io.encode_jpeg(image).numpy())
  config = smoke_config()
  config.dataset.update(name="image_folder", data_dir=str(root), cache_dir=str(tmp_path / "cache"))
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  manager = checkpoints.Manager(epath.Path(workdir), config, keep=1, num_classes=10)
  manager.save(4, initial_state(config, 4), None, None)
  manager.wait()
  decode_all, decoded = decoding.decode_all, []
  monkeypatch.setattr(decoding, "decode_all", lambda records, ids, shape=None: (
      decoded.extend(records.paths[ids]), decode_all(records, ids, shape))[1])
  splits = lambda: sorted({epath.Path(path).parent.parent.name for path in decoded})

  with pytest.raises(evaluate.EvaluationError, match="eval_protocol '10crop' is not available"):
    evaluate.evaluate_run(workdir, checkpoint="latest", protocol="10crop")
  assert decoded == []
  _, uncached = evaluate.evaluate_run(workdir, checkpoint="latest")  # The mean is computed once.
  assert splits() == ["test", "train"] and len(decoded) == 32
  decoded.clear()
  _, cached = evaluate.evaluate_run(workdir, checkpoint="latest")
  assert splits() == ["test"] and len(decoded) == 16
  # The trainer's dataset, both splits and its mean, gives the same numbers.
  dataset = data.create(loop.dataset_config(config), data.core.make_mesh())
  direct = loop.evaluate(jax.jit(loop.eval_step), initial_state(config, 4),
                          dataset.eval_batches(64, "center"))
  for result in (uncached, cached):
    assert (result["top1_error"], result["examples"]) == (direct["top1_error"], 16)
    assert result["loss"] == pytest.approx(direct["loss"], rel=1e-6)


def test_help_exits_0_and_names_the_choices():
  completed = evaluator("--help")
  assert completed.returncode == 0, completed.stderr
  for text in ("--checkpoint", "--eval_protocol", "--workdir", "--data_dir",
               "best (default)", "10crop", "multiscale", "Exit status: 0 done; 2 nothing",
               "--weights", "--weights_format", "--model", "--config",
               "torchvision", "keras", "akamaster"):
    assert text in completed.stdout, text


def test_config_of_a_run_before_the_windowed_warm_up_lays_out_its_state(tmp_path):
  config = json.loads(cifar_resnet110.get_config("smoke").to_json())
  del config["warmup_window"]
  (tmp_path / "config.json").write_text(json.dumps(config))
  run_config = runs.read_config(epath.Path(tmp_path))
  assert run_config.warmup_learning_rate == 0.01
  assert optim.create(run_config).init_warmup().recent_errors.shape == (1,)


def raw_config(config):
  """`config`'s dataset, its pixels left raw (`dataset.mean` "none")."""
  dataset = loop.dataset_config(config)
  dataset.mean = "none"
  return dataset


def masked(batches, field="images"):
  """`field` of every batch, its padding rows dropped, concatenated."""
  return np.concatenate([np.asarray(getattr(batch, field))[np.asarray(batch.mask)]
                         for batch in batches])


def test_a_loaded_run_scores_raw_pixels_as_the_evaluator_scores_its_batches(trained_run):
  before = tree(trained_run)
  model, preprocessing = runs.load_model(trained_run, checkpoint="latest")
  assert tree(trained_run) == before  # Read-only.
  config, mesh = runs.read_config(trained_run), data.core.make_mesh()
  # The mean the trainer recorded is the one its pipeline subtracted.
  centred = data.create(loop.dataset_config(config), mesh, train=False)
  recorded = np.load(trained_run / "input_mean.npy")
  assert recorded.shape == (32, 32, 3)
  np.testing.assert_array_equal(recorded, np.asarray(centred.mean))
  np.testing.assert_array_equal(preprocessing.mean, recorded)
  assert preprocessing.std == 1.0 and not preprocessing.bgr
  # The evaluator's model (the trainer's layers) on its batches, and the loaded one (flax's own
  # layers) on the same images, raw, through its preprocessing: compiled alike, bitwise equal.
  assert type(model.blocks[0].convs[0]) is nnx.Conv and type(model.stem_norm) is nnx.BatchNorm
  state = runs.restore(trained_run, config, runs.checkpoint_reader(trained_run), 20, 10, mesh)
  weights = jax.device_put(loop.Weights.of(model), NamedSharding(mesh, PartitionSpec()))
  batches = list(centred.eval_batches(64, "center"))
  raw_batches = list(data.create(raw_config(config), mesh, train=False).eval_batches(64, "center"))
  raw = masked(raw_batches)
  assert raw.shape == (200, 32, 32, 3) and raw.min() >= 0 and raw.max() <= 255
  np.testing.assert_array_equal(np.asarray(preprocessing(raw)), masked(batches))
  evaluators = masked([batch.replace(images=logits(state, batch.images)) for batch in batches])
  loaded = masked([batch.replace(images=logits(weights, preprocessing(batch.images)))
                   for batch in raw_batches])
  np.testing.assert_array_equal(loaded, evaluators)
  # As a user calls it, on one device without the evaluator's compiler options (XLA's CPU
  # convolutions may then take other kernels): equal to float32 rounding, within 1e-5 of the
  # logits' scale (4e-7 measured).
  np.testing.assert_allclose(np.asarray(model(preprocessing(raw))), evaluators, rtol=0,
                             atol=1e-5 * np.abs(evaluators).max())


@functools.partial(jax.jit, compiler_options=cpu_kernels.compiler_options("cpu"))
def logits(state, images):
  """The scores of `state`'s model (a TrainState's or `loop.Weights`), in eval mode, as the
  evaluator's step computes them."""
  model = nnx.merge(state.graphdef, state.params, state.batch_stats)
  model.eval()
  return model(images)


def test_load_model_picks_best_latest_or_a_step_and_each_error_is_one_line(tmp_path, caplog):
  workdir = tmp_path / "run"
  config, _ = fabricated_run(workdir, {2: 60.0, 4: 30.0, 6: 50.0}, keep=3)
  before = tree(workdir)
  for checkpoint, seed in (("best", 4), ("latest", 6), (2, 2), ("2", 2)):
    with caplog.at_level(logging.WARNING):
      model, preprocessing = runs.load_model(workdir, checkpoint)
    assert not caplog.records, caplog.text  # Not even orbax's on a read-only directory.
    expected = nnx.state(loop.create_model(config, 10, seed, "cpu"), nnx.Param)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.Param), expected)
  # A run from before the trainer recorded its mean: its dataset's (synthetic data, here).
  dataset = data.create(loop.dataset_config(config), data.core.make_mesh())
  np.testing.assert_array_equal(preprocessing.mean, np.asarray(dataset.mean))
  assert tree(workdir) == before
  for workdir_, checkpoint, message in [
      (tmp_path / "nowhere", "best",
       f"workdir {tmp_path}/nowhere does not exist; pass the --workdir of a run."),
      (tmp_path, "best", f"{tmp_path} holds no config.json, so no run has started there"),
      (workdir, 15, f"no checkpoint of step 15 in {workdir}/checkpoints; its steps are [2, 4, 6]."),
      (workdir, "last", "--checkpoint=last is none of best, latest or a step number;"),
      (workdir, -2, "--checkpoint=-2 is none of best, latest or a step number;")]:
    with pytest.raises(runs.RunError, match=re.escape(message)):
      runs.load_model(workdir_, checkpoint)
  shutil.rmtree(workdir / "checkpoints")
  with pytest.raises(runs.RunError, match=re.escape(f"{workdir} has no checkpoint yet;")):
    runs.load_model(workdir)


def test_torchvision_weights_score_as_the_model_applied_by_hand(tmp_path):
  model = models.create("resnet18", num_classes=10, stride_on_1x1=False, rngs=nnx.Rngs(3))
  model.eval()
  np.savez(tmp_path / "resnet18.npz", **pretrained.to_torchvision(model))
  config = smoke_config()
  path, record = evaluate.evaluate_weights(tmp_path / "resnet18.npz", "torchvision", config,
                                           tmp_path / "out", model="resnet18")
  # By hand: torchvision's normalisation of [0, 1] images, the model, the top-1 class.
  batches = list(data.create(raw_config(config), data.core.make_mesh(),
                             train=False).eval_batches(64, "center"))
  pixels, labels = masked(batches), masked(batches, "labels")
  normalised = (pixels / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  logits = np.asarray(model(jnp.asarray(normalised, jnp.float32)))
  probabilities = np.asarray(jax.nn.softmax(logits))
  assert len(labels) == 200
  assert record["top1_error"] == 100.0 * np.sum(logits.argmax(axis=1) != labels) / 200
  assert record["loss"] == pytest.approx(
      -np.mean(np.log(probabilities[np.arange(200), labels] + 1e-12)), rel=1e-5)
  assert path == epath.Path(tmp_path) / "out" / "evaluations" / "resnet18.npz-center.json"
  written = json.loads(path.read_text())
  assert written == record
  assert {key: written[key] for key in ("weights", "weights_format", "weights_sha256", "step",
                                        "checkpoint", "protocol", "examples", "model", "dataset",
                                        "eval_split", "eval_batch_size")} == {
      "weights": f"{tmp_path}/resnet18.npz", "weights_format": "torchvision",
      "weights_sha256": hashlib.sha256((tmp_path / "resnet18.npz").read_bytes()).hexdigest(),
      "step": None, "checkpoint": None, "protocol": "center", "examples": 200,
      "model": "resnet18", "dataset": "synthetic(32x32x3,10 classes)", "eval_split": "test",
      "eval_batch_size": 64}


def test_a_runs_weights_score_exactly_as_its_workdir_evaluation(trained_run, tmp_path):
  _, by_run = evaluate.evaluate_run(trained_run, checkpoint="latest")
  completed = evaluator(f"--weights={trained_run}", "--weights_format=workdir",
                        "--checkpoint=latest", f"--config={processes.REPO}/configs/"
                        "cifar_resnet20.py:smoke", f"--workdir={tmp_path}/out")
  assert completed.returncode == 0, completed.stderr[-3000:]
  path = tmp_path / "out" / "evaluations" / "run-20-center.json"
  by_weights = json.loads(path.read_text())
  for key in ("top1_error", "top5_error", "loss", "examples", "model", "dataset", "step"):
    assert by_weights[key] == by_run[key], key
  assert (by_weights["weights"], by_weights["weights_format"], by_weights["weights_sha256"],
          by_weights["checkpoint"]) == (str(trained_run), "workdir", None, "latest")
  assert lines(completed.stdout) == [
      f"cifar_resnet8 step 20 (latest) of {trained_run} on synthetic(32x32x3,10 classes) test, "
      f"center: top-1 error {by_run['top1_error']:.2f}%  top-5 error {by_run['top5_error']:.2f}%  "
      f"loss {by_run['loss']:.4f}  (200 examples); written to {path}"]
  assert "Traceback" not in completed.stderr and "WARNING" not in completed.stderr


SMOKE = f"--config={processes.REPO}/configs/cifar_resnet20.py:smoke"
TORCHVISION = ("--weights={tmp}/resnet18.npz", "--weights_format=torchvision", "--model=resnet18",
               SMOKE, "--workdir={tmp}/out")


@pytest.mark.parametrize("args,message", [
    (("--weights={tmp}/resnet18.npz", "--weights_format=onnx", SMOKE, "--workdir={tmp}/out"),
     "unknown --weights_format 'onnx'; choose one of torchvision, keras, akamaster, workdir."),
    (("--weights={tmp}/missing.pth", "--weights_format=torchvision", SMOKE,
      "--workdir={tmp}/out"),
     "--weights={tmp}/missing.pth does not exist; pass a file of torchvision weights."),
    (("--weights={tmp}/resnet18.npz", "--weights_format=torchvision", SMOKE,
      "--workdir={tmp}/out"),  # The config's model, cifar_resnet20.
     "--model=cifar_resnet20: torchvision has no weights of it; pass --model= one of resnet18, "
     "resnet34, resnet50, resnet101, resnet152."),
    (("--weights={tmp}/resnet18.npz", "--weights_format=workdir", SMOKE, "--workdir={tmp}/out"),
     "--weights={tmp}/resnet18.npz is a file; --weights_format=workdir takes the workdir of a "
     "run, every other format a file."),
    ((*TORCHVISION, "--config.dataset.num_classes=7"),
     "--weights={tmp}/resnet18.npz classify 10 classes, but synthetic(32x32x3,7 classes) has 7; "
     "score them on a dataset of 10 classes, or pass weights of a 7-class resnet18."),
    ((*TORCHVISION, "--eval_protocol=10crop"),
     "eval_protocol '10crop' is not available for synthetic(32x32x3,10 classes), whose 32x32 "
     "images are evaluated by 'center'; use one of those."),
    (TORCHVISION[:3] + ("--workdir={tmp}/out",),
     "--weights needs --config, whose dataset they are scored on (e.g. "
     "--config=imagenet_resnet50 --config.dataset.data_dir=...)."),
    ((*TORCHVISION, "--data_dir=/data"),
     "--data_dir is for a run's dataset (--workdir alone); with --weights, pass "
     "--config.dataset.data_dir."),
    (TORCHVISION[:-1], "--workdir is missing or empty; with --weights, pass the directory to "
     "write the result to (WORKDIR/evaluations/)."),
    (("--workdir={tmp}", "--model=resnet18"), "--weights_format and --model go with --weights, "
     "the weights they describe; a run's are its --workdir's."),
], ids=["unknown_format", "missing_file", "model_not_in_format", "file_for_workdir",
        "class_count", "protocol", "no_config", "data_dir", "no_workdir", "model_without_weights"])
def test_each_error_of_weights_is_one_line_and_exit_status_2(tmp_path, args, message):
  model = models.create("resnet18", num_classes=10, stride_on_1x1=False, rngs=nnx.Rngs(0))
  np.savez(tmp_path / "resnet18.npz", **pretrained.to_torchvision(model))
  completed = evaluator(*(arg.format(tmp=tmp_path) for arg in args))
  assert completed.returncode == 2, completed.stderr[-3000:]
  assert lines(completed.stderr)[-1:] == [f"error: {message.format(tmp=tmp_path)}"], (
      completed.stderr[-3000:])
  assert "Traceback" not in completed.stderr
  assert not (tmp_path / "out" / "evaluations").exists() or not any(
      (tmp_path / "out" / "evaluations").iterdir())
