"""Every JAX transformation on every kind of model, in training and in eval mode.

Each transformation is checked against another route to the same number: forward-mode
derivatives (jvp, linearize, jacfwd) against reverse mode, Hessian-vector products
forward-over-reverse against reverse-over-reverse, vmap against a loop, and
rematerialisation against the plain gradient.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from resnet_jax import models
from resnet_jax.models import cpu_kernels

# Every block type, shortcut, stem and bottleneck stride placement, at toy depths and widths.
_tiny = functools.partial(models.ResNet, stage_sizes=(1, 1), stage_widths=(8, 16),
                          imagenet_stem=True, num_classes=10)
MODELS = {
    "cifar_resnet8 (A)": lambda rngs: models.create("cifar_resnet8", num_classes=10, rngs=rngs),
    "cifar_resnet8 (B)": lambda rngs: models.create("cifar_resnet8", num_classes=10,
                                                    shortcut="B", rngs=rngs),
    "cifar_plain8": lambda rngs: models.create("cifar_plain8", num_classes=10, rngs=rngs),
    "cifar_resnet8 pre-activation": lambda rngs: models.create(
        "cifar_resnet8", num_classes=10, preact=True, rngs=rngs),
    "cifar_resnet8 headless": lambda rngs: models.create("cifar_resnet8", num_classes=0,
                                                         rngs=rngs),
    "bottleneck v1.5 (C)": lambda rngs: _tiny(block_cls=functools.partial(
        models.PostActivationBlock, shortcut="C",
        layers=functools.partial(models.bottleneck, stride_on_1x1=False)), rngs=rngs),
    "bottleneck pre-activation (B)": lambda rngs: _tiny(block_cls=functools.partial(
        models.PreActivationBlock, layers=models.bottleneck, shortcut="B"), rngs=rngs),
}


def assert_close(actual, expected, rtol=1e-4, scale=None):
  # Relative to the largest entry (or to `scale`): float32 sums of many products cancel.
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  scale = np.max(np.abs(expected)) if scale is None else scale
  np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


def functional(model, train):
  """(apply(params, images), params): the model as a pure function of its parameters."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def apply(params, images):
    net = nnx.merge(graphdef, params, rest, copy=True)
    net.train() if train else net.eval()  # pylint: disable=expression-not-assigned
    return net(images)

  return apply, params


def random_like(tree, seed):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([jax.random.normal(k, leaf.shape, leaf.dtype)
                            for k, leaf in zip(keys, leaves)])


def vdot(a, b):
  return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def abs_vdot(a, b):
  """The sum of |a * b|: the scale of vdot(a, b)'s rounding error."""
  return vdot(jax.tree.map(jnp.abs, a), jax.tree.map(jnp.abs, b))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(MODELS))
def test_every_transformation(name, train):
  model = MODELS[name](nnx.Rngs(0))
  apply, params = functional(model, train)
  images = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
  loss = lambda params, images=images: jnp.sum(jnp.sin(apply(params, images)))
  direction = random_like(params, 2)

  # grad, against jvp and linearize along a random direction.
  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  primal, tangent = jax.jit(lambda p, d: jax.jvp(loss, (p,), (d,)))(params, direction)
  assert_close(primal, value, 1e-6)
  assert_close(tangent, vdot(grads, direction), scale=abs_vdot(grads, direction))
  linearized = jax.jit(lambda p, d: jax.linearize(loss, p)[1](d))(params, direction)
  assert_close(linearized, tangent, scale=abs_vdot(grads, direction))

  # Hessian-vector products: forward-over-reverse against reverse-over-reverse.
  hvp_forward = jax.jit(lambda p, d: jax.jvp(jax.grad(loss), (p,), (d,))[1])(params, direction)
  hvp_reverse = jax.jit(jax.grad(lambda p, d: vdot(jax.grad(loss)(p), d)))(params, direction)
  for got, want in zip(jax.tree.leaves(hvp_forward), jax.tree.leaves(hvp_reverse)):
    assert_close(got, want, 1e-3)

  # jacfwd against jacrev: outputs with respect to the brightness of each image.
  outputs = lambda scale: apply(params, images * scale[:, None, None, None])
  ones = jnp.ones(len(images))
  assert_close(jax.jit(jax.jacfwd(outputs))(ones), jax.jit(jax.jacrev(outputs))(ones))

  # vmap over single images, against a loop; per-example gradients likewise.
  single = lambda image: apply(params, image[None])[0]
  looped = jnp.stack([jax.jit(single)(image) for image in images])
  assert_close(jax.jit(jax.vmap(single))(images), looped, 1e-5)
  per_example = jax.jit(jax.vmap(jax.grad(lambda p, image: loss(p, image[None])), (None, 0)))(
      params, images)
  first = jax.jit(jax.grad(lambda p: loss(p, images[:1])))(params)
  # vmap sums the batch statistics' gradients in another order: up to 1.25e-5 of the largest
  # entry measured (bottleneck C in training, jax 0.10.2 with numpy 2.4.6).
  for got, want in zip(jax.tree.leaves(per_example), jax.tree.leaves(first)):
    assert_close(got[0], want, 2e-5)

  # Rematerialisation changes nothing but memory, and XLA's fusion, hence float32 rounding
  # (up to 1.7e-6 of the largest entry measured on jax 0.12).
  remat_grads = jax.jit(jax.grad(jax.checkpoint(loss)))(params)
  for got, want in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(grads)):
    assert_close(got, want, 1e-5)


def test_cpu_training_kernels_support_reverse_mode_and_say_forward_mode_is_unsupported(
    convolution_kernel):
  model = models.create("cifar_resnet8", num_classes=10, rngs=nnx.Rngs(0),
                        **cpu_kernels.training_layers("cpu"))
  reference = models.create("cifar_resnet8", num_classes=10, rngs=nnx.Rngs(0))
  images = jax.random.normal(jax.random.key(1), (8, 32, 32, 3))
  apply, params = functional(model, train=True)
  reference_apply, _ = functional(reference, train=True)
  loss = lambda apply, params: jnp.sum(jnp.sin(apply(params, images)))
  expected = jax.grad(functools.partial(loss, reference_apply))(params)
  for transformed in (jax.grad, lambda f: jax.grad(jax.checkpoint(f))):
    grads = transformed(functools.partial(loss, apply))(params)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
      assert_close(got, want, 1e-3)
  per_image = jax.vmap(lambda image: apply(params, image[None])[0])(images)
  assert_close(per_image, jax.vmap(lambda image: reference_apply(params, image[None])[0])(images),
               1e-5)
  # The documented limit of ops's custom VJPs: forward mode raises JAX's own error.
  with pytest.raises(TypeError, match="can't apply forward-mode autodiff"):
    jax.jvp(functools.partial(loss, apply), (params,), (params,))
