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
import re
import sys
from typing import Iterator

import ml_collections
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from resnet_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, configs/X.py[:smoke]: one per experiment of the "
    "paper.", lock_config=True)
_LIST_FIELDS = flags.DEFINE_bool(
    "list_fields", False, "Print every field of --config as the --config.FIELD=VALUE flag that "
    "overrides it, and exit.")
cli.define_flags()
for _name in cli.FLAG_NAMES:
  flags.declare_key_flag(_name)


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
  cli.help_if_asked(argv)
  value = _config_value(argv)
  if not value:
    cli.fail("--config is missing; pass one of the repository's configs/*.py (one per experiment "
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
    cli.fail(message)
  except (flags.Error, OSError, SyntaxError) as error:
    # Config-file errors arrive with their traceback as text; its last line names the problem.
    cli.fail(str(error).strip().splitlines()[-1].strip())
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])} (flags take the form --name=value).")
  if not _LIST_FIELDS.value and not flags.FLAGS.workdir:
    # An empty --workdir=$UNSET would otherwise write into the current directory.
    cli.fail("--workdir is missing or empty; pass the directory the run writes to.")
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
  cli.start()
  from resnet_jax import checkpoints, data, train
  logging.get_absl_handler().addFilter(checkpoints.quiet_orbax_info)
  try:
    train.train_and_evaluate(_CONFIG.value, flags.FLAGS.workdir)
  except train.StartupError as error:
    cli.fail(str(error), cli.USAGE_ERROR)
  # OSError: a disk failing; CorruptImageError: a bad file met mid-run by the streaming path.
  except (train.NonFiniteError, OSError, data.CorruptImageError) as error:
    cli.fail(str(error), cli.RUN_FAILED)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
