"""The paper's schedules at their boundaries, the warm-up switch and weight decay."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import cifar_resnet110, cifar_resnet20, imagenet_resnet50
from resnet_jax import optim


def test_cifar_schedule_divides_by_10_at_32k_and_48k():
  config = cifar_resnet20.get_config()
  rates = {step: float(optim.learning_rate(config, step, True))
           for step in (0, 31_999, 32_000, 47_999, 48_000, 63_999)}
  assert rates == pytest.approx({0: 0.1, 31_999: 0.1, 32_000: 0.01, 47_999: 0.01,
                                 48_000: 0.001, 63_999: 0.001})


def test_resnet110_warm_up_holds_0_01_until_the_switch():
  config = cifar_resnet110.get_config()
  assert float(optim.learning_rate(config, 10, False)) == pytest.approx(0.01)
  assert float(optim.learning_rate(config, 10, True)) == pytest.approx(0.1)
  # After the switch the ordinary schedule applies, boundaries included.
  assert float(optim.learning_rate(config, 40_000, True)) == pytest.approx(0.01)


def _one_update(config, grads, params, loss=1.0, step=0):
  tx = optim.create(config)
  opt_state = optim.set_learning_rate(tx.init(params),
                                      optim.learning_rate(config, step, True))
  updates, _ = tx.update(grads, opt_state, params, value=jnp.asarray(loss))
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
  tx = optim.create(config)
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
  tx = optim.create(config)
  params = {"w": jnp.ones(())}
  state = tx.init(params)
  scales = []
  for _ in range(12):
    _, state = tx.update({"w": jnp.zeros(())}, state, params, value=jnp.asarray(1.0))
    scales.append(float(optim.plateau_scale(config, state)))
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
  state = optim.create(config).init({"w": jnp.ones(3)})
  state = optim.set_learning_rate(state, 0.25)
  assert optax.tree_utils.tree_get(state, "learning_rate") == 0.25
  assert optax.tree_utils.tree_get(state, "momentum") == pytest.approx(0.9)
  if schedule == "plateau":
    state = optax.tree_utils.tree_set(state, scale=jnp.asarray(0.5))
  assert optim.plateau_scale(config, state) == (0.5 if schedule == "plateau" else 1.0)


@pytest.mark.parametrize("chain,count", [
    (optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1)), 0),
    (optax.chain(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
                 optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)), 2)],
    ids=["missing", "ambiguous"])
def test_a_chain_without_exactly_one_learning_rate_is_refused(chain, count):
  state = chain.init({"w": jnp.ones(3)})
  with pytest.raises(KeyError, match=f"holds {count} values named 'learning_rate', not one"):
    optim.set_learning_rate(state, 0.1)
  config = imagenet_resnet50.get_config()
  with pytest.raises(KeyError, match="holds 0 values named 'ReduceLROnPlateauState'"):
    optim.plateau_scale(config, state)
