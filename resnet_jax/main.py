"""Trains and evaluates a network of the paper.

  python -m resnet_jax.main --config=configs/cifar_resnet110.py --workdir=/tmp/resnet110
  python -m resnet_jax.main --config=configs/cifar_resnet20.py:smoke --workdir=/tmp/smoke

Configs are the files configs/*.py of the repository, one per experiment of the paper
(README.md's table); `:smoke` after the file name makes a 20-step run on synthetic data.
Any config field can be overridden (`--config.batch_size=256`); list them all, with their
values, by `python -m resnet_jax.main --config=configs/cifar_resnet20.py --list_fields`.

Exit status: 0 done; 2 the run could not start (a bad command line or config, a missing
dataset, an unusable workdir) and nothing was trained; 1 the run failed once training had
begun (a non-finite loss, a failing disk, a corrupt image); 75 preempted (SIGTERM): the
step reached was saved, and the same command resumes it.

On a TPU pod slice or a multi-process GPU job every process runs this same
command; `jax.distributed` is initialised from the environment the cluster
provides (or from --coordinator_address, --num_processes, --process_id).
"""

import difflib
import logging as std_logging
import os
import re
import sys
from typing import Iterator, NoReturn

import ml_collections
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

# Exit statuses; a preemption exits with train.PREEMPTED_EXIT_CODE (75).
USAGE_ERROR = 2
RUN_FAILED = 1

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, configs/X.py[:smoke]: one per experiment of the "
    "paper.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory (local or gs://) for everything a run writes.")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", None, "Directory (local or gs://) of jax's persistent compilation cache, "
    "which spares a resumed run the compile of its step (default: $JAX_COMPILATION_CACHE_DIR if "
    "set, else WORKDIR/compilation_cache, which survives a restart as the workdir does; runs of "
    "one model and batch can share one); 'off' for none.")
_LIST_FIELDS = flags.DEFINE_bool(
    "list_fields", False, "Print every field of --config as the --config.FIELD=VALUE flag that "
    "overrides it, and exit.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, for multi-process runs without a cluster "
                                   "environment jax can detect.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in the job.")
_HELP_FLAGS = {"-h", "-?", "--help", "-help", "--helpshort", "-helpshort", "--helpfull",
               "-helpfull"}


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
  if _COORDINATOR.value:
    # Lets CPU devices of several processes join collectives (unused on GPU and TPU).
    # Asking for the backend first would initialise it too early for jax.distributed.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  elif _on_cloud_tpu_vm() or any(key in os.environ for key in (
      "TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")):
    jax.distributed.initialize()  # Cloud TPU, Slurm and Open MPI are detected by jax.


def _use_compilation_cache() -> None:
  import jax
  directory = (_COMPILATION_CACHE.value or jax.config.jax_compilation_cache_dir
               or str(epath.Path(_WORKDIR.value) / "compilation_cache"))
  jax.config.update("jax_compilation_cache_dir", None if directory == "off" else directory)


def _on_cloud_tpu_vm() -> bool:
  # A TPU VM made with gcloud sets no environment variable (GKE sets
  # TPU_WORKER_HOSTNAMES): jax reads the slice from the metadata server. Its chips
  # are /dev/accel* (v2 to v4) or /dev/vfio/<n> (v5e and later). On a single host
  # initialize() finds one process; on a slice it joins every worker, which the
  # synchronised save on preemption needs.
  return (any(epath.Path("/dev").glob("accel*"))
          or any(p.name.isdigit() for p in epath.Path("/dev/vfio").glob("*")))


def _fail(message: str, status: int = USAGE_ERROR) -> NoReturn:
  # One write, starting a fresh line: orbax's background threads may still be printing
  # their own tracebacks to stderr when a failed save ends the run.
  sys.stderr.write(f"\nerror: {message}\n")
  sys.stderr.flush()
  sys.exit(status)


def _config_value(argv: list[str]) -> str | None:
  """The value of --config (`file.py[:arguments]`), as absl will read it from argv."""
  for arg, following in zip(argv, [*argv[1:], None]):
    if arg in ("--config", "-config"):
      return following
    if arg.startswith(("--config=", "-config=")):
      return arg.split("=", 1)[1]
  return None


def _unknown_override(argv: list[str], value: str) -> str | None:
  """The error line for the first `--config.a.b` of argv that names no field of the config."""
  overrides = [match.group(1) for match in map(re.compile(r"--?config\.([^=]+)").match, argv)
               if match]
  if not overrides:
    return None
  try:
    config = flags.FLAGS["config"].parser.parse(value)
  except Exception:  # pylint: disable=broad-except  # The file itself fails: its traceback helps.
    return None
  for override in overrides:
    node, names = config, override.split(".")
    for depth, name in enumerate(names):
      parent = names[:depth]
      if not isinstance(node, ml_collections.ConfigDict):
        return (f"--config.{override}: the config's field {'.'.join(parent)!r} holds {node!r}, "
                "not a group of fields.")
      if name not in node:
        close = difflib.get_close_matches(name, list(node.keys()), n=1)
        hint = f"did you mean --config.{'.'.join([*parent, close[0]])}? " if close else ""
        return (f"--config.{override}: the config has no field {'.'.join([*parent, name])!r}; "
                f"{hint}--list_fields lists them all.")
      node = node[name]
  return None


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, but every bad flag or config file is one line and exit status 2."""
  if _HELP_FLAGS & {*argv[1:]}:  # absl's own --help exits with status 1.
    app.usage(shorthelp=not {"--helpfull", "-helpfull"} & {*argv}, writeto_stdout=True,
              exitcode=0)
  value = _config_value(argv)
  if not value:
    _fail("--config is missing; pass one of the repository's configs/*.py (one per experiment "
          "of the paper), e.g. --config=configs/cifar_resnet20.py.")
  # A config file in a package (configs/ is one) imports its siblings by the package's name
  # (`from configs import cifar_base`): the folder above the package goes first on sys.path, so
  # that the config loads from any working directory.
  package = epath.Path(value.split(":", 1)[0]).absolute().parent
  if (package / "__init__.py").is_file():
    sys.path.insert(0, str(package.parent))
  try:
    argv = flags.FLAGS(argv)
    _CONFIG.value.keys()  # A config file that failed to load raises OSError only when read.
  except (AttributeError, KeyError, TypeError):
    # ml_collections' answers to an override of a field the config lacks.
    message = _unknown_override(argv, value)
    if message is None:  # Not an override: a bug in the config file, whose traceback helps.
      raise
    _fail(message)
  except (flags.Error, OSError, SyntaxError) as error:
    # Config-file errors arrive with their traceback as text; its last line names the problem.
    _fail(str(error).strip().splitlines()[-1].strip())
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])} (flags take the form --name=value).")
  if not _LIST_FIELDS.value and not _WORKDIR.value:
    # An empty --workdir=$UNSET would otherwise write into the current directory.
    _fail("--workdir is missing or empty; pass the directory the run writes to.")
  return argv


def _fields(config: ml_collections.ConfigDict, prefix: str = "--config.") -> Iterator[str]:
  for name, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _fields(value, f"{prefix}{name}.")
    elif value is None:
      yield f"{prefix}{name}=None  # unset; type {config.get_type(name).__name__}"
    else:
      yield f"{prefix}{name}={value}"


def main(argv):
  del argv  # Checked by _parse_flags.
  if _LIST_FIELDS.value:
    print("\n".join(_fields(_CONFIG.value)))
    return
  _quiet_start_up()
  _initialize_distributed()
  _use_compilation_cache()
  from resnet_jax import checkpoints, data, train
  logging.get_absl_handler().addFilter(checkpoints.quiet_orbax_info)
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except train.StartupError as error:
    _fail(str(error), USAGE_ERROR)
  # OSError: a disk failing; CorruptImageError: a bad file met mid-run by the streaming path.
  except (train.NonFiniteError, OSError, data.CorruptImageError) as error:
    _fail(str(error), RUN_FAILED)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
