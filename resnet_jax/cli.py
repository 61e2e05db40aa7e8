"""What the package's commands share: the workdir and cluster flags, the persistent compilation
cache, a quiet start, one-line errors and their exit statuses.

`python -m resnet_jax.main` (training) and `python -m resnet_jax.evaluate` (a saved run) both
call `define_flags()` as they start: defined at import, the flags would clash with those of
other programs imported into one process (the tests import the evaluator's library beside the
sweeps' command line).
"""

import logging as std_logging
import os
import sys
from typing import NoReturn

from absl import app, flags
from etils import epath

# Exit statuses; a preemption exits with train.PREEMPTED_EXIT_CODE (75).
USAGE_ERROR = 2
RUN_FAILED = 1

# The flags every command takes; each command declares them its key flags, which --help lists.
FLAG_NAMES = ("workdir", "compilation_cache", "coordinator_address", "num_processes", "process_id")


def define_flags() -> None:
  """Defines the flags of FLAG_NAMES (once per process, by the command that runs)."""
  flags.DEFINE_string("workdir", None, "Directory (local or gs://) of the run: everything it "
                      "writes.")
  flags.DEFINE_string(
      "compilation_cache", None, "Directory (local or gs://) of jax's persistent compilation "
      "cache, which spares a resumed run the compile of its step (default: "
      "$JAX_COMPILATION_CACHE_DIR if set, else WORKDIR/compilation_cache, which survives a "
      "restart as the workdir does; runs of one model and batch can share one); 'off' for none.")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process "
                      "runs without a cluster environment jax can detect.")
  flags.DEFINE_integer("num_processes", None, "Number of processes in the job.")
  flags.DEFINE_integer("process_id", None, "This process's index in the job.")


_HELP_FLAGS = {"-h", "-?", "--help", "-help", "--helpshort", "-helpshort", "--helpfull",
               "-helpfull"}


def help_if_asked(argv: list[str]) -> None:
  """Prints the usage and exits 0 if argv asks for help (absl's own --help exits with 1)."""
  if _HELP_FLAGS & {*argv[1:]}:
    app.usage(shorthelp=not {"--helpfull", "-helpfull"} & {*argv}, writeto_stdout=True,
              exitcode=0)


def fail(message: str, status: int = USAGE_ERROR) -> NoReturn:
  """Ends the command with one `error:` line on stderr."""
  # One write, starting a fresh line: orbax's background threads may still be printing
  # their own tracebacks to stderr when a failed save ends the run.
  sys.stderr.write(f"\nerror: {message}\n")
  sys.stderr.flush()
  sys.exit(status)


def start() -> None:
  """Before any work: quiet libraries, join the cluster's processes, set the compilation cache."""
  _quiet_start_up()
  _initialize_distributed()
  _use_compilation_cache()


def _quiet_start_up() -> None:
  """No notices from libraries at start-up, unless the user's environment asks for them."""
  # TensorFlow (the data pipelines' decoder) writes C++ notices to stderr as it is imported,
  # before Python's logging could filter them: CPU-feature notes below log level 1, and oneDNN's
  # notice unless oneDNN is off, which only TF's own convolutions and matmuls (never run here) use.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  # jax's INFO note on each backend it probes and skips: "Unable to initialize backend 'tpu':
  # ... Failed to open libtpu.so" on every machine without a TPU.
  std_logging.getLogger("jax._src.xla_bridge").setLevel(std_logging.WARNING)


def _initialize_distributed() -> None:
  import jax
  if flags.FLAGS.coordinator_address:
    # Lets CPU devices of several processes join collectives (unused on GPU and TPU).
    # Asking for the backend first would initialise it too early for jax.distributed.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(flags.FLAGS.coordinator_address,
                               num_processes=flags.FLAGS.num_processes,
                               process_id=flags.FLAGS.process_id)
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


def _use_compilation_cache() -> None:
  import jax
  directory = (flags.FLAGS.compilation_cache or jax.config.jax_compilation_cache_dir
               or str(epath.Path(flags.FLAGS.workdir) / "compilation_cache"))
  jax.config.update("jax_compilation_cache_dir", None if directory == "off" else directory)
