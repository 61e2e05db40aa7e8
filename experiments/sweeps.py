"""The paper's experiments as sweeps: lists of (config, seed) training runs.

  python -m experiments.sweeps --sweep=table6_fig6 --workdir=/runs/table6 --print
  python -m experiments.sweeps --sweep=fig1_fig6_cpu --workdir=/tmp/cpu --run

`--print` writes one `python -m resnet_jax.main ...` command per member still to
run, for a fleet of TPU VMs or GPU hosts; `--run` runs them one after another
here. Each member trains in `<workdir>/<config name>/seed<k>`. A sweep of a table
the paper reports by another test protocol than the configs' centre view (10-crop
for Tables 2 and 3, multi-scale for Table 4) follows training with
`python -m resnet_jax.training.evaluate` of the final checkpoint by that protocol. A member
with a `summary.json` (and that evaluation) has finished and is skipped; one with
checkpoints but no summary was stopped and its command resumes it (the trainer
restores the newest checkpoint of its workdir); one trained but not yet evaluated
is evaluated. `sweep.json` at the root records the schedule, so a
sweep directory never mixes schedules and the report can say which one it used.

`--run` starts each member as a subprocess running exactly the printed command:
one code path for local and fleet runs, a fresh process (and device memory) per
member, and a preempted member (exit status 75) stops the sweep with that status
so that rerunning the same command resumes it.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import pathlib
import shlex
import subprocess
import sys
from typing import Callable, Sequence

from absl import app, flags
from etils import epath

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PREEMPTED_EXIT_CODE = 75  # resnet_jax.training.loop.PREEMPTED_EXIT_CODE, without importing jax here.
SCHEDULES = ("full", "short")
CIFAR_DEPTHS = (20, 32, 44, 56, 110)


@dataclasses.dataclass(frozen=True)
class Sweep:
  description: str
  configs: tuple[str, ...]  # Config file names under configs/.
  seeds: dict[str, int] = dataclasses.field(default_factory=dict)  # Runs per config; default 1.
  default_schedule: str = "full"
  # The paper's test protocol for the table (resnet_jax.data.core.EVAL_PROTOCOLS).
  eval_protocol: str = "center"


SWEEPS = {
    "table6_fig6": Sweep(
        "CIFAR-10 plain and residual nets of 20-110 layers and ResNet-1202 (Table 6, Fig. 6)",
        tuple(f"cifar_plain{d}" for d in CIFAR_DEPTHS)
        + tuple(f"cifar_resnet{d}" for d in CIFAR_DEPTHS + (1202,)),
        # Table 6 gives ResNet-110 as "best (mean +- std)" over 5 runs.
        seeds={"cifar_resnet110": 5}),
    "fig1": Sweep("The degradation problem: plain-20 vs plain-56 on CIFAR-10 (Fig. 1)",
                  ("cifar_plain20", "cifar_plain56")),
    "fig1_fig6_cpu": Sweep(
        "Fig. 1 / Fig. 6 at CPU scale: plain and residual nets of 20 and 56 layers",
        ("cifar_plain20", "cifar_plain56", "cifar_resnet20", "cifar_resnet56"),
        default_schedule="short"),
    "cifar_resnet20_long_cpu": Sweep(
        "ResNet-20 on CIFAR-10 for a few hours of CPU: the paper's recipe over --steps "
        "iterations (16000, a quarter of its schedule, in experiments/results)",
        ("cifar_resnet20",), default_schedule="short"),
    "cifar_resnet110_warmup_cpu": Sweep(
        "ResNet-110's warm-up (Sec. 4.2) on CIFAR-10 on CPU: the paper's recipe over --steps "
        "iterations (16000 in experiments/results, stopped once its warm-up was over)",
        ("cifar_resnet110",), default_schedule="short"),
    "table2_fig4": Sweep(
        "ImageNet plain vs residual 18/34 (Table 2, Fig. 4), residual nets with option A as in "
        "Table 2",
        ("imagenet_plain18", "imagenet_plain34", "imagenet_resnet18_a", "imagenet_resnet34_a"),
        eval_protocol="10crop"),
    "table3_shortcuts": Sweep("ImageNet ResNet-34 with shortcut options A, B, C (Table 3)",
                              ("imagenet_resnet34_a", "imagenet_resnet34_b",
                               "imagenet_resnet34_c"), eval_protocol="10crop"),
    "table3_table4_bottleneck": Sweep("ImageNet bottleneck ResNet-50/101/152 (Table 3)",
                                      ("imagenet_resnet50", "imagenet_resnet101",
                                       "imagenet_resnet152"), eval_protocol="10crop"),
    # Table 4's single models are Table 3's, tested fully convolutionally at five scales.
    "table4": Sweep("ImageNet single models by multi-scale testing: ResNet-34 B and C, "
                    "ResNet-50/101/152 (Table 4)",
                    ("imagenet_resnet34_b", "imagenet_resnet34_c", "imagenet_resnet50",
                     "imagenet_resnet101", "imagenet_resnet152"), eval_protocol="multiscale"),
    "goyal8k": Sweep("ImageNet ResNet-50 at batch 8,192 by Goyal et al.'s recipe (their Table 1, "
                     "gradual warm-up; mean +- std of 5 runs)", ("imagenet_resnet50_goyal8k",),
                     seeds={"imagenet_resnet50_goyal8k": 5}),
}


@dataclasses.dataclass(frozen=True)
class Member:
  config: str
  seed: int
  workdir: epath.Path
  command: tuple[str, ...]  # argv, starting with "python".
  # `python -m resnet_jax.training.evaluate` of the final checkpoint by the sweep's protocol, and the
  # file it writes; None where the run's own evaluation is the paper's protocol.
  evaluation: tuple[str, ...] | None = None
  evaluation_file: epath.Path | None = None

  @property
  def status(self) -> str:
    """"finished" (summary.json, and the evaluation if any), "trained" (summary.json, the
    evaluation missing), "stopped" (checkpoints, no summary) or "new"."""
    if (self.workdir / "summary.json").exists():
      if self.evaluation_file and not self.evaluation_file.exists():
        return "trained"
      return "finished"
    checkpoints = self.workdir / "checkpoints"
    if checkpoints.is_dir() and any(path.name.isdigit() for path in checkpoints.iterdir()):
      return "stopped"
    return "new"


def schedule_overrides(config_name: str, schedule: str, steps: int) -> dict[str, str]:
  """The `--config.X` overrides of a schedule, as strings config_flags parses.

  "full" is the config's own recipe. "short" trains for `steps` iterations and
  scales every iteration count by steps / num_train_steps: the learning rate
  drops at the same fractions of training (CIFAR: 32k/64k and 48k/64k, Sec. 4.2),
  the ImageNet plateau test averages over the same fraction, a gradual warm-up
  lasts the same fraction, and evaluation, logging and checkpoints come as often
  relative to the run's length.
  """
  if schedule == "full":
    return {}
  config = importlib.import_module(f"configs.{config_name}").get_config()
  if not 0 < steps <= config.num_train_steps:
    raise ValueError(f"--steps must be in 1..{config.num_train_steps} for {config_name}, "
                     f"got {steps}.")
  scale = lambda count: max(1, count * steps // config.num_train_steps)
  overrides = {"num_train_steps": str(steps)}
  if config.lr_boundaries:
    boundaries = [scale(b) for b in config.lr_boundaries]
    if len(set(boundaries)) < len(boundaries) or boundaries[-1] >= steps:
      raise ValueError(f"--steps={steps} is too short to place the learning-rate drops; "
                       "use at least 4.")
    overrides["lr_boundaries"] = "(" + ",".join(map(str, boundaries)) + ")"
  for field in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps",
                "plateau_accumulation_steps", "lr_warmup_steps"):
    if config[field]:
      overrides[field] = str(scale(config[field]))
  return overrides


def plan(sweep_name: str, workdir: epath.PathLike, schedule: str | None = None,
         steps: int = 2_000, seeds: int | None = None,
         overrides: Sequence[str] = ()) -> tuple[dict, list[Member]]:
  """The sweep's record (for sweep.json) and every member with its command.

  `seeds` replaces each config's number of runs; `overrides` are extra
  "field=value" config overrides given to every member (e.g. the dataset).
  """
  if sweep_name not in SWEEPS:
    raise ValueError(f"unknown sweep {sweep_name!r}; valid: {', '.join(SWEEPS)}")
  sweep = SWEEPS[sweep_name]
  schedule = schedule or sweep.default_schedule
  if schedule not in SCHEDULES:
    raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
  for override in overrides:
    if "=" not in override:
      raise ValueError(f"override {override!r} must read field=value, e.g. dataset.name=image_folder")
  root = epath.Path(workdir)
  root = root if "://" in str(root) else root.resolve()  # resolve() would mangle gs://.
  members = []
  for config in sweep.configs:
    schedule_fields = schedule_overrides(config, schedule, steps)
    extra = [f"--config.{field}={value}" for field, value in schedule_fields.items()]
    extra += [f"--config.{override}" for override in overrides]
    final_step = int(schedule_fields.get(
        "num_train_steps", importlib.import_module(f"configs.{config}").get_config().num_train_steps))
    for seed in range(seeds or sweep.seeds.get(config, 1)):
      member_dir = root / config / f"seed{seed}"
      command = ("python", "-m", "resnet_jax.main", f"--config=configs/{config}.py",
                 f"--workdir={member_dir}", f"--config.seed={seed}", *extra)
      evaluation = evaluation_file = None
      if sweep.eval_protocol != "center":
        evaluation = ("python", "-m", "resnet_jax.training.evaluate", f"--workdir={member_dir}",
                      f"--checkpoint={final_step}", f"--eval_protocol={sweep.eval_protocol}")
        evaluation_file = member_dir / "evaluations" / f"{final_step}-{sweep.eval_protocol}.json"
      members.append(Member(config, seed, member_dir, command, evaluation, evaluation_file))
  record = {"sweep": sweep_name, "description": sweep.description, "schedule": schedule,
            "steps": steps if schedule == "short" else None, "overrides": list(overrides),
            "eval_protocol": sweep.eval_protocol,
            "members": [{"config": m.config, "seed": m.seed,
                         "workdir": str(m.workdir.relative_to(root))} for m in members]}
  return record, members


def write_record(workdir: epath.PathLike, record: dict) -> None:
  """Writes sweep.json, refusing a directory that holds a sweep of another schedule."""
  path = epath.Path(workdir) / "sweep.json"
  if path.exists():
    old = json.loads(path.read_text())
    same = ("sweep", "schedule", "steps", "overrides")
    if any(old.get(key) != record[key] for key in same):
      raise ValueError(
          f"{path} records another sweep ({', '.join(f'{k}={old.get(k)!r}' for k in same)}); "
          "use a new --workdir, or the same flags as before.")
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(record, indent=2) + "\n")


def commands(member: Member) -> list[tuple[str, ...]]:
  """What the member has still to run: training (unless it finished) and its evaluation."""
  todo = [] if member.status in ("finished", "trained") else [member.command]
  if member.evaluation and member.status != "finished":
    todo.append(member.evaluation)
  return todo


def shell_command(member: Member) -> str:
  """The member's remaining commands as one shell line."""
  return " && ".join(shlex.join(command) for command in commands(member))


def run_in_subprocess(command: tuple[str, ...]) -> int:
  """Runs a command of a member from the repository root; returns its exit status."""
  return subprocess.run([sys.executable, *command[1:]], cwd=REPO_ROOT).returncode


def run(members: Sequence[Member],
        runner: Callable[[tuple[str, ...]], int] = run_in_subprocess) -> int:
  """Runs the unfinished members in order; returns 0, 75 if one was preempted, else 1."""
  failed = []
  for member in members:
    status = member.status
    if status == "finished":
      print(f"skip   {member.config} seed {member.seed} (finished)", flush=True)
      continue
    action = {"stopped": "resume", "trained": "evaluate"}.get(status, "start")
    print(f"{action:6s} {member.config} seed {member.seed}", flush=True)
    for command in commands(member):
      code = runner(command)
      if code == PREEMPTED_EXIT_CODE:
        print(f"preempted: {member.config} seed {member.seed}; rerun to resume.", flush=True)
        return PREEMPTED_EXIT_CODE
      if code:
        failed.append(f"{member.config} seed {member.seed} (exit status {code})")
        break
  if failed:
    print("failed: " + "; ".join(failed), flush=True)
  return 1 if failed else 0


_SWEEP = flags.DEFINE_enum("sweep", None, list(SWEEPS), "The experiment to run.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Root of the sweep's member workdirs.")
_SCHEDULE = flags.DEFINE_enum("schedule", None, list(SCHEDULES),
                              "full: the paper's recipe; short: --steps iterations, the same "
                              "recipe scaled (default: the sweep's, full except fig1_fig6_cpu).")
_STEPS = flags.DEFINE_integer("steps", 2_000, "Iterations of the short schedule.")
_SEEDS = flags.DEFINE_integer("seeds", None, "Runs per config (default: 5 for ResNet-110 in "
                              "table6_fig6, else 1).")
_OVERRIDES = flags.DEFINE_multi_string("override", [], "field=value config override for every "
                                       "member, e.g. dataset.name=image_folder.")
_PRINT = flags.DEFINE_bool("print", False, "Print the commands of the members still to run.")
_RUN = flags.DEFINE_bool("run", False, "Run the members still to run, one after another.")
flags.mark_flags_as_required(["sweep", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _PRINT.value == _RUN.value:
    raise app.UsageError("pass exactly one of --print and --run")
  try:
    record, members = plan(_SWEEP.value, _WORKDIR.value, _SCHEDULE.value, _STEPS.value,
                           _SEEDS.value, _OVERRIDES.value)
    write_record(_WORKDIR.value, record)
  except ValueError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  if _PRINT.value:
    for member in members:
      if member.status != "finished":
        print(shell_command(member))
    return
  sys.exit(run(members))


if __name__ == "__main__":
  app.run(main)
