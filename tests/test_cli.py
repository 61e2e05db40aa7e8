"""`python -m resnet_jax.main` as a user meets it: --help, --list_fields, typos, exit statuses.

Each test runs the trainer from a directory outside the repository, with only the package
importable, laid out as an install lays it out (configs/ as resnet_jax.configs), so the configs
must load from anywhere.
"""
import os
import subprocess
import sys

import pytest

import configs
import processes

CONFIGS = os.path.join(processes.REPO, "configs")
SMOKE = f"--config={CONFIGS}/cifar_resnet20.py:smoke"


def trainer(tmp_path, *args: str, unset: tuple[str, ...] = (), **env: str
            ) -> subprocess.CompletedProcess:
  """The trainer run in `tmp_path`, importing this checkout's package and nothing else of it."""
  site = tmp_path / "site"
  if not site.exists():
    (site / "resnet_jax").mkdir(parents=True)
    for name in os.listdir(os.path.join(processes.REPO, "resnet_jax")):
      (site / "resnet_jax" / name).symlink_to(os.path.join(processes.REPO, "resnet_jax", name))
    (site / "resnet_jax" / "configs").symlink_to(CONFIGS)
  env = dict(processes.environment(8), PYTHONPATH=str(site), **env)
  for name in unset:
    env.pop(name, None)
  return subprocess.run([sys.executable, "-m", "resnet_jax.main", *args], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=300)


def lines(text: str) -> list[str]:
  return [line for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("flag", ["--help", "-h", "--helpfull"])
def test_help_exits_0_and_says_where_the_configs_are_and_how_to_list_their_fields(tmp_path, flag):
  completed = trainer(tmp_path, flag)
  assert completed.returncode == 0, completed.stderr
  assert "--config names one of the configs that ship with the package" in completed.stdout
  assert "--config=cifar_resnet20 --list_fields" in completed.stdout
  assert "Exit status: 0 done; 2 the run could not start" in completed.stdout


def test_list_fields_prints_each_field_as_the_flag_that_overrides_it(tmp_path):
  completed = trainer(tmp_path, f"--config={CONFIGS}/cifar_resnet110.py", "--list_fields")
  assert completed.returncode == 0 and completed.stderr == "", completed.stderr
  fields = completed.stdout.splitlines()
  for field in ["--config.batch_size=128", "--config.lr_boundaries=(32000, 48000)",
                "--config.warmup_learning_rate=0.01", "--config.dataset.name=cifar10",
                "--config.model_overrides.preact=False", "--config.dtype=None  # unset; type str"]:
    assert field in fields
  # Every line but the unset ones is a valid override, and overriding by all of them changes nothing.
  overrides = [field for field in fields if "# unset" not in field]
  again = trainer(tmp_path, f"--config={CONFIGS}/cifar_resnet110.py", *overrides, "--list_fields")
  assert again.returncode == 0 and again.stdout == completed.stdout, again.stderr


@pytest.mark.parametrize("arg", ["", ":smoke"])
def test_a_config_by_name_is_the_config_file_of_that_name(tmp_path, arg):
  by_name = trainer(tmp_path, f"--config=cifar_resnet110{arg}", "--list_fields")
  by_file = trainer(tmp_path, f"--config={CONFIGS}/cifar_resnet110.py{arg}", "--list_fields")
  assert by_name.returncode == 0 and by_name.stderr == "", by_name.stderr
  assert by_name.stdout == by_file.stdout


def test_an_unknown_config_name_is_one_line_that_lists_the_names_and_status_2(tmp_path):
  completed = trainer(tmp_path, "--config=cifar_resnt20", f"--workdir={tmp_path}/w")
  experiments = sorted(name.removesuffix(".py") for name in os.listdir(CONFIGS)
                       if name.endswith(".py") and name.removesuffix(".py") not in (
                           "__init__", *configs.RECIPES))
  assert completed.returncode == 2
  assert lines(completed.stderr) == [
      "error: --config=cifar_resnt20: no such config (did you mean cifar_resnet20?); the "
      f"configs are {', '.join(experiments)} (or a config file, X.py)."]
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("override,field,suggestion", [
    ("batchsize", "batchsize", "batch_size"),
    ("dataset.seeed", "dataset.seeed", "dataset.seed"),
    ("model_overrides.preactt", "model_overrides.preactt", "model_overrides.preact")])
def test_near_miss_field_name_is_one_line_with_the_suggestion_and_status_2(
    tmp_path, override, field, suggestion):
  completed = trainer(tmp_path, SMOKE, f"--workdir={tmp_path}/w", f"--config.{override}=3")
  assert completed.returncode == 2
  assert lines(completed.stderr) == [
      f"error: --config.{override}: the config has no field {field!r}; did you mean "
      f"--config.{suggestion}? --list_fields lists them all."]
  assert not (tmp_path / "w").exists()


def test_start_up_error_is_printed_once_without_tensorflow_or_libtpu_notices(tmp_path):
  # TFDS's CIFAR-10 in an empty folder: jax probes its backends (a TPU first, without
  # JAX_PLATFORMS) and TensorFlow is imported before the error.
  (tmp_path / "empty").mkdir()
  completed = trainer(tmp_path, SMOKE, f"--workdir={tmp_path}/w", "--config.dataset.name=cifar10",
                      f"--config.dataset.data_dir={tmp_path}/empty",
                      unset=("JAX_PLATFORMS", "TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS",
                             "TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES",
                             "ALLOW_MULTIPLE_LIBTPU_LOAD"))
  assert completed.returncode == 2, completed.stderr
  error, *others = lines(completed.stderr)[::-1]
  assert error.startswith("error: TFDS dataset 'cifar10' is not prepared in"), completed.stderr
  assert completed.stderr.count("is not prepared in") == 1
  # All that may precede it: the run's opening line, and TFDS's warning about the very folder
  # the error names.
  assert [line for line in others
          if "has no dataset_info.json" not in line and "] run: cifar_resnet20 for 20" not in line
          ] == []


def test_a_run_that_fails_after_it_started_exits_1(tmp_path, compilation_cache):
  completed = trainer(tmp_path, SMOKE, f"--workdir={tmp_path}/w", "--config.model=cifar_resnet8",
                      "--config.learning_rate=1e12", "--config.num_train_steps=4",
                      "--config.lr_boundaries=(3,)", "--config.log_every_steps=1",
                      **compilation_cache)
  assert completed.returncode == 1, completed.stderr[-3000:]
  assert lines(completed.stderr)[-1].startswith("error: non-finite loss, gradient or weights at step ")
  assert completed.stderr.count("non-finite loss, gradient or weights") == 1
  assert "Traceback" not in completed.stderr
  assert not (tmp_path / "w" / "claim").exists()  # Released by a failed run too.


@pytest.mark.slow
def test_persistent_compilation_cache_in_the_workdir_serves_the_resumed_run(tmp_path):
  cache_settings = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  args = [SMOKE, "--config.model=cifar_resnet8", "--config.lr_boundaries=(1,)",
          "--config.eval_every_steps=4", "--config.checkpoint_every_steps=2"]
  workdir = tmp_path / "run"

  def compile_line(*more):
    run = trainer(tmp_path, *args, f"--workdir={workdir}", *more,
                  unset=("JAX_COMPILATION_CACHE_DIR",), **cache_settings)
    assert run.returncode == 0, run.stderr[-3000:]
    (line,) = [line for line in run.stderr.splitlines() if "] compile: " in line]
    return line.split("] ", 1)[1]

  cache = workdir / "compilation_cache"
  assert compile_line("--config.num_train_steps=2").endswith(
      f"(compiled, and stored in the persistent compilation cache {cache})")
  assert any(cache.iterdir())
  assert compile_line("--config.num_train_steps=4").endswith(
      f"(loaded from the persistent compilation cache {cache})")

  # Off with one flag: the resumed run compiles, and nothing is cached anywhere.
  cache_files = sorted(cache.iterdir())
  assert compile_line("--config.num_train_steps=6", "--compilation_cache=off").endswith(
      "(no persistent compilation cache)")
  assert sorted(cache.iterdir()) == cache_files

  # Elsewhere, e.g. one cache shared by a sweep's runs.
  shared = tmp_path / "shared_cache"
  assert compile_line("--config.num_train_steps=8", f"--compilation_cache={shared}").endswith(
      f"(compiled, and stored in the persistent compilation cache {shared})")
  assert any(shared.iterdir())
