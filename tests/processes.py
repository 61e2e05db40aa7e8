"""Trainer processes for tests: one, or several joined by jax.distributed, and never a hang."""
import dataclasses
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAULTY_TRAINER = os.path.join(REPO, "tests", "faulty_trainer.py")


@dataclasses.dataclass
class Result:
  returncode: int
  stderr: str


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def environment(devices_per_process: int, **extra: str) -> dict[str, str]:
  """os.environ with `devices_per_process` simulated CPU devices and this checkout importable."""
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
  return dict(os.environ, **extra, PYTHONPATH=REPO,
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process} {flags}")


def run(commands: list[list[str]], env: dict[str, str], timeout: float) -> list[Result]:
  """Runs the commands side by side; kills them all and fails the test if any outlives `timeout`."""
  # Files, not pipes: a process blocked on a full pipe could stall its peers' collectives.
  logs = [tempfile.TemporaryFile("w+") for _ in commands]
  processes = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log,
                                text=True) for command, log in zip(commands, logs)]
  deadline = time.monotonic() + timeout
  try:
    for process in processes:
      process.wait(timeout=max(deadline - time.monotonic(), 0))
  except subprocess.TimeoutExpired:
    for process in processes:
      process.kill()
      process.wait()
    pytest.fail(f"hung for {timeout} s: {commands}\n" + "\n---\n".join(
        _read(log)[-3000:] for log in logs))
  return [Result(process.returncode, _read(log)) for process, log in zip(processes, logs)]


def _read(log) -> str:
  log.seek(0)
  return log.read()


def train(workdir, args: list[str], num_processes: int = 1, faults: dict[int, str] | None = None,
          timeout: float = 400, **env: str) -> list[Result]:
  """`python -m resnet_jax.main` as `num_processes` processes of 8 devices in all, on one workdir.

  `faults` maps a process index to the fault tests/faulty_trainer.py injects into it.
  """
  port = free_port()
  commands = []
  for index in range(num_processes):
    fault = (faults or {}).get(index)
    head = [FAULTY_TRAINER, fault] if fault else ["-m", "resnet_jax.main"]
    cluster = ([f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}",
                f"--process_id={index}"] if num_processes > 1 else [])
    commands.append([sys.executable, *head, *args, f"--workdir={workdir}", *cluster])
  return run(commands, environment(8 // num_processes, **env), timeout)


def newest_checkpoint(workdir) -> int | None:
  """The newest complete checkpoint's step (orbax writes into a temporary name, then renames)."""
  directory = os.path.join(workdir, "checkpoints")
  names = os.listdir(directory) if os.path.isdir(directory) else []
  return max((int(name) for name in names if name.isdigit()), default=None)


def checkpointed_state(workdir, step: int):
  """The TrainState saved at `step`, as host numpy arrays whatever devices wrote it."""
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  checkpointer = ocp.PyTreeCheckpointer()
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                          checkpointer.metadata(path).item_metadata.tree)
  return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
