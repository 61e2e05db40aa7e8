"""resnet_jax.models.cpu_kernels: the CPU convolution has exactly the reference values and gradients; the CPU compiler options are oneDNN's where XLA has it; keep_step_memory sets malloc and jax as it says."""
import functools
import importlib.metadata
import itertools
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

import processes
from resnet_jax import models
from resnet_jax.models import analysis, cpu_kernels

NHWC = ("NHWC", "HWIO", "NHWC")


def conv_grads(conv, x, w, strides, padding, dimension_numbers=NHWC, jit=True):
  """Output and (dx, dw) of a non-linear loss of `conv`, so dy differs at every position."""
  def loss(x, w):
    y = conv(x, w, strides, padding, dimension_numbers=dimension_numbers)
    return jnp.sum(jnp.sin(y.astype(jnp.float32))), y
  grad = jax.grad(loss, argnums=(0, 1), has_aux=True)
  (dx, dw), y = (jax.jit(grad) if jit else grad)(x, w)
  return y, dx, dw


def random_inputs(shape_x, shape_w, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal(shape_x, np.float32), dtype)
  w = jnp.asarray(rng.standard_normal(shape_w, np.float32), dtype)
  return x, w


def assert_close(actual, expected, rtol):
  # Relative to the largest entry: sums of products cancel, so entry-wise
  # relative error is meaningless near zero.
  scale = float(jnp.max(jnp.abs(expected.astype(jnp.float32))))
  np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32),
                             rtol=0, atol=rtol * scale)


CASES = [
    # (kernel, stride, padding, spatial size, c_in, c_out)
    *[(k, s, ((p, p), (p, p)), size, 5, 6)
      for k, s, p, size in itertools.product((1, 3, 7), (1, 2), (0, 1, 3), (8, 9))
      if size + 2 * p >= k],
    (3, 1, ((1, 1), (1, 1)), 32, 16, 16),  # CIFAR stage 1.
    (3, 2, ((1, 1), (1, 1)), 32, 16, 32),  # CIFAR downsampling conv.
    (1, 2, ((0, 0), (0, 0)), 16, 32, 64),  # ImageNet projection shortcut.
    (7, 2, ((3, 3), (3, 3)), 20, 3, 8),  # ImageNet stem.
    (3, 1, ((1, 0), (0, 2)), 7, 4, 3),  # Asymmetric padding.
    (3, 1, ((1, 0), (0, 2)), 7, 3, 4),  # The same, dW taking lax's form (fewer channels in).
    (3, 2, "SAME", 9, 4, 3),
    (3, 1, "VALID", 9, 4, 3),
]


@pytest.mark.parametrize("kernel,stride,padding,size,c_in,c_out", CASES)
def test_gradients_equal_lax(kernel, stride, padding, size, c_in, c_out, convolution_kernel):
  x, w = random_inputs((3, size, size, c_in), (kernel, kernel, c_in, c_out))
  strides = (stride, stride)
  y_ref, dx_ref, dw_ref = conv_grads(lax.conv_general_dilated, x, w, strides, padding)
  y, dx, dw = conv_grads(cpu_kernels.conv_general_dilated, x, w, strides, padding)
  assert y.shape == y_ref.shape and dw.shape == w.shape and dw.dtype == w.dtype
  # XLA's forms give lax's forward pass, hence dy, exactly; oneDNN's differs from it by float32
  # rounding, which the loss's sine passes on to dy, hence to dx and dW (up to 2.3e-5 of the
  # largest entry measured). Each of oneDNN's passes alone is lax's to float32 rounding: the
  # test below.
  tolerance = 1e-6 if convolution_kernel == "xla" else 5e-5
  assert_close(y, y_ref, tolerance)
  assert_close(dx, dx_ref, tolerance)
  assert_close(dw, dw_ref, max(tolerance, 1e-5))


@pytest.mark.parametrize("kernel,stride,padding,size,c_in,c_out", CASES)
def test_each_onednn_pass_is_lax_s(kernel, stride, padding, size, c_in, c_out):
  if not cpu_kernels.has_onednn():
    pytest.skip("no oneDNN convolutions here (resnet_jax.models._onednn, onednn-cpu-gomp)")
  x, w = random_inputs((3, size, size, c_in), (kernel, kernel, c_in, c_out))
  strides = (stride, stride)
  if isinstance(padding, str):
    padding = tuple(lax.padtype_to_pads(x.shape[1:3], w.shape[:2], strides, padding))
  y, vjp = jax.vjp(lambda x, w: lax.conv_general_dilated(x, w, strides, padding,
                                                         dimension_numbers=NHWC), x, w)
  dy = jnp.asarray(np.random.default_rng(1).standard_normal(y.shape, np.float32))
  dx, dw = vjp(dy)
  # Sums of the same products in another order: up to 1.2e-6 of the largest entry measured.
  assert_close(jax.jit(cpu_kernels.onednn_forward, static_argnums=(2, 3))(x, w, strides, padding),
               y, 2e-6)
  assert_close(jax.jit(cpu_kernels.onednn_input_gradient, static_argnums=(2, 3, 4))(
      dy, w, x.shape, strides, padding), dx, 2e-6)
  assert_close(jax.jit(cpu_kernels.onednn_weight_gradient, static_argnums=(2, 3, 4))(
      x, dy, w.shape[:2], strides, padding), dw, 1e-5)


@pytest.mark.parametrize("x_as_input", [True, False])
@pytest.mark.parametrize("kernel,stride,padding,size,c_in,c_out", [
    (3, 1, ((1, 1), (1, 1)), 9, 5, 6),
    (3, 2, ((1, 1), (1, 1)), 9, 6, 5),
    (7, 2, ((3, 3), (3, 3)), 20, 3, 8),
    (3, 1, ((1, 0), (0, 2)), 7, 4, 3),
    (3, 3, ((2, 0), (1, 1)), 11, 2, 4),
])
def test_either_form_of_the_weight_gradient_is_lax_s(kernel, stride, padding, size, c_in, c_out,
                                                     x_as_input):
  x, w = random_inputs((3, size, size, c_in), (kernel, kernel, c_in, c_out))
  strides = (stride, stride)
  y, vjp = jax.vjp(lambda w: lax.conv_general_dilated(x, w, strides, padding,
                                                      dimension_numbers=NHWC), w)
  dy = jnp.asarray(np.random.default_rng(1).standard_normal(y.shape, np.float32))
  dw = cpu_kernels.weight_gradient(x, dy, w.shape, strides, padding, x_as_input=x_as_input)
  assert_close(dw, vjp(dy)[0], 1e-5)


def test_gradients_equal_lax_without_jit():
  x, w = random_inputs((2, 9, 9, 3), (3, 3, 3, 4))
  ref = conv_grads(lax.conv_general_dilated, x, w, (2, 2), ((1, 1), (1, 1)), jit=False)
  got = conv_grads(cpu_kernels.conv_general_dilated, x, w, (2, 2), ((1, 1), (1, 1)), jit=False)
  for actual, expected in zip(got, ref):
    assert_close(actual, expected, 1e-5)


@pytest.mark.parametrize("stride", [1, 2])
def test_bfloat16_gradients(stride, convolution_kernel):
  x, w = random_inputs((4, 16, 16, 8), (3, 3, 8, 16), jnp.bfloat16)
  padding = ((1, 1), (1, 1))
  _, dx_ref, dw_ref = conv_grads(lax.conv_general_dilated, x, w, (stride, stride), padding)
  _, dx, dw = conv_grads(cpu_kernels.conv_general_dilated, x, w, (stride, stride), padding)
  assert dx.dtype == dw.dtype == jnp.bfloat16
  # Exact to bfloat16 rounding: both are rounded from float32-accumulated sums.
  assert_close(dx, dx_ref, 2 ** -7)
  assert_close(dw, dw_ref, 2 ** -7)


@pytest.mark.parametrize("x_shape,w_shape,kwargs", [
    ((2, 9, 9, 4), (3, 3, 4, 6), dict(rhs_dilation=(2, 2))),
    ((2, 9, 9, 4), (3, 3, 4, 6), dict(lhs_dilation=(2, 2))),
    ((2, 9, 9, 4), (3, 3, 2, 6), dict(feature_group_count=2)),
    ((2, 4, 9, 9), (6, 4, 3, 3), dict(dimension_numbers=("NCHW", "OIHW", "NCHW"))),
])
def test_other_convolutions_are_lax(x_shape, w_shape, kwargs):
  kwargs = {"dimension_numbers": NHWC, **kwargs}
  x, w = random_inputs(x_shape, w_shape)
  trace = lambda conv: jax.make_jaxpr(
      lambda x, w: conv(x, w, (1, 1), ((1, 1), (1, 1)), **kwargs))(x, w)
  assert str(trace(cpu_kernels.conv_general_dilated)) == str(trace(lax.conv_general_dilated))


def test_training_layers_put_the_cpu_kernels_in_the_model_and_only_there():
  assert cpu_kernels.training_layers("cpu") == {"conv": cpu_kernels.Conv}  # CPU
  model = models.create("cifar_resnet8", num_classes=10, rngs=nnx.Rngs(0),
                        **cpu_kernels.training_layers("cpu"))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  default = models.create("cifar_resnet8", num_classes=10, rngs=nnx.Rngs(0))

  def loss(params, images, graphdef=graphdef, rest=rest):
    net = nnx.merge(graphdef, params, rest, copy=True)
    net.train()
    return jnp.mean(net(images) ** 2)

  images = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3), np.float32))
  assert "custom_vjp_call" in str(jax.make_jaxpr(loss)(params, images))
  default_graphdef, default_params, default_rest = nnx.split(default, nnx.Param, ...)
  default_loss = functools.partial(loss, graphdef=default_graphdef, rest=default_rest)
  assert "custom_vjp_call" not in str(jax.make_jaxpr(default_loss)(default_params, images))
  # Same initial weights, same loss and gradients up to float32 rounding.
  grads = jax.jit(jax.grad(loss))(params, images)
  default_grads = jax.jit(jax.grad(default_loss))(default_params, images)
  assert_close(loss(params, images), default_loss(default_params, images), 1e-5)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(default_grads)):
    assert_close(got, want, 1e-3)
  # The custom VJP leaves the forward convolutions, hence the MAC count, as they were:
  # stem, then per stage two 3x3 convs (the first strided after stage 1), and the head.
  macs = 32 * 32 * 16 * 27 + 2 * 32 * 32 * 16 * 144
  macs += 16 * 16 * 32 * (16 * 9 + 32 * 9) + 8 * 8 * 64 * (32 * 9 + 64 * 9) + 64 * 10
  assert analysis.count_macs(model, (32, 32, 3)) == macs


def test_the_onednn_weight_gradient_is_built_wherever_its_library_is_installed():
  # setup.py builds resnet_jax.models._onednn where pyproject.toml's build requirements are (x86-64
  # Linux), and `resnet_jax[train]` installs oneDNN's library there: an install that has the one
  # has the other, unless the optional build failed.
  try:
    importlib.metadata.version("onednn-cpu-gomp")
  except importlib.metadata.PackageNotFoundError:
    pytest.skip("onednn-cpu-gomp is not installed")
  assert cpu_kernels.has_onednn()


def test_convolutions_take_onednn_only_in_float32_and_in_a_process_of_one_cpu_device(
    monkeypatch):
  if not cpu_kernels.has_onednn():
    pytest.skip("no oneDNN convolutions here (resnet_jax.models._onednn, onednn-cpu-gomp)")
  x, w = random_inputs((2, 8, 8, 4), (3, 3, 4, 8))

  def calls(dtype):
    grad = jax.grad(lambda x, w: jnp.sum(cpu_kernels.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=NHWC).astype(jnp.float32)), argnums=(0, 1))
    jaxpr = str(jax.make_jaxpr(grad)(x.astype(dtype), w.astype(dtype)))
    return [jaxpr.count(f"resnet_jax_onednn_{name}")
            for name in ("forward", "input_gradient", "weight_gradient")]

  assert len(jax.devices("cpu")) == 8 and calls(jnp.float32) == [0, 0, 0]  # XLA may split x.
  monkeypatch.setattr(cpu_kernels, "_one_cpu_device", lambda: True)
  assert calls(jnp.float32) == [1, 1, 1] and calls(jnp.bfloat16) == [0, 0, 0]


def test_a_process_of_one_cpu_device_trains_on_onednn_s_convolutions():
  if not cpu_kernels.has_onednn():
    pytest.skip("no oneDNN weight gradient here (resnet_jax.models._onednn, onednn-cpu-gomp)")
  program = """
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from resnet_jax import models
from resnet_jax.models import cpu_kernels
images = np.random.default_rng(0).standard_normal((4, 32, 32, 3), np.float32)
grads = []
for layers in (cpu_kernels.training_layers("cpu"), {}):
  model = models.create("cifar_resnet8", num_classes=10, rngs=nnx.Rngs(0), **layers)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  def loss(params, images, graphdef=graphdef, rest=rest):
    net = nnx.merge(graphdef, params, rest, copy=True)
    net.train()
    return (jnp.sin(net(images)) ** 2).mean()
  step = jax.jit(jax.grad(loss), compiler_options=cpu_kernels.compiler_options("cpu"))
  text = step.lower(params, images).as_text()
  calls = [text.count(f"resnet_jax_onednn_{name}") for name in ("forward", "weight_gradient")]
  grads.append((calls, step(params, images)))
(calls, onednn), (_, flax) = grads
error = max(float(abs(a - b).max() / abs(b).max())
            for a, b in zip(jax.tree.leaves(onednn), jax.tree.leaves(flax)))
print(len(jax.devices("cpu")), *calls, error)
"""
  env = {**os.environ, "XLA_FLAGS": ""}
  done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                        env=env, timeout=300, check=True)
  devices, forward, weight_gradient, error = done.stdout.split()
  # One of each per convolution of cifar_resnet8 (the stem's and two in each of three stages);
  # the gradients are flax's model's, up to float32 rounding.
  assert (devices, forward, weight_gradient) == ("1", "7", "7") and float(error) < 1e-4, (
      done.stdout)


def onednn_rewrites(compiled) -> bool:
  return "__onednn$convolution" in compiled.as_text()


def test_cpu_compiler_options_are_onednn_s_where_xla_has_it_else_no_ynnpack():
  """Where XLA has the oneDNN rewriter: it, beside YNNPACK's fusions for training and in their
  place for inference. Elsewhere: no YNNPACK fusions for either."""
  x, w = random_inputs((8, 16, 16, 32), (3, 3, 32, 32))
  conv = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC)
  compiled = lambda options: jax.jit(conv, compiler_options=options).lower(x, w).compile()
  no_ynnpack = {"xla_cpu_experimental_ynn_fusion_type": ""}
  onednn = {"xla_cpu_experimental_onednn_custom_call": True}
  options = cpu_kernels.compiler_options("cpu")
  inference = cpu_kernels.compiler_options("cpu", training=False)
  if onednn_rewrites(compiled({**no_ynnpack, **onednn})):
    assert options == onednn and inference == {**no_ynnpack, **onednn}
    assert onednn_rewrites(compiled(inference))
  else:  # jaxlib 0.10.2: the default routes this convolution to YNNPACK; the options keep it out.
    assert options == inference == no_ynnpack
    assert "ynn_fusion" in compiled(None).as_text()
    assert "ynn_fusion" not in compiled(options).as_text()
  for chosen in (options, inference):
    assert_close(compiled(chosen)(x, w), compiled(None)(x, w), 1e-6)
  assert cpu_kernels.compiler_options("tpu") is None
  assert cpu_kernels.compiler_options("tpu", training=False) is None


def test_no_convolution_of_a_cpu_training_step_is_left_to_xla_s_own_kernels_where_onednn_is():
  """With the CPU options, each convolution of a training gradient of the CPU layers, a strided
  option-B projection included, runs on oneDNN or in a YNNPACK fusion, none on XLA's own
  kernels: the strided input gradients are stride-1 convolutions by phase (lax's own would be
  base-dilated, which the rewriter refuses); and each of inference on oneDNN. On a jaxlib
  without the rewriter (0.10.2) none is rewritten, and all are XLA's own."""
  options = cpu_kernels.compiler_options("cpu")
  model = models.create("cifar_resnet8", num_classes=10, rngs=nnx.Rngs(0), shortcut="B",
                        **cpu_kernels.training_layers("cpu"))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params, images):
    net = nnx.merge(graphdef, params, rest, copy=True)
    net.train()
    return jnp.mean(net(images) ** 2)

  images = jnp.zeros((8, 32, 32, 3))
  text = jax.jit(jax.grad(loss), compiler_options=options).lower(params, images).compile().as_text()
  if "xla_cpu_experimental_onednn_custom_call" not in options:
    assert "__onednn$convolution" not in text and "ynn_fusion" not in text
    return
  assert "__onednn$convolution" in text and "lhs_dilate" not in text
  # The computations that YNNPACK's fusions call; every other convolution would be XLA's own.
  ynnpack = set(re.findall(r"calls=%?([\w.\-]+)[^\n]*__ynn_fusion", text))
  for computation in re.split(r"\n(?=(?:ENTRY )?%?[\w.\-]+ \()", text):
    name = re.match(r"(?:ENTRY )?%?([\w.\-]+)", computation).group(1)
    assert name in ynnpack or " convolution(" not in computation, name

  def infer(params, images):
    net = nnx.merge(graphdef, params, rest, copy=True)
    net.eval()
    return net(images)

  # Inference: oneDNN takes every convolution (its options have no YNNPACK fusions).
  text = jax.jit(infer, compiler_options=cpu_kernels.compiler_options("cpu", training=False)
                 ).lower(params, images).compile().as_text()
  assert text.count("__onednn$convolution") == 9 and " convolution(" not in text


@pytest.mark.parametrize("kernel,stride,padding,size", [
    (3, 2, ((1, 1), (1, 1)), 8), (3, 2, ((1, 1), (1, 1)), 9), (1, 2, ((0, 0), (0, 0)), 8),
    (7, 2, ((3, 3), (3, 3)), 11), (3, 3, ((1, 1), (1, 1)), 10), (2, 2, ((0, 1), (1, 0)), 7),
    (1, 3, ((0, 0), (0, 0)), 7)])
def test_the_strided_input_gradient_by_phase_is_lax_s_without_dilation(kernel, stride, padding, size):
  x, w = random_inputs((2, size, size, 3), (kernel, kernel, 3, 4))
  strides = (stride, stride)
  y, vjp = jax.vjp(lambda x: lax.conv_general_dilated(x, w, strides, padding,
                                                      dimension_numbers=NHWC), x)
  dy = jnp.asarray(np.random.default_rng(1).standard_normal(y.shape, np.float32))
  x_type = jax.ShapeDtypeStruct(x.shape, x.dtype)
  dx = cpu_kernels.input_gradient(dy, w, x_type, strides, padding)
  assert dx.shape == x.shape and dx.dtype == x.dtype
  assert_close(dx, vjp(dy)[0], 1e-6)
  jaxpr = str(jax.make_jaxpr(cpu_kernels.input_gradient, static_argnums=(2, 3, 4))(
      dy, w, x_type, strides, padding))
  assert "conv_general_dilated" in jaxpr and "lhs_dilation=(1, 1)" in jaxpr
  assert f"lhs_dilation=({stride}, {stride})" not in jaxpr


# What `cpu_kernels.keep_step_memory` asks of the C library, as a CPU step's temporaries meet it
# on the thread that runs the step: a 64 MB block (glibc's malloc maps a block that large on its
# own and unmaps it on free) allocated, written and freed 8 times on the main thread. Prints
# whether jax's asynchronous CPU dispatch is on, then the page faults of each of the 8 rounds.
_FAULTS_OF_A_BLOCK = """
import ctypes, resource, sys
import jax
if sys.argv[1] == "keep":
  from resnet_jax.models import cpu_kernels
  cpu_kernels.keep_step_memory()
print(jax.config.read("jax_cpu_enable_async_dispatch"), jax.default_backend())
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 64 << 20
for _ in range(8):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  block = libc.malloc(size)
  ctypes.memset(block, 1, size)
  libc.free(block)
  print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(cpu_kernels._glibc_malloc() is None,  # pylint: disable=protected-access
                    reason="keep_step_memory sets glibc's malloc, not this process's")
def test_kept_step_memory_is_reused_by_the_next_block_and_steps_run_on_the_calling_thread():
  runs = {}
  for mode in ("default", "keep"):
    result = subprocess.run([sys.executable, "-c", _FAULTS_OF_A_BLOCK, mode], capture_output=True,
                            text=True, timeout=300, env=processes.environment(8))
    assert result.returncode == 0, result.stderr
    async_dispatch, backend, *faults = result.stdout.split()
    runs[mode] = (async_dispatch, backend, [int(count) for count in faults])
  # 64 MB is 16,384 pages of 4 KiB (fewer where the kernel backs them with huge pages): without
  # the settings every round faults its block in afresh; with them, only the first.
  assert runs["default"][:2] == ("True", "cpu") and min(runs["default"][2]) > 4_000, runs
  assert runs["keep"][:2] == ("False", "cpu") and max(runs["keep"][2][1:]) < 1_000, runs
