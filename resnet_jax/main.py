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

from absl import app, flags, logging
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
  elif any(key in os.environ for key in ("TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID",
                                          "OMPI_COMM_WORLD_SIZE")):
    jax.distributed.initialize()  # Cloud TPU, Slurm and Open MPI are detected by jax.


def _quiet_orbax(record) -> bool:
  # Orbax logs every save step at INFO through absl; keep its warnings and errors.
  return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.get_absl_handler().addFilter(_quiet_orbax)
  _initialize_distributed()
  from resnet_jax import train
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (train.StartupError, train.NonFiniteError) as error:
    logging.error("%s", error)
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
