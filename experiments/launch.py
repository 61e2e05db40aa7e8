"""Launch commands for Cloud TPU VMs and pod slices, multi-GPU hosts and Slurm GPU clusters.

  python -m experiments.launch --target=tpu-pod --name=resnet --zone=us-central2-b \\
      --accelerator=v4-32 --config=configs/imagenet_resnet50.py --workdir=gs://BUCKET/r50 \\
      --stages=create,setup,train --repo=https://github.com/USER/resnet_jax.git --print
  python -m experiments.launch --target=slurm --nodes=2 --gpus_per_node=8 \\
      --config=configs/imagenet_resnet50.py --workdir=/shared/runs/r50 --run
  python -m experiments.launch --target=tpu-vm --name=resnet --zone=us-central2-b \\
      --accelerator=v4-8 --sweep=table6_fig6 --workdir=gs://BUCKET/table6 --print

`--print` writes shell commands (a Slurm job as an `sbatch` here-document), one per machine
and stage; `--run` runs them from the repository root, each stage on every machine at once.
Stages: `create` makes the TPU VM or slice, `setup` installs the package into `.venv` of
the checkout (cloned from `--repo` on remote machines), `train` runs `resnet_jax.main` with
that `.venv`'s Python on every worker (TPU), once per host (GPU host: one process drives
all its GPUs) or once per GPU (Slurm: jax.distributed gives each process the GPU of its
SLURM_LOCALID, so a process per node would use one GPU). `--sweep` takes the members still
to run from `experiments.sweeps` and gives each its own machine: a TPU VM named
`<name>-<config>-s<seed>`, a host of `--hosts`, or a Slurm job.

`--batch_size` changes the global batch and scales the learning rate linearly with it
(`learning_rate * batch_size / the config's batch_size`: 0.1 per 128 on CIFAR, 0.1 per 256 on
ImageNet); the trainer itself never rescales either.
"""

from __future__ import annotations

import argparse
import pathlib
import shlex
import subprocess
import sys

from experiments import sweeps
from resnet_jax.training import cli

REPO_DIR = "resnet_jax"  # The checkout on remote machines, relative to the home directory.
PYTHON = ".venv/bin/python"
# TPU VM images by generation (`gcloud compute tpus tpu-vm versions list --zone=Z`).
TPU_VERSIONS = {"v2": "tpu-ubuntu2204-base", "v3": "tpu-ubuntu2204-base",
                "v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite",
                "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}
# Ubuntu 22.04's python3 is 3.10; the package needs 3.11.
TPU_PACKAGES = "sudo apt-get update -q && sudo apt-get install -y -q python3.11-venv && "
TARGETS = {  # target: (pip extras, stages)
    "tpu-vm": ("train,tpu", ("create", "setup", "train")),
    "tpu-pod": ("train,tpu", ("create", "setup", "train")),
    "gpu-host": ("train,cuda13", ("setup", "train")),
    "slurm": ("train,cuda13", ("setup", "train")),
}


def scaled_batch(config_paths: list[str], batch_size: int) -> list[str]:
  """Overrides for a global batch of `batch_size`, the learning rate scaled linearly with it."""
  rates = set()
  for path in config_paths:
    config = cli.load_config(str(sweeps.REPO_ROOT / path))
    rates.add(f"{config.learning_rate * batch_size / config.batch_size:.6g}")
  if len(rates) > 1:
    raise ValueError(f"the configs scale to different learning rates {sorted(rates)}; launch "
                     "them one config at a time")
  return [f"batch_size={batch_size}", f"learning_rate={rates.pop()}"]


def members(args) -> list[tuple[str, str, tuple[str, ...]]]:
  """(config name, seed label, `python -m resnet_jax.main ...` argv) of every run to launch."""
  configs = ([args.config] if args.config
             else [f"configs/{c}.py" for c in sweeps.SWEEPS[args.sweep].configs])
  overrides = args.override + (scaled_batch(configs, args.batch_size) if args.batch_size else [])
  if args.config:
    name = pathlib.Path(args.config.partition(":")[0]).stem
    command = ("python", "-m", "resnet_jax.main", f"--config={args.config}",
               f"--workdir={args.workdir}", *(f"--config.{o}" for o in overrides))
    return [(name, "", command)]
  record, planned = sweeps.plan(args.sweep, args.workdir, args.schedule, args.steps, args.seeds,
                                overrides)
  sweeps.write_record(args.workdir, record)
  return [(m.config, f"s{m.seed}", m.command) for m in planned if m.status != "finished"]


def tpu_commands(args, stage: str, machine: str, train: str) -> str:
  if stage == "create":
    version = args.version or TPU_VERSIONS[args.accelerator.rsplit("-", 1)[0]]
    return shlex.join(["gcloud", "compute", "tpus", "tpu-vm", "create", machine,
                       f"--zone={args.zone}", f"--accelerator-type={args.accelerator}",
                       f"--version={version}"])
  script = TPU_PACKAGES + setup_script(args, remote=True) if stage == "setup" else train
  workers = ["--worker=all"] if args.target == "tpu-pod" else []
  return shlex.join(["gcloud", "compute", "tpus", "tpu-vm", "ssh", machine, f"--zone={args.zone}",
                     *workers]) + f" --command={shlex.quote(script)}"


def setup_script(args, remote: bool) -> str:
  clone = f"([ -d {REPO_DIR} ] || git clone {args.repo} {REPO_DIR}) && cd {REPO_DIR} && "
  extras = TARGETS[args.target][0]
  return ((clone if remote else "")
          + f'{args.python} -m venv .venv && .venv/bin/pip install -e ".[{extras}]"')


def slurm_job(args, job_name: str, train: str) -> str:
  return "\n".join([
      "sbatch <<'EOF'", "#!/bin/bash", f"#SBATCH --job-name={job_name}",
      f"#SBATCH --nodes={args.nodes}", f"#SBATCH --ntasks-per-node={args.gpus_per_node}",
      f"#SBATCH --gpus-per-node={args.gpus_per_node}", f"srun {train}", "EOF"])


def stages(args) -> list[list[str]]:
  """For each stage, one shell command per machine (one in all for a local setup)."""
  runs = members(args)
  if args.target == "gpu-host" and (args.hosts or len(runs) > 1) and len(args.hosts) != len(runs):
    raise ValueError(f"{len(runs)} run(s) to launch on gpu-host need --hosts with one host each, "
                     f"got {len(args.hosts)}; to run a sweep one member after another on this "
                     "host use `python -m experiments.sweeps --run`")
  commands = []
  for stage in args.stages:
    commands.append([])
    for index, (config, seed, argv) in enumerate(runs):
      train = shlex.join((PYTHON,) + tuple(argv[1:]))
      if args.target.startswith("tpu"):
        machine = f"{args.name}-{config.replace('_', '-')}-{seed}" if seed else args.name
        commands[-1].append(tpu_commands(args, stage, machine, f"cd {REPO_DIR} && {train}"))
      elif args.target == "slurm":
        job_name = f"{config}-{seed}" if seed else config
        commands[-1].append(slurm_job(args, job_name, train) if stage == "train"
                            else setup_script(args, remote=False))
      elif args.hosts:
        script = setup_script(args, True) if stage == "setup" else f"cd {REPO_DIR} && {train}"
        commands[-1].append(f"ssh {args.hosts[index]} {shlex.quote(script)}")
      else:
        commands[-1].append(setup_script(args, False) if stage == "setup" else train)
    commands[-1] = list(dict.fromkeys(commands[-1]))
  return commands


def run(commands: list[list[str]]) -> int:
  """Runs each stage's commands at once, stage after stage; the first failure's status stops it
  (75: a run was preempted; launching it again resumes it)."""
  for stage in commands:
    processes = [subprocess.Popen(command, shell=True, cwd=sweeps.REPO_ROOT) for command in stage]
    failed = [code for code in [p.wait() for p in processes] if code]
    if failed:
      return failed[0]
  return 0


def parse(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m experiments.launch",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--target", required=True, choices=list(TARGETS))
  what = parser.add_mutually_exclusive_group(required=True)
  what.add_argument("--config", help="config file[:arg], e.g. configs/imagenet_resnet50.py")
  what.add_argument("--sweep", choices=list(sweeps.SWEEPS), help="every run of a sweep")
  parser.add_argument("--workdir", required=True, help="the run's (or sweep's) workdir, e.g. gs://")
  parser.add_argument("--override", action="append", default=[], help="field=value, repeatable")
  parser.add_argument("--batch_size", type=int, help="global batch; scales the learning rate")
  parser.add_argument("--schedule", choices=sweeps.SCHEDULES, help="sweeps: full or short")
  parser.add_argument("--steps", type=int, default=2_000, help="sweeps: short schedule length")
  parser.add_argument("--seeds", type=int, help="sweeps: runs per config")
  parser.add_argument("--stages", default="train", type=lambda s: s.split(","),
                      help="comma-separated: create (TPU), setup, train")
  parser.add_argument("--name", help="TPU VM or slice name (a prefix in sweeps)")
  parser.add_argument("--zone", help="TPU zone, e.g. us-central2-b")
  parser.add_argument("--accelerator", help="TPU type, e.g. v4-8 (one host), v4-32 (a slice)")
  parser.add_argument("--version", help="TPU VM image (default: by generation)")
  parser.add_argument("--repo", help="git URL the setup stage clones on remote machines")
  parser.add_argument("--python", default="python3.11", help="interpreter that makes .venv")
  parser.add_argument("--hosts", default=[], type=lambda s: s.split(","),
                      help="gpu-host: ssh hosts, one per run")
  parser.add_argument("--nodes", type=int, default=1, help="slurm: nodes")
  parser.add_argument("--gpus_per_node", type=int, default=8,
                      help="slurm: GPUs (and processes) per node")
  action = parser.add_mutually_exclusive_group(required=True)
  action.add_argument("--print", action="store_true", help="print the commands")
  action.add_argument("--run", action="store_true", help="run the commands")
  args = parser.parse_args(argv)
  unknown = sorted(set(args.stages) - set(TARGETS[args.target][1]))
  if unknown:
    parser.error(f"--target={args.target} has no stage(s) {unknown}; "
                 f"choose from {','.join(TARGETS[args.target][1])}")
  tpu = args.target.startswith("tpu")
  known_image = (args.accelerator or "").rsplit("-", 1)[0] in TPU_VERSIONS
  needed = {"name": tpu, "zone": tpu, "accelerator": "create" in args.stages,
            "version": "create" in args.stages and not known_image,
            "repo": "setup" in args.stages and (tpu or args.hosts)}
  missing = [f"--{flag}" for flag, need in needed.items() if need and not getattr(args, flag)]
  if missing:
    parser.error(f"--target={args.target} with --stages={','.join(args.stages)} needs "
                 f"{', '.join(missing)}")
  return args


def main(argv: list[str] | None = None) -> int:
  args = parse(sys.argv[1:] if argv is None else argv)
  try:
    commands = stages(args)
  except ValueError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  if args.run:
    return run(commands)
  for stage in commands:
    print("\n".join(stage))
  return 0


if __name__ == "__main__":
  sys.exit(main())
