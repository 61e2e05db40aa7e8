"""Trains and evaluates a network of the paper.

  python -m resnet_jax.main --config=cifar_resnet110 --workdir=/tmp/resnet110
  python -m resnet_jax.main --config=cifar_resnet20:smoke --workdir=/tmp/smoke

--config names one of the configs that ship with the package, one per experiment of the paper
(README.md's table; the repository's configs/*.py), or a config file (configs/X.py); `:smoke`
after either makes a 20-step run on synthetic data. Any config field can be overridden
(`--config.batch_size=256`); list them all, with their values, by
`python -m resnet_jax.main --config=cifar_resnet20 --list_fields`.

Exit status: 0 done; 2 the run could not start (a bad command line or config, a missing
dataset, an unusable workdir) and nothing was trained; 1 the run failed once training had
begun (a non-finite loss, a failing disk, a corrupt image, its workdir taken over by another
run while it was stopped); 75 preempted (SIGTERM): the step reached was saved, and the same
command resumes it.

On a TPU pod slice or a multi-process GPU job every process runs this same
command; `jax.distributed` is initialised from the environment the cluster
provides (or from --coordinator_address, --num_processes, --process_id).
"""

from typing import Iterator

import ml_collections
from absl import flags, logging

from resnet_jax.training import cli


def _define_flags() -> None:
  cli.define_config_flag()
  flags.DEFINE_bool("list_fields", False, "Print every field of --config as the "
                    "--config.FIELD=VALUE flag that overrides it, and exit.")
  cli.define_run_flags()


def _fields(config: ml_collections.ConfigDict, prefix: str = "--config.") -> Iterator[str]:
  for name, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _fields(value, f"{prefix}{name}.")
    elif value is None:
      yield f"{prefix}{name}=None  # unset; type {config.get_type(name).__name__}"
    else:
      yield f"{prefix}{name}={value}"


def main(argv: list[str]) -> None:
  del argv  # No positional arguments (cli.run).
  if flags.FLAGS.list_fields:
    print("\n".join(_fields(flags.FLAGS.config)))
    return
  if not flags.FLAGS.workdir:
    # An empty --workdir=$UNSET would otherwise write into the current directory.
    cli.fail("--workdir is missing or empty; pass the directory the run writes to.")
  cli.start_run()
  from resnet_jax.training import checkpoints, claim, loop  # pylint: disable=g-import-not-at-top
  from resnet_jax import data  # pylint: disable=g-import-not-at-top
  logging.get_absl_handler().addFilter(checkpoints.quiet_orbax_info)
  try:
    loop.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
  except loop.StartupError as error:
    cli.fail(str(error), cli.USAGE_ERROR)
  # OSError: a disk failing; CorruptImageError: a bad file met mid-run by the streaming path.
  except (loop.NonFiniteError, OSError, data.CorruptImageError, claim.LostClaimError) as error:
    cli.fail(str(error), cli.RUN_FAILED)


if __name__ == "__main__":
  cli.run(main, _define_flags)
