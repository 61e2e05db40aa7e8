"""Our NNX ResNet inside a Linen model, through `resnet_jax.models.linen.to_linen`."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen, nnx

from resnet_jax.models import linen as resnet_linen
from resnet_jax import models

MODEL = "cifar_resnet8"


class Classifier(linen.Module):
  """A Linen project's model with our network as a submodule."""

  def setup(self):
    self.resnet = resnet_linen.to_linen(MODEL, num_classes=10)

  def __call__(self, x, train: bool):
    return self.resnet(x, train=train)


@nnx.jit  # One compilation instead of one per eager op.
def _nnx_model():
  # rbg keys: XLA takes many seconds to compile threefry's random bits on CPU.
  rngs = nnx.Rngs(jax.random.key(1, impl="rbg"))
  model = models.create(MODEL, num_classes=10, rngs=rngs)
  # Non-trivial running statistics, so eval mode differs from train mode.
  for path, stat in nnx.iter_graph(model):
    if isinstance(stat, nnx.BatchStat):
      noise = jax.random.uniform(rngs(), stat.shape, minval=0.5, maxval=1.5)
      stat.set_value(noise if path[-1] == "var" else noise - 1.0)
  return model


def _variables(model):
  """The NNX model's state as Linen collections of `Classifier`."""
  return {"params": {"resnet": nnx.to_pure_dict(nnx.state(model, nnx.Param))},
          "batch_stats": {"resnet": nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))}}


@nnx.jit
def _nnx_forward(model, x):
  return model(x)


def _inputs():
  return jax.random.normal(jax.random.key(3), (4, 32, 32, 3))


def test_linen_variables_mirror_nnx_state():
  # Shapes only (no compute): the same tree, down to the int keys of nnx.List.
  linen_vars = jax.eval_shape(
      lambda: Classifier().init(jax.random.key(0), _inputs(), train=False))
  nnx_model = nnx.eval_shape(lambda: models.create(MODEL, num_classes=10, rngs=nnx.Rngs(1)))
  assert jax.tree.map(jnp.shape, dict(linen_vars)) == jax.tree.map(
      jnp.shape, _variables(nnx_model))


def test_linen_eval_matches_nnx():
  model = _nnx_model()
  model.eval()
  expected = _nnx_forward(model, _inputs())
  apply = jax.jit(lambda variables, x: Classifier().apply(variables, x, train=False))
  logits = apply(_variables(model), _inputs())
  # Same weights, same ops: only XLA fusion differences remain.
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
  # Sanity: the running statistics are in use (batch statistics give other logits).
  model.train()
  assert np.abs(np.asarray(_nnx_forward(model, _inputs()) - expected)).max() > 1e-2


def test_linen_train_updates_batch_stats_like_nnx():
  model = _nnx_model()
  variables = _variables(model)
  apply = jax.jit(lambda variables, x: Classifier().apply(
      variables, x, train=True, mutable=["batch_stats"]))
  logits, updates = apply(variables, _inputs())
  model.train()
  expected = _nnx_forward(model, _inputs())  # Updates the NNX model's running statistics.

  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
  assert set(updates) == {"batch_stats"}
  before = jax.tree.leaves(variables["batch_stats"])
  after = jax.tree.leaves(updates["batch_stats"])
  assert all(np.abs(np.asarray(a - b)).max() > 1e-4 for a, b in zip(after, before))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               updates["batch_stats"], _variables(model)["batch_stats"])
