"""Trains and evaluates a network of the paper.

  python -m resnet_jax.main --config=configs/cifar_resnet110.py --workdir=/tmp/resnet110
  python -m resnet_jax.main --config=configs/cifar_resnet20.py:smoke --workdir=/tmp/smoke

Config fields can be overridden on the command line (`--config.batch_size=256`).
On a TPU pod slice or a multi-process GPU job every process runs this same
command; `jax.distributed` is initialised from the environment the cluster
provides (or from --coordinator_address, --num_processes, --process_id).
"""

import os
import sys
from typing import NoReturn

from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory (local or gs://) for everything a run writes.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, for multi-process runs without a cluster "
                                   "environment jax can detect.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in the job.")
flags.mark_flags_as_required(["config", "workdir"])


def _initialize_distributed() -> None:
  import jax
  if _COORDINATOR.value:
    # Lets CPU devices of several processes join collectives (unused on GPU and TPU).
    # Asking for the backend first would initialise it too early for jax.distributed.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  elif _on_cloud_tpu_vm() or any(key in os.environ for key in (
      "TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")):
    jax.distributed.initialize()  # Cloud TPU, Slurm and Open MPI are detected by jax.


def _on_cloud_tpu_vm() -> bool:
  # A TPU VM made with gcloud sets no environment variable (GKE sets
  # TPU_WORKER_HOSTNAMES): jax reads the slice from the metadata server. Its chips
  # are /dev/accel* (v2 to v4) or /dev/vfio/<n> (v5e and later). On a single host
  # initialize() finds one process; on a slice it joins every worker, which the
  # synchronised save on preemption needs.
  return (any(epath.Path("/dev").glob("accel*"))
          or any(p.name.isdigit() for p in epath.Path("/dev/vfio").glob("*")))


def _fail(message: str) -> NoReturn:
  # One write, starting a fresh line: orbax's background threads may still be printing
  # their own tracebacks to stderr when a failed save ends the run.
  sys.stderr.write(f"\nerror: {message}\n")
  sys.stderr.flush()
  sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, but every bad flag or config file is one line and exit status 2."""
  try:
    argv = flags.FLAGS(argv)
    _CONFIG.value.keys()  # A config file that failed to load raises OSError only when read.
  except (AttributeError, KeyError) as error:
    # ml_collections' answer to an override of a field the config lacks: KeyError("'name'").
    name = str(error).strip("\"'")
    flag = next((arg.split("=")[0] for arg in argv if arg.split("=")[0].endswith(f".{name}")), None)
    if flag is None:  # Not an override: a bug in the config file, whose traceback helps.
      raise
    _fail(f"{flag}: the config has no field {name!r}; see the config file for the valid fields.")
  except (flags.Error, OSError, SyntaxError) as error:
    # Config-file errors arrive with their traceback as text; its last line names the problem.
    _fail(str(error).strip().splitlines()[-1].strip())
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])} (flags take the form --name=value).")
  if not _WORKDIR.value:  # --workdir=$UNSET would otherwise write into the current directory.
    _fail("--workdir is empty; pass the directory the run writes to.")
  return argv


def main(argv):
  del argv  # Checked by _parse_flags.
  _initialize_distributed()
  from resnet_jax import checkpoints, data, train
  logging.get_absl_handler().addFilter(checkpoints.quiet_orbax_info)
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  # OSError: a disk failing; CorruptImageError: a bad file met mid-run by the streaming path.
  except (train.StartupError, train.NonFiniteError, OSError, data.CorruptImageError) as error:
    logging.error("%s", error)
    _fail(str(error))


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
