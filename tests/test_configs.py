"""Every experiment config loads, states the paper's recipe, and trains for a step."""
import importlib
import pathlib

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh

import configs
from resnet_jax import data, models
from resnet_jax.training import optim, loop

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
EXPERIMENTS = sorted(p.stem for p in CONFIG_DIR.glob("*.py")
                     if p.stem != "__init__" and p.stem not in configs.RECIPES)
# Deep ImageNet nets and ResNet-1202 take a minute or more to compile on 2 CPU cores.
SLOW = {"cifar_resnet1202", "imagenet_resnet50", "imagenet_resnet101", "imagenet_resnet152",
        "imagenet_resnet50_goyal8k"}


def load(name, arg=None):
  return importlib.import_module(f"configs.{name}").get_config(arg)


def expected_model(name):
  if name.startswith("cifar"):
    return "cifar_" + name.split("_", 1)[1]
  return name.removeprefix("imagenet_").split("_")[0]


def test_all_paper_experiments_and_cifar100_have_a_config():
  expected = ({f"cifar_resnet{d}" for d in (20, 32, 44, 56, 110, 1202)}
              | {f"cifar_plain{d}" for d in (20, 32, 44, 56, 110)}
              | {f"imagenet_resnet{d}" for d in (18, 34, 50, 101, 152)}
              | {"imagenet_plain18", "imagenet_plain34"}
              | {f"imagenet_resnet34_{o}" for o in "abc"} | {"imagenet_resnet18_a"}
              | {"cifar100_resnet110"}
              | {"imagenet_resnet50_goyal8k"})  # Goyal et al., 2017, at batch 8k.
  assert set(EXPERIMENTS) == expected


def test_goyal_config_states_their_recipe_at_batch_8k():
  config = load("imagenet_resnet50_goyal8k")
  loop.validate(config, AbstractMesh((256,), (data.core.DATA_AXIS,)))
  loop.validate(load("imagenet_resnet50_goyal8k", "smoke"), data.core.make_mesh())
  assert config.model == "resnet50" and config.dataset.name == "imagenet2012"
  # Sec. 2.1, 2.2, 5.1: 0.1 per 256 images, warm-up from 0.1 over 5 epochs, divided by 10 at
  # epochs 30, 60 and 80 of 90; epochs of 1,281,167 images in iterations of 8,192.
  epoch = 1_281_167 / 8_192
  assert config.batch_size == 8_192 and config.learning_rate == pytest.approx(3.2)
  assert (config.lr_warmup_steps, config.lr_warmup_from) == (round(5 * epoch), 0.1) == (782, 0.1)
  assert config.lr_schedule == "piecewise"
  assert tuple(config.lr_boundaries) == tuple(round(e * epoch) for e in (30, 60, 80)) == (
      4_692, 9_384, 12_511)
  assert config.num_train_steps == round(90 * epoch) == 14_075
  # Sec. 2.3, 5.1: n = 32 a worker; momentum 0.9; decay 1e-4, not on BN; zero-initialised last
  # BN of each block; the stride on the 3x3 conv.
  assert config.batch_norm_group == 32
  assert (config.momentum, config.weight_decay, config.weight_decay_batch_norm) == (
      0.9, 1e-4, False)
  assert config.model_overrides.zero_init_last_bn and not config.model_overrides.stride_on_1x1


@pytest.mark.parametrize("name", [n for n in EXPERIMENTS if n != "imagenet_resnet50_goyal8k"])
def test_config_states_the_papers_recipe(name):
  config = load(name)
  optim.validate(config)
  assert config.model == expected_model(name)
  assert config.weight_decay_batch_norm and not config.lr_warmup_steps
  assert (config.learning_rate, config.momentum, config.weight_decay) == (0.1, 0.9, 1e-4)
  if name.startswith("cifar"):
    # Sec. 4.2: batch 128, 0.1 divided by 10 at 32k and 48k, stop at 64k.
    dataset = "cifar100" if name.startswith("cifar100_") else "cifar10"
    assert config.dataset.name == dataset and config.batch_size == 128
    assert config.lr_schedule == "piecewise" and tuple(config.lr_boundaries) == (32_000, 48_000)
    assert config.num_train_steps == 64_000
    warm = name in ("cifar_resnet110", "cifar_resnet1202", "cifar100_resnet110")
    assert config.warmup_learning_rate == (0.01 if warm else 0.0)
    assert config.batch_norm_group == 64  # 128 "on two GPUs".
  else:
    # Sec. 3.4: batch 256, 0.1 divided by 10 on plateaus, up to 60e4 iterations.
    assert config.dataset.name == "imagenet2012" and config.batch_size == 256
    assert config.lr_schedule == "plateau" and config.num_train_steps == 600_000
    assert config.batch_norm_group == 32  # 8 GPUs of 32 (Goyal et al., 2017, Sec. 5.1).
  option = name[-1].upper() if name.endswith(("_a", "_b", "_c")) else None
  assert config.model_overrides.shortcut == option


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in EXPERIMENTS])
def test_config_trains_a_step_on_synthetic_data(name):
  config = load(name, "smoke")
  assert config.dataset.name == "synthetic"
  model = loop.create_model(config, config.dataset.num_classes, 0, "cpu")
  recipe = optim.create(config)
  state = loop.create_train_state(model, recipe)
  assert config.batch_norm_group == 16  # One group of the smoke config's.
  batch = data.Batch(images=jax.random.normal(jax.random.key(0), (16, 32, 32, 3)),
                     labels=jnp.arange(16) % config.dataset.num_classes,
                     mask=jnp.ones((16,), bool))
  # Op by op: XLA's CPU compile of a whole ResNet-152 or ResNet-1202 step takes
  # many minutes; the jitted step itself is exercised by tests/test_train.py.
  with jax.disable_jit():
    state, metrics = loop.train_step(recipe, state, batch)
  assert int(state.step) == 1 and int(state.nonfinite_step) == -1
  assert jnp.isfinite(metrics["loss"])
  assert models.count_params(model) > 0
