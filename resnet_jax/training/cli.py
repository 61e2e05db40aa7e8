"""The package's command line, one layer for every command: flags, config, errors, exit statuses.

Each command (`python -m resnet_jax.main`, `resnet_jax.training.evaluate`,
`resnet_jax.training.compile`, `resnet_jax.tools.prepare`, `resnet_jax.tools.benchmark`,
`resnet_jax.tools.input_benchmark`, `resnet_jax.tools.report`) defines its flags in a function,
checks and runs in `main(argv)`, and ends with

  if __name__ == "__main__":
    cli.run(main, _define_flags)

`run` defines the flags only then: defined at import, they would clash with those of the other
commands imported into one process (the tests import several). It quiets the libraries'
start-up notices (`quiet`) and parses the command line: --help prints the command's doc and
its flags and exits 0; a bad flag, config, override or stray argument is one `error:` line and
exit status 2. Within `main`, `fail` ends the command the same way: USAGE_ERROR (2) for what
stops it before it began, RUN_FAILED (1) for a failure once it had begun; a preempted run
exits with loop.PREEMPTED_EXIT_CODE (75). No mistake of the user's prints a traceback.
"""

import difflib
import importlib
import importlib.machinery
import importlib.util
import logging as std_logging
import os
import pkgutil
import re
import sys
import types
from typing import Callable, NoReturn

import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from etils import epath
from ml_collections import config_flags

USAGE_ERROR = 2  # Nothing was done: a bad command line, config or input.
RUN_FAILED = 1  # The work failed once it had begun.


def run(main: Callable[[list[str]], None], define_flags: Callable[[], None], *,
        arguments: bool = False, optional_config: bool = False) -> NoReturn:
  """Runs a command: `define_flags()`, then `main(argv)` under absl's app.run, and exits.

  Every flag `define_flags` defines (the command's own, and those of `define_config_flag` and
  `define_run_flags` that it calls) is listed by --help. argv is the program alone, or with
  its positional arguments where `arguments` (`main` checks them); otherwise one is an error.
  `optional_config`: the --config of `define_config_flag` may be left out (the command then
  finds `flags.FLAGS.config` None); otherwise its absence is an error.
  """
  quiet()
  defined = set(flags.FLAGS)
  define_flags()
  for name in set(flags.FLAGS) - defined:  # Key flags of the main module, which --help lists.
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])
  app.run(main, flags_parser=lambda argv: _parse(argv, arguments, optional_config))


def _parse(argv: list[str], arguments: bool, optional_config: bool) -> list[str]:
  """absl's flag parsing, but --help exits 0 and every bad command line is one line and status
  2; --config (where defined) loads the config it names and takes its overrides."""
  _help_if_asked(argv)
  config = None
  if "config" in flags.FLAGS:
    argv, config = _take_config(argv, optional_config)
  try:
    if config is not None:
      # The flag anew, as ml_collections' flag of the config: it reads the overrides from argv.
      del flags.FLAGS.config
      config_flags.DEFINE_config_dict("config", config, CONFIG_HELP, sys_argv=argv)
    argv = flags.FLAGS(argv)
  except (AttributeError, KeyError, TypeError):
    # ml_collections' answers to an override of a field the config lacks.
    message = None if config is None else _unknown_override(argv, config)
    if message is None:  # Not an override: a bug, whose traceback helps.
      raise
    fail(message)
  except flags.Error as error:
    fail(str(error).strip().splitlines()[-1].strip())
  if len(argv) > 1 and not arguments:
    fail(f"unexpected arguments: {' '.join(argv[1:])} (flags take the form --name=value).")
  return argv


def fail(message: str, status: int = USAGE_ERROR) -> NoReturn:
  """Ends the command with one `error:` line on stderr and `status`."""
  # One write, starting a fresh line: orbax's background threads may still be printing
  # their own tracebacks to stderr when a failed save ends the run.
  sys.stderr.write(f"\nerror: {message}\n")
  sys.stderr.flush()
  sys.exit(status)


def first_line(error: BaseException) -> str:
  """The first line of an error's message, for an error line that quotes it."""
  return (str(error).splitlines() or [""])[0]


def define_run_flags() -> None:
  """The flags of a command that runs on a workdir, in a cluster's processes (the trainer, the
  evaluator); `start_run` reads them."""
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


CONFIG_HELP = (
    "The experiment's config: a config's name, one per experiment of the paper (e.g. "
    "cifar_resnet110; they ship with the package as resnet_jax.configs, the repository's "
    "configs/), or a config file X.py; `:smoke` after either makes a 20-step run on synthetic "
    "data.")
# The package that a config file's folder is loaded as, whatever the folder's name, so that it
# shadows no module.
CONFIG_FOLDER_PACKAGE = "resnet_jax_config_folder"


def define_config_flag() -> None:
  """--config, the experiment's config, with its --config.FIELD=VALUE overrides.

  Defined as a string for --help; `run` loads the config it names and defines the flag anew as
  ml_collections' flag of that config, which takes the overrides: `flags.FLAGS.config` is then
  the ConfigDict.
  """
  flags.DEFINE_string("config", None, CONFIG_HELP)


def _take_config(argv: list[str], optional: bool
                 ) -> tuple[list[str], ml_collections.ConfigDict | None]:
  """argv without --config (`--config=VALUE` or `--config VALUE`), and the config it names
  (None if there is none and it is `optional`)."""
  for index, arg in enumerate(argv):
    if arg in ("--config", "-config"):
      value, argv = (argv[index + 1] if index + 1 < len(argv) else None,
                     argv[:index] + argv[index + 2:])
      break
    if arg.startswith(("--config=", "-config=")):
      value, argv = arg.split("=", 1)[1], argv[:index] + argv[index + 1:]
      break
  else:
    value = None
  if value is None and optional:
    return argv, None
  if not value:
    fail("--config is missing; pass a config's name, e.g. --config=cifar_resnet20 (README.md "
         "lists them), or a config file.")
  return argv, load_config(value)


def load_config(value: str) -> ml_collections.ConfigDict:
  """The config of `--config=value`: `NAME[:ARG]`, a config of the package (resnet_jax.configs),
  or `FILE.py[:ARG]`; ARG is passed to its get_config."""
  source, *arg = value.split(":", 1)
  module = _config_file(source) if source.endswith(".py") else _named_config(source)
  try:
    return module.get_config(*arg)
  except ValueError as error:  # An argument the config does not take.
    fail(f"--config={value}: {error}")


def config_names() -> list[str]:
  """The configs of the package, one per experiment, which --config takes by name."""
  try:
    from resnet_jax import configs  # pylint: disable=g-import-not-at-top
  except ImportError:
    fail("the package's configs are not installed (in a checkout: pip install -e .); pass a "
         "config file, e.g. --config=configs/cifar_resnet20.py.")
  return sorted(module.name for module in pkgutil.iter_modules(configs.__path__)
                if module.name not in configs.RECIPES)


def _named_config(name: str) -> types.ModuleType:
  names = config_names()
  if name not in names:
    close = difflib.get_close_matches(name, names, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    fail(f"--config={name}: no such config{hint}; the configs are {', '.join(names)} (or a "
         "config file, X.py).")
  return importlib.import_module(f"resnet_jax.configs.{name}")


def _config_file(path: str) -> types.ModuleType:
  """The config file at `path`, imported as a module of its folder, which is loaded as the
  package CONFIG_FOLDER_PACKAGE: the configs import each other relatively, from the
  repository's configs/ as from the installed resnet_jax.configs."""
  file = epath.Path(path).absolute()
  if not file.is_file():
    fail(f"--config={path}: no such file; pass a config's name (e.g. cifar_resnet20) or a "
         "config file.")
  init = file.parent / "__init__.py"
  if init.is_file():
    spec = importlib.util.spec_from_file_location(
        CONFIG_FOLDER_PACKAGE, str(init), submodule_search_locations=[str(file.parent)])
  else:
    spec = importlib.machinery.ModuleSpec(CONFIG_FOLDER_PACKAGE, None, is_package=True)
    spec.submodule_search_locations.append(str(file.parent))
  package = sys.modules[CONFIG_FOLDER_PACKAGE] = importlib.util.module_from_spec(spec)
  try:
    if spec.loader:
      spec.loader.exec_module(package)
    return importlib.import_module(f"{CONFIG_FOLDER_PACKAGE}.{file.stem}")
  except SyntaxError as error:
    fail(f"--config={path}: {error}")


def _unknown_override(argv: list[str], config: ml_collections.ConfigDict) -> str | None:
  """The error line for the first `--config.a.b` of argv that names no field of the config."""
  overrides = [match.group(1) for match in map(re.compile(r"--?config\.([^=]+)").match, argv)
               if match]
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


def _help_if_asked(argv: list[str]) -> None:
  """Prints the usage and exits 0 if argv asks for help (absl's own --help exits with 1)."""
  if _HELP_FLAGS & {*argv[1:]}:
    app.usage(shorthelp=not {"--helpfull", "-helpfull"} & {*argv}, writeto_stdout=True,
              exitcode=0)


def start_run() -> None:
  """For a command of `define_run_flags`, before jax's first use: joins the cluster's processes,
  sets the persistent compilation cache and has CPU steps keep their memory
  (`cpu_kernels.keep_step_memory`)."""
  from resnet_jax.models import cpu_kernels  # pylint: disable=g-import-not-at-top
  _initialize_distributed()
  _use_compilation_cache()
  cpu_kernels.keep_step_memory()


def quiet() -> None:
  """No notices from libraries at start-up, unless the user's environment asks for them, and
  none from libtpu on a host without a TPU; call before jax's first use (`run` does)."""
  _quiet_start_up()
  _quiet_libtpu()


def _quiet_libtpu() -> None:
  """Keeps libtpu from complaining on a host without TPU chips; call before jax's first use.

  jax loads libtpu (the `tpu` extra) on every host where it is installed, and libtpu asks the
  host for its TPU accelerator type and its slice's worker hostnames; a host with no TPU has
  neither, and libtpu prints two warnings and an error on stderr for every process. Such a host
  only ever compiles for a TPU (`resnet_jax.training.compile`): it is told a one-host slice
  of its own, and that several processes may load libtpu at once (its lock file guards TPU
  chips, which a compile-only host does not have). A TPU VM (whose chips are in /dev), or an environment that
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
  absl_logging.get_absl_handler().addFilter(_not_a_skipped_backend)


def _not_a_skipped_backend(record: std_logging.LogRecord) -> bool:
  """False for jax's INFO note on each backend it probes and skips ("Unable to initialize backend
  'tpu': ... Failed to open libtpu.so", on every machine without a TPU); a filter of the handler
  that prints the commands' logs, absl's: a logger's own filter would not see the records of its
  child loggers, the jax modules'."""
  return not (record.levelno < std_logging.WARNING and record.name.split(".")[0] == "jax"
              and record.getMessage().startswith("Unable to initialize backend"))


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
