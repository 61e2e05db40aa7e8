"""What the package's commands share: the config, workdir and cluster flags, the persistent
compilation cache, a quiet start, one-line errors and their exit statuses.

`python -m resnet_jax.main` (training), `python -m resnet_jax.evaluate` (a saved run) and
`python -m resnet_jax.compile` (a config for a TPU topology) define their flags as they start:
defined at import, the flags would clash with those of other programs imported into one
process (the tests import the evaluator's library beside the sweeps' command line).
"""

import difflib
import logging as std_logging
import os
import re
import sys
from typing import NoReturn

import ml_collections
from absl import app, flags
from etils import epath
from ml_collections import config_flags

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


def define_config_flag() -> flags.FlagHolder:
  """--config, the experiment's config file, with its --config.FIELD=VALUE overrides."""
  return config_flags.DEFINE_config_file(
      "config", None, "Experiment config file, configs/X.py[:smoke]: one per experiment of the "
      "paper.", lock_config=True)


def parse_config_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing for a command with --config (`define_config_flag`), but every bad flag,
  override or config file is one line and exit status 2."""
  help_if_asked(argv)
  value = _config_value(argv)
  if not value:
    fail("--config is missing; pass one of the repository's configs/*.py (one per experiment "
         "of the paper), e.g. --config=configs/cifar_resnet20.py.")
  # A config file in a package (configs/ is one) imports its siblings by the package's name
  # (`from configs import cifar_base`): the folder above the package goes first on sys.path, so
  # that the config loads from any working directory.
  package = epath.Path(value.split(":", 1)[0]).absolute().parent
  if (package / "__init__.py").is_file():
    sys.path.insert(0, str(package.parent))
  try:
    argv = flags.FLAGS(argv)
    flags.FLAGS["config"].value.keys()  # A config file that failed to load raises only when read.
  except (AttributeError, KeyError, TypeError):
    # ml_collections' answers to an override of a field the config lacks.
    message = _unknown_override(argv, value)
    if message is None:  # Not an override: a bug in the config file, whose traceback helps.
      raise
    fail(message)
  except (flags.Error, OSError, SyntaxError) as error:
    # Config-file errors arrive with their traceback as text; its last line names the problem.
    fail(str(error).strip().splitlines()[-1].strip())
  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])} (flags take the form --name=value).")
  return argv


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
  quiet()
  _initialize_distributed()
  _use_compilation_cache()


def quiet() -> None:
  """No notices from libraries at start-up, unless the user's environment asks for them, and
  none from libtpu on a host without a TPU; call before jax's first use."""
  _quiet_start_up()
  _quiet_libtpu()


def _quiet_libtpu() -> None:
  """Keeps libtpu from complaining on a host without TPU chips; call before jax's first use.

  jax loads libtpu (the `tpu` extra) on every host where it is installed, and libtpu asks the
  host for its TPU accelerator type and its slice's worker hostnames; a host with no TPU has
  neither, and libtpu prints two warnings and an error on stderr for every process. Such a host
  only ever compiles for a TPU (`resnet_jax.compile`): it is told a one-host slice of its own,
  and that several processes may load libtpu at once (its lock file guards TPU chips, which a
  compile-only host does not have). A TPU VM (whose chips are in /dev), or an environment that
  sets these variables itself (GKE), is left as it is, so that a real TPU's messages are never
  hidden.
  """
  if _on_cloud_tpu_vm():
    return
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


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
      "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")):
    # Cloud TPU (GKE's TPU_WORKER_HOSTNAMES too, which jax reads only where TPU chips are),
    # Slurm and Open MPI are detected by jax.
    jax.distributed.initialize()


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
