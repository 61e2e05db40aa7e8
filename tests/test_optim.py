"""The paper's schedules at their boundaries, the warm-up switch and weight decay."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flax import nnx

from configs import cifar_resnet110, cifar_resnet20, imagenet_resnet50, imagenet_resnet50_goyal8k
from resnet_jax import models
from resnet_jax.training import optim


def test_cifar_schedule_divides_by_10_at_32k_and_48k():
  recipe = optim.create(cifar_resnet20.get_config())
  warmup = recipe.init_warmup()  # ResNet-20 has none: over before it starts.
  rates = {step: float(recipe.learning_rate(step, warmup))
           for step in (0, 31_999, 32_000, 47_999, 48_000, 63_999)}
  assert rates == pytest.approx({0: 0.1, 31_999: 0.1, 32_000: 0.01, 47_999: 0.01,
                                 48_000: 0.001, 63_999: 0.001})


def test_gradual_warm_up_rises_linearly_from_its_start_then_follows_the_schedule():
  config = imagenet_resnet50_goyal8k.get_config()
  optim.validate(config)
  recipe = optim.create(config)
  warmup = recipe.init_warmup()  # No ResNet-110 warm-up: over before it starts.
  steps = (0, 1, 391, 781, 782, 783, 4_691, 4_692, 9_383, 9_384, 12_510, 12_511, 14_074)
  rates = {step: float(recipe.learning_rate(step, warmup)) for step in steps}
  traced = jax.jit(lambda step: recipe.learning_rate(step, warmup))
  assert [float(traced(step)) for step in steps] == pytest.approx(list(rates.values()), rel=1e-6)
  # Goyal et al., Sec. 2.2: from 0.1 at iteration 0, the same increment each iteration, 3.2 at
  # the end of 5 epochs (782 iterations); then divided by 10 at epochs 30, 60 and 80.
  increment = (3.2 - 0.1) / 782
  assert rates == pytest.approx({
      0: 0.1, 1: 0.1 + increment, 391: 0.1 + 391 * increment, 781: 3.2 - increment,
      782: 3.2, 783: 3.2, 4_691: 3.2, 4_692: 0.32, 9_383: 0.32, 9_384: 0.032,
      12_510: 0.032, 12_511: 0.0032, 14_074: 0.0032}, rel=1e-6)
  assert rates[391] == pytest.approx(1.65, rel=1e-6)  # Halfway: the mean of 0.1 and 3.2.


@pytest.mark.parametrize("overrides,message", [
    ({"lr_warmup_steps": -1}, "lr_warmup_steps must be non-negative"),
    ({"lr_warmup_steps": 4_693}, r"lr_warmup_steps=4693 reaches past the first of lr_boundaries "
                                 r"\(4692\): the warm-up must end before the schedule moves on; "
                                 "use at most 4692"),
    ({"lr_warmup_from": -0.1}, "lr_warmup_from must be non-negative"),
    ({"warmup_learning_rate": 0.01}, "are two warm-ups; set one of them to 0"),
    ({"lr_boundaries": (), "num_train_steps": 500}, r"reaches past num_train_steps \(500\)"),
])
def test_a_gradual_warm_up_that_cannot_run_is_refused(overrides, message):
  config = imagenet_resnet50_goyal8k.get_config()
  config.update(overrides)
  with pytest.raises(ValueError, match=message):
    optim.validate(config)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("field", ["learning_rate", "momentum", "weight_decay", "lr_decay",
                                   "warmup_learning_rate", "warmup_until_train_error",
                                   "lr_warmup_from"])
def test_a_float_that_is_not_finite_is_refused(field, value):
  config = cifar_resnet20.get_config()
  config[field] = value
  with pytest.raises(ValueError, match=f"^{field} must be a finite number, got {value}.$"):
    optim.validate(config)


def _batch_norm_parameters(model) -> set[tuple]:
  """Paths of the scale and shift of every nnx.BatchNorm of `model`, found by type."""
  modules = [path for path, node in nnx.iter_graph(model) if isinstance(node, nnx.BatchNorm)]
  return {path + (name,) for path in modules for name in ("scale", "bias")}


@pytest.mark.parametrize("overrides", [{"shortcut": "B"}, {"preact": True}])
@pytest.mark.parametrize("decay_batch_norm", [True, False])
def test_weight_decay_leaves_batch_norm_alone_only_if_asked(overrides, decay_batch_norm):
  config = cifar_resnet20.get_config()
  config.weight_decay_batch_norm = decay_batch_norm
  # Projection shortcuts' BN; or pre-activation input and final BNs.
  model = models.create("cifar_resnet8", num_classes=10, rngs=nnx.Rngs(0), **overrides)
  params = jax.tree.map(lambda leaf: leaf + 0.5, nnx.state(model, nnx.Param))  # No zeros.
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  new = _one_update(config, zero_grads, params)
  decayed = set()
  for (path, before), after in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                   jax.tree.leaves(new), strict=True):
    if not np.array_equal(before, after):
      # One step of decay, 1e-5 of each weight; float32 rounds to about 1e-7.
      np.testing.assert_allclose(after, before * (1 - 0.1 * 1e-4), rtol=1e-6)
      decayed.add(tuple(key.key for key in path[:-1]))  # Less the Variable's value.
  every = {tuple(path) for path, _ in nnx.to_flat_state(params)}
  batch_norm = _batch_norm_parameters(model)
  names = {key for path in batch_norm for key in path if isinstance(key, str)}
  assert names >= ({"projection_norm"} if "shortcut" in overrides else {"input_norm", "final_norm"})
  assert batch_norm < every
  assert decayed == (every if decay_batch_norm else every - batch_norm)


def run_warmup(config, errors):
  """The warm-up state after each iteration with these batch errors (fractions)."""
  recipe = optim.create(config)
  update = jax.jit(recipe.update_warmup)
  warmup, states = recipe.init_warmup(), []
  for step, error in enumerate(errors):
    warmup = update(warmup, step, error)
    states.append(warmup)
  return states


def end_step(states) -> int:
  return int(states[-1].end_step)


def test_resnet110_warm_up_ends_when_the_mean_of_the_last_100_batches_is_below_80_percent():
  config = cifar_resnet110.get_config()
  assert config.warmup_window == 100 and config.warmup_until_train_error == 0.8
  # Errors falling steadily from 100% to 65% over 400 iterations: the window's mean crosses 80%
  # at the iteration numpy finds, and not before.
  errors = np.linspace(1.0, 0.65, 400, dtype=np.float32)
  means = np.convolve(errors, np.ones(100) / 100, mode="valid")  # means[i]: iterations i..i+99
  expected = 100 + int(np.argmax(means < 0.8))
  states = run_warmup(config, errors)
  assert end_step(states) == expected == 279
  assert float(states[-1].end_error) == pytest.approx(means[expected - 100], abs=1e-6)
  assert [bool(s.over) for s in states].index(True) == expected - 1
  # The rate is 0.01 for every iteration before the switch, the schedule's 0.1 after it.
  recipe = optim.create(config)
  rates = [float(recipe.learning_rate(step + 1, state)) for step, state in enumerate(states)]
  assert rates[:expected - 1] == pytest.approx([0.01] * (expected - 1))
  assert rates[expected - 1:] == pytest.approx([0.1] * (400 - expected + 1))


@pytest.mark.parametrize("lucky", [
    [0.0],  # one batch with every image right
    [0.5] * 10,  # ten batches in a row 10 standard deviations below the rest
])
def test_a_run_of_lucky_batches_does_not_end_the_warm_up(lucky):
  config = cifar_resnet110.get_config()
  errors = [0.85] * 150 + lucky + [0.85] * 50
  assert end_step(run_warmup(config, errors)) == -1


def test_the_warm_up_waits_for_a_full_window_and_never_restarts():
  config = cifar_resnet110.get_config()
  # Below 80% from the first batch: over once 100 batches were seen, not at the first.
  assert end_step(run_warmup(config, [0.7] * 100)) == 100
  assert end_step(run_warmup(config, [0.7] * 99)) == -1
  # Over is over: errors above 80% again do not bring 0.01 back.
  states = run_warmup(config, [0.7] * 100 + [0.95] * 200)
  assert end_step(states) == 100 and all(bool(s.over) for s in states[99:])


def test_without_a_warm_up_rate_there_is_no_warm_up():
  config = cifar_resnet20.get_config()
  assert not config.warmup_learning_rate
  states = run_warmup(config, [1.0] * 5)
  assert all(bool(s.over) and int(s.end_step) == 0 for s in states)
  assert float(optim.create(config).learning_rate(0, states[0])) == pytest.approx(0.1)


def _one_update(config, grads, params, loss=1.0, step=0):
  recipe = optim.create(config)
  opt_state = optim.set_learning_rate(recipe.tx.init(params),
                                      recipe.learning_rate(step, recipe.init_warmup()))
  updates, _ = recipe.tx.update(grads, opt_state, params, value=jnp.asarray(loss))
  return optax.apply_updates(params, updates)


def test_weight_decay_applies_to_every_parameter():
  config = cifar_resnet20.get_config()
  params = {"conv": {"kernel": jnp.full((3, 3), 2.0)},
            "bn": {"scale": jnp.full((4,), 3.0), "bias": jnp.full((4,), -1.0)}}
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  new = _one_update(config, zero_grads, params)
  # With a zero gradient the first step is p - lr * wd * p = p * (1 - 1e-5).
  jax.tree.map(lambda n, p: np.testing.assert_allclose(n, p * (1 - 0.1 * 1e-4), rtol=1e-7),
               new, params)


def test_sgd_momentum_matches_pytorch_convention():
  config = cifar_resnet20.get_config()
  config.weight_decay = 0.0
  tx = optim.create(config).tx
  params = {"w": jnp.ones(())}
  state = optim.set_learning_rate(tx.init(params), 0.1)
  grads = {"w": jnp.ones(())}
  for _ in range(2):
    updates, state = tx.update(grads, state, params, value=jnp.asarray(1.0))
    params = optax.apply_updates(params, updates)
  # v1 = 1, v2 = 0.9 + 1 = 1.9; w = 1 - 0.1 * (1 + 1.9).
  np.testing.assert_allclose(params["w"], 1 - 0.1 * 2.9, rtol=1e-6)


def test_plateau_schedule_divides_by_10_when_the_loss_stops_falling():
  config = imagenet_resnet50.get_config()
  config.plateau_accumulation_steps, config.plateau_patience = 2, 1
  recipe = optim.create(config)
  tx = recipe.tx
  params = {"w": jnp.ones(())}
  state = tx.init(params)
  scales = []
  for _ in range(12):
    _, state = tx.update({"w": jnp.zeros(())}, state, params, value=jnp.asarray(1.0))
    scales.append(float(recipe.plateau_scale(state)))
  # A flat loss: the first window sets the best value, each later flat window
  # (patience 1) divides by 10, down to the 1e-4 floor.
  np.testing.assert_allclose(scales, [1, 1, 1, 0.1, 0.1, 1e-2, 1e-2, 1e-3, 1e-3, 1e-4, 1e-4, 1e-4],
                             rtol=1e-5)


def test_schedule_that_ends_before_it_starts_is_refused():
  config = cifar_resnet20.get_config()
  config.num_train_steps = 30_000
  with pytest.raises(ValueError, match="ends before it starts"):
    optim.validate(config)
  config.num_train_steps = 0
  with pytest.raises(ValueError, match="num_train_steps must be positive"):
    optim.validate(config)


@pytest.mark.parametrize("schedule", ["piecewise", "plateau"])
def test_the_rate_and_the_plateau_scale_are_found_by_name(schedule):
  config = imagenet_resnet50.get_config()
  config.lr_schedule = schedule
  recipe = optim.create(config)
  state = optim.set_learning_rate(recipe.tx.init({"w": jnp.ones(3)}), 0.25)
  assert optax.tree_utils.tree_get(state, "learning_rate") == 0.25
  assert optax.tree_utils.tree_get(state, "momentum") == pytest.approx(0.9)
  if schedule == "plateau":
    state = optax.tree_utils.tree_set(state, scale=jnp.asarray(0.5))
  assert recipe.plateau_scale(state) == (0.5 if schedule == "plateau" else 1.0)


@pytest.mark.parametrize("chain,count", [
    (optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1)), 0),
    (optax.chain(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
                 optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)), 2)],
    ids=["missing", "ambiguous"])
def test_a_chain_without_exactly_one_learning_rate_is_refused(chain, count):
  state = chain.init({"w": jnp.ones(3)})
  with pytest.raises(KeyError, match=f"holds {count} values named 'learning_rate', not one"):
    optim.set_learning_rate(state, 0.1)
  recipe = optim.create(imagenet_resnet50.get_config())
  with pytest.raises(KeyError, match="holds 0 values named 'ReduceLROnPlateauState'"):
    recipe.plateau_scale(state)
