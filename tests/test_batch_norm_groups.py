"""Batch norm over groups of images (`models.BatchNorm`, `batch_norm_group`).

Each group of G consecutive images must be normalised as nnx.BatchNorm normalises that group
alone, in value and gradient to rounding, on one device or sharded over eight, and on two
processes as on one; inference is nnx.BatchNorm's; group 0 is the program that ran before groups
existed.
"""
import functools
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import processes
from configs import cifar_resnet20, imagenet_base
from resnet_jax.training import checkpoints, optim, loop
from resnet_jax import data, models
from resnet_jax.models import cpu_kernels

CHANNELS = 6
SCALE, BIAS = jnp.linspace(0.5, 2.0, CHANNELS), jnp.linspace(-1.0, 1.0, CHANNELS)


def make(cls, dtype=jnp.float32, **options):
  """A batch norm of CHANNELS features with non-trivial running averages (as the models bind)."""
  bn = cls(CHANNELS, momentum=0.9, epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32,
           rngs=nnx.Rngs(0), **options)
  bn.mean[...] = jnp.full((CHANNELS,), 0.3)
  bn.var[...] = jnp.full((CHANNELS,), 2.0)
  return bn


def images(shape, dtype=jnp.float32, seed=0):
  # Far from zero mean, so that the fast variance's cancellation is exercised.
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * 3 + 1, dtype)


def train_mode(bn, x, scale, bias):
  """(y, running mean, running var) of one training-mode call of `bn` with these parameters."""
  bn.scale[...], bn.bias[...] = scale, bias
  y = bn(x)
  return y, bn.mean[...], bn.var[...]


def grouped(cls, group_size, dtype, x, scale, bias):
  return train_mode(make(cls, dtype, group_size=group_size), x, scale, bias)


def by_hand(group_size, dtype, x, scale, bias):
  """nnx.BatchNorm on each group's slice alone, concatenated; the running averages of the
  group-by-group modules, averaged over the groups."""
  outputs = [train_mode(make(nnx.BatchNorm, dtype), x[start:start + group_size], scale, bias)
             for start in range(0, x.shape[0], group_size)]
  ys, means, variances = zip(*outputs)
  return jnp.concatenate(ys), jnp.mean(jnp.stack(means), 0), jnp.mean(jnp.stack(variances), 0)


def loss_and_stats(normalize, x, scale, bias):
  y, mean, var = normalize(x, scale, bias)
  # Non-linear and weighted per channel, so that every gradient term is exercised.
  weights = jnp.arange(1, CHANNELS + 1)
  return jnp.sum(jnp.sin(y.astype(jnp.float32)) * weights), (y, mean, var)


def assert_close(actual, expected, tolerance, name=""):
  # Relative to the largest entry, as tests/test_ops.py: sums cancel near zero.
  expected = np.asarray(expected, np.float32)
  np.testing.assert_allclose(np.asarray(actual, np.float32), expected, rtol=0,
                             atol=tolerance * float(np.max(np.abs(expected))), err_msg=name)


@pytest.mark.parametrize("dtype,tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 2 ** -6)],
                         ids=["float32", "bfloat16"])
@pytest.mark.parametrize("group_size", [2, 4, 8])
def test_each_group_is_normalised_as_nnx_batch_norm_of_that_group_alone(
    dtype, tolerance, group_size):
  x = images((8, 3, 3, CHANNELS), dtype)
  gradient = lambda normalize: jax.jit(jax.grad(
      functools.partial(loss_and_stats, normalize), argnums=(0, 1, 2), has_aux=True))
  got_grads, got = gradient(functools.partial(grouped, models.BatchNorm, group_size, dtype))(
      x, SCALE, BIAS)
  want_grads, want = gradient(functools.partial(by_hand, group_size, dtype))(x, SCALE, BIAS)
  assert got[0].dtype == dtype
  for name, actual, expected in zip(("y", "running mean", "running var"), got, want):
    assert_close(actual, expected, tolerance, name)
  for name, actual, expected in zip(("dx", "dscale", "dbias"), got_grads, want_grads):
    assert_close(actual, expected, 4 * tolerance, name)
  # Groups normalise apart: the whole batch's statistics would give another output.
  whole = train_mode(make(nnx.BatchNorm, dtype), x, SCALE, BIAS)
  if group_size < x.shape[0]:
    assert not np.allclose(np.asarray(got[0], np.float32), np.asarray(whole[0], np.float32),
                           atol=0.05)
    # The running mean is the batch mean either way; the variance is the groups' mean one.
    assert_close(got[1], whole[1], tolerance)
    assert np.all(np.asarray(got[2]) < np.asarray(whole[2]))


def test_inference_is_nnx_batch_norm_and_leaves_the_running_averages():
  x = images((4, 3, 3, CHANNELS))
  reference, bn = make(nnx.BatchNorm), make(models.BatchNorm, group_size=2)
  np.testing.assert_array_equal(bn(x, use_running_average=True),
                                reference(x, use_running_average=True))
  bn.eval()
  np.testing.assert_array_equal(bn(x[:3]), reference(x[:3], use_running_average=True))
  np.testing.assert_array_equal(bn.mean[...], np.float32(0.3))
  np.testing.assert_array_equal(bn.var[...], np.float32(2.0))


def test_a_batch_that_is_not_whole_groups_is_refused():
  with pytest.raises(ValueError, match="a batch of 6 does not split into batch norm groups of 4"):
    make(models.BatchNorm, group_size=4)(images((6, 2, 2, CHANNELS)))
  with pytest.raises(ValueError, match="group_size must be positive"):
    make(models.BatchNorm, group_size=-2)


def _collective_sizes(hlo: str) -> list[int]:
  """Elements of each array a collective of the compiled module moves."""
  sizes = []
  for line in hlo.splitlines():
    match = re.search(r"= \(?([^=]*?)\)? (all-reduce|all-gather|all-to-all|reduce-scatter|"
                      r"collective-permute)(-start)?\(", line)
    if match:
      sizes += [math.prod(int(d) for d in dims.split(",") if d)
                for dims in re.findall(r"\[([\d,]*)\]", match.group(1))]
  return sizes


@pytest.mark.parametrize("group_size", [2, 8])  # 2 a device (16 over 8), or across 4 devices.
def test_sharded_over_eight_devices_as_on_one(group_size):
  assert jax.device_count() == 8
  mesh = data.core.make_mesh()
  graphdef, state = nnx.split(make(models.BatchNorm, group_size=group_size))

  def forward(state, x):
    bn = nnx.merge(graphdef, state)
    return bn(x), nnx.state(bn)

  x = images((16, 4, 4, CHANNELS))
  y, stats = jax.jit(forward)(state, x)
  sharded = jax.jit(forward).lower(
      jax.device_put(state, NamedSharding(mesh, PartitionSpec())),
      jax.device_put(x, data.core.batch_sharding(mesh))).compile()
  y_sharded, stats_sharded = sharded(jax.device_put(state, NamedSharding(mesh, PartitionSpec())),
                                     jax.device_put(x, data.core.batch_sharding(mesh)))
  assert y_sharded.sharding.spec == PartitionSpec(data.core.DATA_AXIS)
  assert_close(y_sharded, y, 1e-6)
  for name in ("mean", "var"):
    assert_close(stats_sharded[name][...], stats[name][...], 1e-6)
  if group_size == 2:
    # Each device normalises its own groups: the only traffic is the running averages' mean
    # over groups, one value per channel of each.
    assert set(_collective_sizes(sharded.as_text())) == {CHANNELS}


def _train_step_program(config, model, batch) -> str:
  """The jaxpr of the trainer's step for `model`: what XLA compiles."""
  recipe = optim.create(config)
  state = loop.create_train_state(model, recipe)
  return str(jax.make_jaxpr(functools.partial(loop.train_step, recipe))(state, batch))


@pytest.mark.parametrize("platform", ["cpu", "gpu"])  # cpu_kernels.Conv, and flax's.
def test_group_0_is_the_whole_batch_code(platform):
  config = cifar_resnet20.get_config("smoke")
  config.update(model="cifar_resnet8", batch_norm_group=0)
  batch = data.Batch(images=images((8, 32, 32, 3)), labels=jnp.arange(8) % 10,
                     mask=jnp.ones((8,), bool))
  model = loop.create_model(config, 10, 0, platform)
  # What the trainer built before batch norm groups: nnx.BatchNorm (and cpu_kernels.Conv on CPU).
  before = models.create(config.model, num_classes=10, rngs=nnx.Rngs(0),
                         **cpu_kernels.training_layers(platform))
  assert {type(n) for n in (model.stem_norm, before.stem_norm)} == {models.BatchNorm, nnx.BatchNorm}
  # The same program, so bitwise the same step.
  assert _train_step_program(config, model, batch) == _train_step_program(config, before, batch)


def test_the_trainer_builds_its_norms_with_the_configs_groups():
  config = cifar_resnet20.get_config()
  assert config.batch_norm_group == 64  # Sec. 4.2: 128 "on two GPUs".
  assert imagenet_base.get_config("resnet50").batch_norm_group == 32  # Goyal et al.: 8 x 32.
  assert cifar_resnet20.get_config("smoke").batch_norm_group == 16
  config.model = "cifar_resnet8"
  for platform in ("cpu", "tpu"):
    norms = [node for _, node in nnx.iter_graph(loop.create_model(config, 10, 0, platform))
             if isinstance(node, nnx.BatchNorm)]
    assert len(norms) == 7 and all(type(n) is models.BatchNorm and n.group_size == 64
                                   for n in norms)


def test_a_batch_that_is_not_whole_groups_fails_at_start_up():
  config = cifar_resnet20.get_config()
  loop.validate(config, data.core.make_mesh())
  config.batch_size = 96
  with pytest.raises(ValueError, match=re.escape(
      "batch_size 96 is not a whole number of batch norm groups of 64 images; use a multiple of "
      "64 (e.g. --config.batch_size=128) or a --config.batch_norm_group that divides it.")):
    loop.validate(config, data.core.make_mesh())
  config.batch_norm_group = 32
  loop.validate(config, data.core.make_mesh())
  config.batch_norm_group = -1
  with pytest.raises(ValueError, match="batch_norm_group must be positive, or 0"):
    loop.validate(config, data.core.make_mesh())


def test_groups_change_neither_the_checkpoint_layout_nor_the_run_identity():
  mesh = data.core.make_mesh()
  configs = [cifar_resnet20.get_config(), cifar_resnet20.get_config()]
  configs[1].batch_norm_group = 0
  # What a checkpoint holds: every leaf's path, shape, dtype and sharding.
  layouts = [jax.tree_util.tree_flatten_with_path(
      loop.abstract_train_state(c, 10, mesh, optim.create(c)))[0] for c in configs]
  assert layouts[0] == layouts[1] and len(layouts[0]) > 50
  # A run may resume with other groups: they are how it trains, not what it trains.
  assert checkpoints.run_identity(configs[0], 10) == checkpoints.run_identity(configs[1], 10)


@pytest.mark.slow  # About a minute: two trainer runs, each compiling its steps.
def test_two_processes_normalise_the_groups_as_one(tmp_path, compilation_cache):
  # Groups of 8 in a batch of 32 on 8 devices of 4 images: each group spans two devices of one
  # process, so each process must feed the rows one process would have put there, in order
  # (batch norm over the whole batch would not tell).
  args = ["--config=configs/cifar_resnet20.py:smoke", "--config.model=cifar_resnet8",
          "--config.batch_norm_group=8", "--config.num_train_steps=2",
          "--config.lr_boundaries=(1,)", "--config.log_every_steps=1",
          "--config.eval_every_steps=2", "--config.checkpoint_every_steps=2"]
  runs = {}
  for num_processes in (1, 2):
    workdir = tmp_path / f"processes{num_processes}"
    for result in processes.train(workdir, args, num_processes, **compilation_cache):
      assert result.returncode == 0, result.stderr[-3000:]
    runs[num_processes] = workdir
  losses = {n: [record["loss"] for record in map(json.loads, (w / "metrics.jsonl").read_text()
                                                   .splitlines()) if record["kind"] == "train"]
            for n, w in runs.items()}
  assert len(losses[1]) == 2
  np.testing.assert_allclose(losses[2], losses[1], rtol=5e-5)
  states = {n: processes.checkpointed_state(w, 2) for n, w in runs.items()}
  for part in ("params", "batch_stats"):
    leaves = [jax.tree.leaves(states[n][part]) for n in (1, 2)]
    assert len(leaves[0]) == len(leaves[1]) > 10
    for one, two in zip(*leaves):
      # Sums across processes (gloo) are taken in another order: float32 rounding.
      np.testing.assert_allclose(two, one, rtol=1e-4, atol=1e-5)
