"""Sweeps (members, commands, skip and resume) and the report (table, figures, Fig. 7)."""
import json
import pathlib
import shlex
import subprocess
import sys

import jax.numpy as jnp
import pytest
from etils import epath

from configs import cifar_resnet20
from experiments import sweeps
from resnet_jax.training import checkpoints, optim, loop
from resnet_jax.tools import report


def _finish(workdir: pathlib.Path, model: str, top1_error: float, train_error: float = 5.0,
            dataset: str = "image_folder(/data/cifar10-jpeg)", num_params: int = 1000):
  """A fabricated finished run: metrics.jsonl and summary.json."""
  workdir.mkdir(parents=True, exist_ok=True)
  records = [{"step": 100, "kind": "train", "loss": 2.0, "top1_error": 80.0},
             {"step": 100, "kind": "eval", "top1_error": 70.0},
             {"step": 200, "kind": "train", "loss": 0.3, "top1_error": train_error},
             {"step": 200, "kind": "eval", "top1_error": top1_error}]
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  (workdir / "summary.json").write_text(json.dumps({
      "model": model, "dataset": dataset, "steps": 200, "num_params": num_params,
      "top1_error": top1_error}))


def _stop(workdir: pathlib.Path):
  """A fabricated stopped run: a checkpoint step directory, no summary."""
  (workdir / "checkpoints" / "62").mkdir(parents=True)


# --- Sweeps -------------------------------------------------------------------------------

def test_sweeps_name_existing_configs_and_the_papers_seeds():
  for sweep in sweeps.SWEEPS.values():
    for config in sweep.configs:
      assert (sweeps.REPO_ROOT / "configs" / f"{config}.py").exists(), config
  _, members = sweeps.plan("table6_fig6", "/runs")
  assert len(members) == 5 + 5 + 4 + 1  # plain x5, ResNet-20..56 and -1202, ResNet-110 x5
  assert [m.seed for m in members if m.config == "cifar_resnet110"] == [0, 1, 2, 3, 4]
  _, members = sweeps.plan("fig1_fig6_cpu", "/runs", seeds=2)
  assert [(m.config, m.seed) for m in members][:3] == [
      ("cifar_plain20", 0), ("cifar_plain20", 1), ("cifar_plain56", 0)]


def test_the_papers_five_resnet110_runs_differ_in_data_order_as_in_initialisation(tmp_path):
  _, members = sweeps.plan("table6_fig6", tmp_path)
  seeds = [[arg for arg in m.command if arg.startswith("--config.seed=")] for m in members
           if m.config == "cifar_resnet110"]
  assert seeds == [[f"--config.seed={seed}"] for seed in range(5)]
  assert not any("dataset.seed" in arg for m in members for arg in m.command)
  config = cifar_resnet20.get_config()
  assert config.dataset.seed is None  # So the trainer's data order follows the run seed:
  for seed in range(5):
    config.seed = seed
    assert loop.dataset_config(config).seed == seed


def test_short_schedule_keeps_the_papers_fractions():
  overrides = sweeps.schedule_overrides("cifar_resnet56", "short", 2000)
  # 64k -> 2k: drops at 32k/64k and 48k/64k, evaluation every 2k/64k, logs every 100/64k.
  assert overrides == {"num_train_steps": "2000", "lr_boundaries": "(1000,1500)",
                       "log_every_steps": "3", "eval_every_steps": "62",
                       "checkpoint_every_steps": "62"}
  assert sweeps.schedule_overrides("cifar_resnet56", "full", 2000) == {}
  imagenet = sweeps.schedule_overrides("imagenet_resnet50", "short", 6000)
  assert imagenet["plateau_accumulation_steps"] == "50" and "lr_boundaries" not in imagenet
  # Goyal et al.'s warm-up over the first 782 of 14,075 iterations, drops at epochs 30, 60, 80.
  goyal = sweeps.schedule_overrides("imagenet_resnet50_goyal8k", "short", 1000)
  assert (goyal["lr_warmup_steps"], goyal["lr_boundaries"]) == ("55", "(333,666,888)")
  with pytest.raises(ValueError, match="too short"):
    sweeps.schedule_overrides("cifar_resnet20", "short", 2)


def test_print_lists_exactly_the_unfinished_members(tmp_path):
  _finish(tmp_path / "cifar_plain20" / "seed0", "cifar_plain20", 9.0)
  _stop(tmp_path / "cifar_resnet20" / "seed0")
  printed = subprocess.run(
      [sys.executable, "-m", "experiments.sweeps", "--sweep=fig1_fig6_cpu",
       f"--workdir={tmp_path}", "--steps=640", "--print",
       "--override=dataset.name=image_folder", "--override=dataset.data_dir=/data/cifar10-jpeg"],
      cwd=sweeps.REPO_ROOT, capture_output=True, text=True, check=True).stdout
  schedule = ("--config.num_train_steps=640 '--config.lr_boundaries=(320,480)' "
              "--config.log_every_steps=1 --config.eval_every_steps=20 "
              "--config.checkpoint_every_steps=20 --config.dataset.name=image_folder "
              "--config.dataset.data_dir=/data/cifar10-jpeg")
  expected = [
      f"python -m resnet_jax.main --config=configs/{config}.py "
      f"--workdir={tmp_path}/{config}/seed0 --config.seed=0 {schedule}"
      for config in ("cifar_plain56", "cifar_resnet20", "cifar_resnet56")]
  assert printed.splitlines() == expected
  record = json.loads((tmp_path / "sweep.json").read_text())
  assert record["schedule"] == "short" and record["steps"] == 640
  assert len(record["members"]) == 4


def _member_of(command) -> tuple[str, pathlib.Path]:
  """The (config, workdir) a member's command runs in."""
  workdir = pathlib.Path(next(arg for arg in command if arg.startswith("--workdir="))[10:])
  return workdir.parent.name, workdir


def test_run_skips_finished_resumes_stopped_and_stops_on_preemption(tmp_path):
  _, members = sweeps.plan("fig1_fig6_cpu", tmp_path)
  _finish(tmp_path / "cifar_plain20" / "seed0", "cifar_plain20", 9.0)
  _stop(tmp_path / "cifar_resnet20" / "seed0")
  assert [m.status for m in members] == ["finished", "new", "stopped", "new"]
  assert all(shlex.split(sweeps.shell_command(m)) == list(m.command) for m in members[1:])
  calls = []

  def fake_runner(command):
    config, workdir = _member_of(command)
    calls.append(config)
    if config == "cifar_resnet20":
      return sweeps.PREEMPTED_EXIT_CODE
    _finish(workdir, config, 8.0)
    return 0

  assert sweeps.run(members, fake_runner) == sweeps.PREEMPTED_EXIT_CODE
  assert calls == ["cifar_plain56", "cifar_resnet20"]
  # Rerunning the same sweep resumes the preempted member and runs the rest.
  calls.clear()
  assert sweeps.run(members, lambda command: calls.append(_member_of(command)[0]) or 0) == 0
  assert calls == ["cifar_resnet20", "cifar_resnet56"]
  assert sweeps.run(members, lambda command: 1) == 1  # Failures are reported, the sweep goes on.


def test_a_table_sweep_evaluates_the_final_checkpoint_by_the_papers_protocol(tmp_path):
  record, members = sweeps.plan("table4", tmp_path, schedule="short", steps=600)
  assert record["eval_protocol"] == "multiscale"
  assert [m.config for m in members] == ["imagenet_resnet34_b", "imagenet_resnet34_c",
                                          "imagenet_resnet50", "imagenet_resnet101",
                                          "imagenet_resnet152"]
  first = members[0]
  assert first.evaluation == ("python", "-m", "resnet_jax.training.evaluate", f"--workdir={first.workdir}",
                              "--checkpoint=600", "--eval_protocol=multiscale")
  assert first.evaluation_file == first.workdir / "evaluations" / "600-multiscale.json"
  assert shell_command_parts(first) == [list(first.command), list(first.evaluation)]
  assert {m.evaluation[-1] for m in sweeps.plan("table3_shortcuts", tmp_path)[1]} == {
      "--eval_protocol=10crop"}
  assert all(m.evaluation is None for m in sweeps.plan("table6_fig6", tmp_path)[1])

  # Trained, not yet evaluated: only the evaluation runs; then the member is finished.
  _finish(first.workdir, first.config, 30.0)
  assert first.status == "trained"
  assert shell_command_parts(first) == [list(first.evaluation)]
  calls = []

  def fake_runner(command):
    config, workdir = _member_of(command)
    calls.append((config, command[2]))
    if command[2] == "resnet_jax.main":
      _finish(workdir, config, 30.0)
    else:
      (workdir / "evaluations").mkdir()
      (workdir / "evaluations" / "600-multiscale.json").write_text("{}")
    return 0

  assert sweeps.run(members[:2], fake_runner) == 0
  assert calls == [("imagenet_resnet34_b", "resnet_jax.training.evaluate"),
                   ("imagenet_resnet34_c", "resnet_jax.main"),
                   ("imagenet_resnet34_c", "resnet_jax.training.evaluate")]
  assert [m.status for m in members[:2]] == ["finished", "finished"]


def shell_command_parts(member) -> list[list[str]]:
  return [shlex.split(part) for part in sweeps.shell_command(member).split(" && ")]


def test_a_sweep_directory_keeps_its_schedule(tmp_path):
  record, _ = sweeps.plan("fig1", tmp_path, schedule="short", steps=1000)
  sweeps.write_record(tmp_path, record)
  sweeps.write_record(tmp_path, record)  # The same sweep again: fine.
  full, _ = sweeps.plan("fig1", tmp_path, schedule="full")
  with pytest.raises(ValueError, match="records another sweep"):
    sweeps.write_record(tmp_path, full)


# --- Report -------------------------------------------------------------------------------

def _fabricated_sweep(root: pathlib.Path) -> pathlib.Path:
  record, _ = sweeps.plan("table6_fig6", root, schedule="short", steps=2000)
  sweeps.write_record(root, record)
  for seed, error in enumerate([6.5, 6.7, 6.9]):
    _finish(root / "cifar_resnet110" / f"seed{seed}", "cifar_resnet110", error,
            train_error=seed + 1.0, num_params=1_727_962)
  _finish(root / "cifar_plain20" / "seed0", "cifar_plain20", 10.0, num_params=269_722)
  (root / "cifar_resnet20" / "seed0").mkdir(parents=True)  # Started, nothing logged yet.
  return root


def test_report_table_against_the_paper(tmp_path):
  sweep_dir = _fabricated_sweep(tmp_path / "sweep")
  rows = {row["config"]: row for row in report.table_rows(report.find_members(sweep_dir))}
  resnet110 = rows["cifar_resnet110"]
  assert (resnet110["finished"], resnet110["runs"]) == (3, 5)
  assert resnet110["test_mean"] == pytest.approx(6.7)
  assert resnet110["test_std"] == pytest.approx(0.2)  # sample std of 6.5, 6.7, 6.9
  assert resnet110["train_error"] == pytest.approx(2.0)  # mean of 1%, 2%, 3%
  assert resnet110["difference"] == pytest.approx(6.7 - 6.61)
  assert rows["cifar_plain20"]["paper"] == "—" and rows["cifar_plain20"]["difference"] is None
  assert rows["cifar_resnet20"]["finished"] == 0 and rows["cifar_resnet20"]["test_mean"] is None

  # The trainer's record of the iteration ResNet-110's warm-up ended at, in one run's log.
  with (sweep_dir / "cifar_resnet110" / "seed1" / "metrics.jsonl").open("a") as log:
    log.write(json.dumps({"step": 412, "kind": "warmup_end", "top1_error": 79.61}) + "\n")
  path = report.write_report(sweep_dir, tmp_path / "out")
  text = path.read_text()
  warmup = text.split("## Warm-up (Sec. 4.2)")[1].split("##")[0]
  assert [line for line in warmup.splitlines() if line.startswith("| cifar")] == [
      "| cifar_resnet110 seed 1 | 412 | 79.61 |"]
  assert ("| cifar_resnet110 | cifar_resnet110 | image_folder(/data/cifar10-jpeg) | 1,727,962 "
          "| 3/5 | 2.00 | 6.70 ± 0.20 | 6.61 ± 0.16 (5 runs; best 6.43) | +0.09 |") in text
  assert "| cifar_plain20 | cifar_plain20 | image_folder(/data/cifar10-jpeg) | 269,722 | 1/1 " \
         "| 5.00 | 10.00 | — | — |" in text
  assert "| cifar_resnet20 | — | — | — | 0/1 | — | — | 8.75 | — |" in text
  assert "**short**, 2000 iterations" in text
  assert "higher than on the official pixels" in text
  assert "No checkpoints to measure." in text
  curves = tmp_path / "out" / "curves.png"
  assert curves.read_bytes().startswith(b"\x89PNG") and curves.stat().st_size > 10_000


def test_report_of_a_table_tested_by_another_protocol_reads_the_evaluations(tmp_path):
  sweep_dir = tmp_path / "sweep"
  record, members = sweeps.plan("table4", sweep_dir, schedule="short", steps=200)
  sweeps.write_record(sweep_dir, record)
  for member, error in zip(members[:3], (26.0, 25.0, 24.0)):
    _finish(member.workdir, member.config, error, dataset="imagenet2012")
  # ResNet-34 B and 50 tested multi-scale (lower than their centre-crop errors); C not yet.
  for member, error in ((members[0], 23.5), (members[2], 21.25)):
    (member.workdir / "evaluations").mkdir()
    (member.workdir / "evaluations" / "200-multiscale.json").write_text(
        json.dumps({"step": 200, "protocol": "multiscale", "top1_error": error}))
  rows = {row["config"]: row for row in report.table_rows(report.find_members(sweep_dir),
                                                           "multiscale")}
  assert rows["imagenet_resnet34_b"]["test_mean"] == 23.5
  assert rows["imagenet_resnet34_b"]["difference"] == pytest.approx(23.5 - 21.84)
  assert rows["imagenet_resnet34_c"]["finished"] == 0
  assert rows["imagenet_resnet50"]["paper"] == "20.74 (top-5 5.25)"

  text = report.write_report(sweep_dir, tmp_path / "out", layer_responses=False).read_text()
  assert "by multi-scale testing, as the paper's" in text
  assert "| imagenet_resnet50 | imagenet_resnet50 | imagenet2012 | 1,000 | 1/1 | 5.00 | 21.25 | " \
         "20.74 (top-5 5.25) | +0.51 |" in text
  assert "Trained, not yet tested by multi-scale testing (not counted above; " in text
  assert text.split("Trained, not yet tested")[1].split("\n")[0].endswith(
      "imagenet_resnet34_c seed 0.")


def test_report_compares_the_goyal_config_with_their_error_at_batch_8k(tmp_path):
  sweep_dir = tmp_path / "sweep"
  record, members = sweeps.plan("goyal8k", sweep_dir)
  sweeps.write_record(sweep_dir, record)
  assert [m.config for m in members] == ["imagenet_resnet50_goyal8k"] * 5  # Their 5 runs.
  for member, error in zip(members, (23.8, 24.0)):
    _finish(member.workdir, "resnet50", error, dataset="imagenet2012")
  text = report.write_report(sweep_dir, tmp_path / "out", layer_responses=False).read_text()
  # Their single 224 centre crop is the config's own evaluation.
  assert "by the config's own view testing, as the paper's" in text
  assert ("| imagenet_resnet50_goyal8k | resnet50 | imagenet2012 | 1,000 | 2/5 | 5.00 | "
          "23.90 ± 0.14 | 23.74 ± 0.09 (Goyal et al. 2017, batch 8k; 23.60 ± 0.12 at 256) | "
          "+0.16 |") in text


def _checkpointed_run(workdir: pathlib.Path, model: str):
  """A run stopped at step 2: config.json and a checkpoint as the trainer writes them."""
  config = cifar_resnet20.get_config("smoke")
  config.model = model
  workdir.mkdir(parents=True)
  (workdir / "config.json").write_text(config.to_json_best_effort())
  state = loop.create_train_state(loop.create_model(config, 10, 0, "cpu"),
                                  optim.create(config))
  manager = checkpoints.Manager(epath.Path(workdir), config, keep=3)
  manager.save(2, state.replace(step=jnp.asarray(2, jnp.int32)), None, None)
  manager.wait()


def test_report_restores_checkpoints_for_layer_responses(tmp_path, monkeypatch):
  monkeypatch.setattr(report, "LAYER_RESPONSE_IMAGES", 64)
  sweep_dir = tmp_path / "sweep"
  for model in ("cifar_plain8", "cifar_resnet8"):
    _checkpointed_run(sweep_dir / model / "seed0", model)
  path = report.write_report(sweep_dir, tmp_path / "out")
  assert "![layer responses](layer_responses.png)" in path.read_text()
  assert "Schedule: unknown" in path.read_text()
  figure = tmp_path / "out" / "layer_responses.png"
  assert figure.read_bytes().startswith(b"\x89PNG") and figure.stat().st_size > 10_000
