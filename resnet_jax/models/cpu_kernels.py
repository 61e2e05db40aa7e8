"""CPU kernels and settings for the models' steps: convolution, compiler, memory.

`models.create(name, ..., **cpu_kernels.training_layers(platform))` builds a network whose
convolutions are `Conv` for CPU devices, and flax's `nnx.Conv` for every other platform;
batch norms are flax's on every platform (BENCHMARKS.md, "flax's batch norm again"). The
trainer, the evaluator, the benchmark and `resnet_jax.training.compile` build their models so
(`loop.create_model`, which adds the config's batch norm groups) and jit their steps
with `compiler_options(platform)` (`training=False` for evaluation), `platform` being that
of the devices the step runs on (`data.core.platform(mesh)`), never the host's default
backend: a step compiled on a CPU host for a TPU slice takes the TPU's layers.

Each kernel computes what lax's convolution and its gradients do, to float32 rounding,
proven by tests/test_ops.py. Only steps on CPU devices use them and the compiler options
below: BENCHMARKS.md ("What each CPU change buys") measures what each buys there, and none
was measured on another platform.

`Conv`'s kernel is a `jax.custom_vjp` function: it supports reverse-mode
transformations (`jax.grad`, `jax.vjp`, `jax.vmap`, `jax.checkpoint`), not
forward mode (`jax.jvp`, `jax.jacfwd`, `jax.linearize`). A model from `create`
without `training_layers()` uses flax's layers and supports every transformation.

oneDNN's convolutions (`has_onednn()`). XLA's own oneDNN rewriter (below) takes only forward
convolutions, and only as inference: the two backward convolutions of a training step, written
as forward ones, read transposed copies of their operands and ran at half PyTorch's speed.
This package's extension, `resnet_jax.models._onednn` (onednn_convolution.cc, which setup.py
builds on x86-64 Linux against oneDNN's library from onednn-cpu-gomp, an installed
requirement of `resnet_jax[train]` there), hands all three passes of a training step's
convolution to oneDNN's own kernels, as PyTorch does: forward (`onednn_forward`), backward
data (`onednn_input_gradient`) and backward weights (`onednn_weight_gradient`), on the
arrays' own NHWC and HWIO layouts, through XLA FFI calls. A differentiated float32
convolution takes them where both are here and the process has one CPU device in all (no
`--xla_force_host_platform_device_count`, no multi-process CPU cluster): an FFI call is
opaque to XLA's partitioner, which cannot split it over devices' shares of a batch, so with
several CPU devices a step keeps XLA's forms below, whatever its sharding. The primal
(undifferentiated) convolution, which inference runs, stays XLA's.

Compiler options. On CPU, XLA hands convolutions and elementwise work to YNNPACK's fusions
by default. Where its XLA has the oneDNN rewriter (jaxlib 0.12), `compiler_options()` turns
that on (`xla_cpu_experimental_onednn_custom_call`), which runs convolutions on oneDNN,
PyTorch's CPU library. It takes convolutions without base (input) dilation, negative padding
or a reversed kernel, in float32 (and bfloat16 where the CPU has it), which every convolution
of this module's training step is. For inference steps, YNNPACK's fusions are turned off, and
oneDNN takes every convolution; training steps keep the fusions, and oneDNN takes the
convolutions they leave: each is the faster there (BENCHMARKS.md, "What each CPU change
buys"). Where jaxlib has no rewriter (0.10.2 accepts the option and rewrites nothing),
`compiler_options()` turns YNNPACK's fusions off for every step, as their convolutions were
slower there than XLA's own.

XLA's forms of the convolution. Plain NHWC/HWIO convolutions without dilation or groups
take a `jax.custom_vjp` with its own backward pass; all other cases are lax's own
convolution. The forward pass is lax's where it is not oneDNN's.

Its backward pass first materialises dy and x (`lax.optimization_barrier`). Both
backward convolutions read them, and XLA's weight gradient reads them transposed:
without the barrier XLA fuses dy's producer, the batch norm backward, into that
transposing copy and recomputes it element by element in transposed order, several
times slower than computing dy once and transposing it.

The input gradient (`input_gradient`) is lax's at stride 1: a convolution of dy with the
flipped kernel. At stride s, lax's is the same convolution of dy dilated by s (zeros
inserted between rows and columns), which Eigen runs slowly and the oneDNN rewriter
refuses; here it is s * s stride-1 convolutions, one per phase of the stride, interleaved.

The weight gradient (`weight_gradient`). dW[kh, kw, ci, co] = sum_{n,h,w}
x[n, h + kh, w + kw, ci] dy[n, h, w, co] is a convolution over the batch and the image
of one of x and dy with the other as its kernel, both read with n as the feature
dimension (transposing copies of the materialised x and dy). lax takes x as the input,
read as (ci, h, w, n), and dy as the kernel, (h, w, n, co). Here dy is the input, read as
(co, h, w, n), and x the kernel, (h, w, n, ci), unless x has fewer channels than dy (the
stem's three colours, the phases of a strided layer), which takes lax's form: the
kernel's output features are what the CPU's convolutions take in blocks of 16 at a time,
and three of them would leave most of each block empty. A strided convolution's weight
gradient is one such stride-1 convolution per phase of the stride.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import itertools
import os
import platform
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax


Pads = tuple[tuple[int, int], tuple[int, int]]

_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1),
                                 out_spec=(0, 3, 1, 2))



# The module doc's CPU options. Where this jaxlib's XLA rewrites convolutions to oneDNN: that
# rewriter, beside YNNPACK's default fusions for training steps and in their place for
# inference; elsewhere no YNNPACK fusions.
_ONEDNN = {"xla_cpu_experimental_onednn_custom_call": True}
_NO_YNNPACK = {"xla_cpu_experimental_ynn_fusion_type": ""}


def compiler_options(platform: str, *, training: bool = True) -> dict[str, str | bool] | None:
  """`jax.jit(..., compiler_options=...)` for the models' steps on devices of `platform`:
  training steps, or inference (evaluation) steps where not `training`.

  For "cpu", the module doc's: XLA's oneDNN rewriter where this jaxlib has it, with YNNPACK's
  fusions for training and without them for inference; else no YNNPACK fusions where the jaxlib
  knows that option (an unknown one would fail every compilation), else None. None for every
  other platform.
  """
  if platform != "cpu":
    return None
  compiler = _cpu_compiler()
  if compiler == "onednn":
    return dict(_ONEDNN) if training else {**_NO_YNNPACK, **_ONEDNN}
  return dict(_NO_YNNPACK) if compiler == "eigen" else None


@functools.cache
def _cpu_compiler() -> str | None:
  """Which convolutions this jaxlib's XLA has on CPU: "onednn" where it rewrites a small one to
  oneDNN (tried away from YNNPACK), "eigen" (its own) where it knows YNNPACK's option but has
  no rewriter, None where it knows neither."""
  cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  x = jax.ShapeDtypeStruct((1, 8, 8, 16), jnp.float32, sharding=cpu)
  w = jax.ShapeDtypeStruct((3, 3, 16, 16), jnp.float32, sharding=cpu)
  probe = jax.jit(lambda x, w: _forward(x, w, (1, 1), ((1, 1), (1, 1)), None, None)).lower(x, w)
  try:
    probe.compile(compiler_options=_NO_YNNPACK)
  except Exception:  # pylint: disable=broad-except
    return None  # A jaxlib without YNNPACK's option.
  try:
    compiled = probe.compile(compiler_options={**_NO_YNNPACK, **_ONEDNN})
  except Exception:  # pylint: disable=broad-except
    return "eigen"  # A jaxlib without the rewriter's option.
  return "onednn" if "__onednn$convolution" in compiled.as_text() else "eigen"


# The XLA FFI target of each of oneDNN's passes, by the name the extension gives it.
_ONEDNN_TARGET = "resnet_jax_onednn_{}".format


@functools.cache
def has_onednn() -> bool:
  """Whether oneDNN's convolutions are here, registered with jax (the module doc): this
  package's extension `resnet_jax.models._onednn` and the oneDNN library it calls."""
  try:
    library = next(file for file in importlib.metadata.files("onednn-cpu-gomp") or ()
                   if file.name == "libdnnl.so.3")
  except (importlib.metadata.PackageNotFoundError, StopIteration):
    return False
  # oneDNN runs on OpenMP threads (GNU's), which by default spin while they wait for work,
  # taking the cores from XLA's threads, which run a step's independent operations beside them
  # (8 such calls at once on 2 cores took minutes instead of a second). So they sleep instead,
  # unless the user says otherwise (read when libgomp loads, with oneDNN, just below).
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  try:
    # The extension links to libdnnl.so.3, which is in no folder the dynamic linker searches:
    # loaded first, by its path, it is the one the extension's import finds.
    ctypes.CDLL(str(library.locate()))
    from resnet_jax.models import _onednn  # pylint: disable=g-import-not-at-top
  except (OSError, ImportError):
    return False
  for name, handler in _onednn.handlers().items():
    jax.ffi.register_ffi_target(_ONEDNN_TARGET(name), handler, platform="cpu")
  return True


# <malloc.h>'s mallopt parameters.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def _glibc_malloc() -> ctypes.CDLL | None:
  """The C library where it is glibc and its malloc is the process's; None where it is another C
  library, or where another allocator was loaded in malloc's place (`LD_PRELOAD`)."""
  if platform.libc_ver()[0] != "glibc":
    return None
  libc = ctypes.CDLL("libc.so.6")
  address = lambda library: ctypes.cast(library.malloc, ctypes.c_void_p).value
  return libc if address(libc) == address(ctypes.CDLL(None)) else None


def keep_step_memory() -> None:
  """Where jax's default backend is CPU, has each step reuse the host memory of the step before.

  Call it once, before jax's first use (after `jax.distributed.initialize`, where a program has
  one). The trainer, the evaluator and the benchmark do (`cli.start_run`).

  XLA allocates a CPU step's temporaries afresh on each run, as one block (206 MB for
  ResNet-20's training step at batch 128), and glibc's malloc gives a block over 32 MB back to
  the kernel when it is freed: every step then faults all of its pages in again, each zeroed by
  the kernel first (BENCHMARKS.md, "The host memory of a CPU step"). So, with a CPU backend,
  glibc's malloc (where it is the process's, not another allocator preloaded in its place) is
  told to keep freed memory on its heap for reuse: no block in a mapping of its own
  (`M_MMAP_MAX` 0) and no trimming until 2 GiB are free (`M_TRIM_THRESHOLD`). The process's
  memory then stays at its peak instead of rising and falling with every step.

  That holds for the main thread's heap only: a thread's own arena maps any block over 64 MB
  apart. So jax is also told to run a single-device CPU computation on the calling thread
  rather than on a worker thread of its own (`jax_cpu_enable_async_dispatch` off, which has to
  precede the CPU backend's creation): the caller waits for each step, which on CPU devices
  runs on the caller's cores anyway. Computations over several CPU devices are dispatched to
  workers whatever the option, and keep faulting. GPU and TPU devices are left as they are,
  and so is malloc on their hosts.
  """
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  libc = _glibc_malloc()
  if jax.default_backend() != "cpu" or libc is None:
    return
  libc.mallopt(_M_MMAP_MAX, 0)
  libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)


def conv_general_dilated(lhs, rhs, window_strides: Sequence[int], padding,
                         lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers=None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision=None,
                         preferred_element_type=None, out_sharding=None) -> jax.Array:
  """`jax.lax.conv_general_dilated`, with the CPU backward pass of the module doc."""
  plain = (lhs.ndim == 4 and rhs.ndim == 4
           and feature_group_count == 1 and batch_group_count == 1 and out_sharding is None
           and all(d == 1 for d in (lhs_dilation or ()) + (rhs_dilation or ()))
           and dimension_numbers is not None
           and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == _NHWC)
  if not plain:
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type,
        out_sharding=out_sharding)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  pads = tuple((int(low), int(high)) for low, high in padding)
  return _conv(lhs, rhs, tuple(int(s) for s in window_strides), pads, precision,
               preferred_element_type)


class Conv(nnx.Conv):
  """`nnx.Conv` computing with `conv_general_dilated`: the same variables and outputs."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, conv_general_dilated=conv_general_dilated, **kwargs)


def training_layers(platform: str) -> dict[str, type[nnx.Module]]:
  """`models.create` keywords for the fastest training step on devices of `platform`.

  {"conv": Conv} for "cpu"; {} (flax's layers) for every other platform (see the module
  doc).
  """
  return {"conv": Conv} if platform == "cpu" else {}


def _explicit_sharding(array: jax.Array):
  """The array's sharding where its mesh has explicit axes (which ops must then be told)."""
  sharding = jax.typeof(array).sharding
  return sharding if jax.sharding.AxisType.Explicit in sharding.mesh.axis_types else None


def _forward(x, w, strides, pads, precision, preferred_element_type):
  return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC,
                                  precision=precision,
                                  preferred_element_type=preferred_element_type)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv(x, w, strides, pads, precision, preferred_element_type):
  return _forward(x, w, strides, pads, precision, preferred_element_type)


def _on_onednn(*arrays: jax.Array) -> bool:
  """Whether a training step's pass over these arrays runs on oneDNN (the module doc)."""
  return (all(a.dtype == jnp.float32 for a in arrays) and _one_cpu_device() and has_onednn())


def _conv_fwd(x, w, strides, pads, precision, preferred_element_type):
  if _on_onednn(x, w) and preferred_element_type is None:
    return onednn_forward(x, w, strides, pads), (x, w)
  return _forward(x, w, strides, pads, precision, preferred_element_type), (x, w)


def _conv_bwd(strides, pads, precision, preferred_element_type, residuals, dy):
  x, w = residuals
  # Both backward convolutions read dy and x: materialise them once. Otherwise XLA fuses
  # dy's producer (the batch norm backward) into the transposing copy the weight gradient
  # makes of dy, and recomputes it there element by element in transposed order.
  dy, x = lax.optimization_barrier((dy, x))
  x_type = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=_explicit_sharding(x))
  if _on_onednn(x, w, dy):
    dx = onednn_input_gradient(dy, w, x.shape, strides, pads)
  else:
    dx = input_gradient(dy, w, x_type, strides, pads, precision, preferred_element_type)
  if _on_onednn(x, dy):
    dw = onednn_weight_gradient(x, dy, w.shape[:2], strides, pads)
  else:
    # Under explicit sharding the weight gradient sums over a sharded batch: laid out as w.
    dw = weight_gradient(x, dy, w.shape, strides, pads, precision,
                         out_sharding=_explicit_sharding(w))
  return dx, dw.astype(w.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def input_gradient(dy: jax.Array, w: jax.Array, x_type: jax.ShapeDtypeStruct,
                   strides: tuple[int, int], pads: Pads, precision=None,
                   preferred_element_type=None) -> jax.Array:
  """dx (NHWC, as `x_type`) of the NHWC convolution of x with kernel `w` that gave gradient `dy`.

  Stride 1: lax's own, a convolution of dy with the flipped kernel. Stride s: lax's is the
  same convolution of dy dilated by s (zeros between its rows and columns), which neither
  Eigen runs fast nor XLA's oneDNN rewriter takes. Here it is split by phase instead: x row
  s * m + r (padding p) is read only by the taps kh = k0 + s * j, k0 = (r + p) mod s, so the
  rows of phase r are a stride-1 convolution of dy with those taps flipped, and the phases
  interleave into dx. No multiplication by an inserted zero is left.
  """
  if tuple(strides) == (1, 1):
    forward_in_x = lambda x: _forward(x, w, strides, pads, precision, preferred_element_type)
    return jax.linear_transpose(forward_in_x, x_type)(dy)[0]
  n, height, width, _ = x_type.shape
  (sh, sw), (kh, kw) = strides, w.shape[:2]
  rows, cols = -(-height // sh), -(-width // sw)  # Every phase computed to the longest one.
  w = w.astype(dy.dtype)
  phases = {}
  for r, c in itertools.product(range(sh), range(sw)):
    along_h = _phase_taps(kh, sh, pads[0][0], rows, dy.shape[1], r)
    along_w = _phase_taps(kw, sw, pads[1][0], cols, dy.shape[2], c)
    if along_h is None or along_w is None:
      continue  # No tap reads these rows or columns: their gradient is zero.
    (taps_h, low_h, high_h), (taps_w, low_w, high_w) = along_h, along_w
    # The taps, flipped, with input and output features exchanged: a kernel from dy to x.
    kernel = jnp.transpose(w[taps_h, taps_w][::-1, ::-1], (0, 1, 3, 2))
    # Negative padding (which the rewriter refuses) as a slice of dy.
    phase_dy = dy[:, max(-low_h, 0):dy.shape[1] - max(-high_h, 0),
                  max(-low_w, 0):dy.shape[2] - max(-high_w, 0)]
    phases[r, c] = _forward(phase_dy, kernel, (1, 1),
                            ((max(low_h, 0), max(high_h, 0)), (max(low_w, 0), max(high_w, 0))),
                            precision, preferred_element_type)
  zeros = jnp.zeros_like(next(iter(phases.values())))
  dx = jnp.stack([jnp.stack([phases.get((r, c), zeros) for c in range(sw)], axis=3)
                  for r in range(sh)], axis=2)  # [n, rows, sh, cols, sw, ci]
  return dx.reshape(n, rows * sh, cols * sw, -1)[:, :height, :width].astype(x_type.dtype)


def _phase_taps(kernel: int, stride: int, pad_low: int, rows: int, dy_size: int, phase: int):
  """(taps as a slice of the kernel, low pad, high pad) of dy for `rows` rows of one phase
  along one axis, or None if no tap reads them.

  With k0 = (phase + pad_low) mod s and q = (phase + pad_low - k0) / s, row s * m + phase of
  dx sums dy[m + q - j] * w[k0 + s * j] over the J taps j: a correlation of dy, padded by
  J - 1 - q below, with the taps reversed.
  """
  k0 = (phase + pad_low) % stride
  count = len(range(k0, kernel, stride))
  if not count:
    return None
  low = count - 1 - (phase + pad_low - k0) // stride
  return slice(k0, kernel, stride), low, rows + count - 1 - low - dy_size


def weight_gradient(x: jax.Array, dy: jax.Array, kernel_shape: Sequence[int],
                    strides: tuple[int, int], pads: Pads, precision=None,
                    out_sharding=None, x_as_input: bool | None = None) -> jax.Array:
  """dW (HWIO, float32 or wider) of the NHWC convolution of `x` that gave gradient `dy`.

  `x_as_input`: whether the convolution that computes it takes x as its input and dy as its
  kernel (lax's form) or the reverse; by default (None), x is the input where it has fewer
  channels than dy (the module doc).

  Stride s: kernel row kh = s * a + r reads x row s * (h + a) + r, so each phase
  (r, c) of the stride is a stride-1 weight gradient over x[:, r::s, c::s] for
  the taps kh = r, r + s, ... and kw = c, c + s, ...
  """
  kh, kw = kernel_shape[:2]
  sh, sw = strides
  if x_as_input is None:
    x_as_input = x.shape[3] < dy.shape[3]
  if (sh, sw) == (1, 1):
    return _stride1_weight_gradient(x, dy, (kh, kw), pads, precision, out_sharding, x_as_input)
  _, ho, wo, _ = dy.shape
  padded = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  dw = jnp.zeros((kh, kw, x.shape[3], dy.shape[3]), jnp.promote_types(dy.dtype, jnp.float32),
                 out_sharding=out_sharding)
  for r, c in itertools.product(range(min(sh, kh)), range(min(sw, kw))):
    taps = (len(range(r, kh, sh)), len(range(c, kw, sw)))
    # Exactly the rows and columns this phase's taps read: ho + taps - 1 of them.
    phase = padded[:, r:r + sh * (ho + taps[0] - 2) + 1:sh,
                   c:c + sw * (wo + taps[1] - 2) + 1:sw]
    piece = _stride1_weight_gradient(phase, dy, taps, ((0, 0), (0, 0)), precision, out_sharding,
                                     x_as_input)
    dw = dw.at[r::sh, c::sw].set(piece)
  return dw


def _one_cpu_device() -> bool:
  """Whether this process's jax has one CPU device in all (of all its processes): then no step
  can split a batch over CPU devices, which an XLA FFI call cannot follow (the module doc)."""
  return len(jax.devices("cpu")) == 1


def _onednn_call(name: str, result: tuple[int, ...], a: jax.Array, b: jax.Array,
                 strides: tuple[int, int], pads: Pads) -> jax.Array:
  """oneDNN's pass `name` of an NHWC/HWIO float32 convolution, on its two inputs (the extension's
  order: x, w; dy, w; x, dy), giving the third, of shape `result`."""
  call = jax.ffi.ffi_call(_ONEDNN_TARGET(name), jax.ShapeDtypeStruct(result, jnp.float32),
                          vmap_method="sequential")
  (top, bottom), (left, right) = pads
  return call(a, b, stride_h=strides[0], stride_w=strides[1], pad_top=top, pad_bottom=bottom,
              pad_left=left, pad_right=right)


def _read_window(x_shape, y_shape, kernel_hw, strides, pads) -> tuple[tuple[slice, slice], Pads]:
  """The rows and columns of x that the convolution's windows read, and their pads: oneDNN
  takes no negative pad, and wants each pad exactly what the windows reach."""
  window, exact = [], []
  for size, out_size, k, s, (low, _) in zip(x_shape[1:3], y_shape[1:3], kernel_hw, strides, pads):
    start = max(-low, 0)
    high = (out_size - 1) * s + k - size - low
    window.append(slice(start, size + min(high, 0)))
    exact.append((max(low, 0), max(high, 0)))
  return tuple(window), tuple(exact)


def onednn_forward(x: jax.Array, w: jax.Array, strides: tuple[int, int], pads: Pads) -> jax.Array:
  """The NHWC float32 convolution of `x` with `w` (HWIO), on oneDNN's forward kernel."""
  y_type = jax.eval_shape(lambda x, w: _forward(x, w, strides, pads, None, None), x, w)
  (rows, cols), exact = _read_window(x.shape, y_type.shape, w.shape[:2], strides, pads)
  return _onednn_call("forward", y_type.shape, x[:, rows, cols], w, strides, exact)


def onednn_input_gradient(dy: jax.Array, w: jax.Array, x_shape: Sequence[int],
                          strides: tuple[int, int], pads: Pads) -> jax.Array:
  """dx (NHWC, `x_shape`) of the float32 convolution with kernel `w` that gave gradient `dy`, on
  oneDNN's backward-data kernel."""
  (rows, cols), exact = _read_window(x_shape, dy.shape, w.shape[:2], strides, pads)
  read = (x_shape[0], rows.stop - rows.start, cols.stop - cols.start, x_shape[3])
  dx = _onednn_call("input_gradient", read, dy, w, strides, exact)
  # Rows no window reads have no gradient.
  return jnp.pad(dx, ((0, 0), (rows.start, x_shape[1] - rows.stop),
                      (cols.start, x_shape[2] - cols.stop), (0, 0)))


def onednn_weight_gradient(x: jax.Array, dy: jax.Array, kernel_hw: tuple[int, int],
                           strides: tuple[int, int], pads: Pads) -> jax.Array:
  """dW (HWIO, float32) of the NHWC float32 convolution of `x` that gave gradient `dy`, on
  oneDNN's backward-weights kernel."""
  (rows, cols), exact = _read_window(x.shape, dy.shape, kernel_hw, strides, pads)
  return _onednn_call("weight_gradient", (*kernel_hw, x.shape[3], dy.shape[3]),
                      x[:, rows, cols], dy, strides, exact)


def _stride1_weight_gradient(x, dy, kernel_hw: tuple[int, int], pads: Pads, precision,
                             out_sharding, x_as_input: bool):
  """Stride-1 dW as a convolution of x (batch ci, feature n) with dy as kernel (in n, out co),
  lax's, if `x_as_input`, else of dy (batch co, feature n) with x as kernel (in n, out ci).

  The second's output row a holds kernel row kh = k - 1 - a (it runs the
  window the other way), hence the flip. dy is padded so that every dW tap sees
  all of x: p_low = k - 1 - pad_low on the low side, whatever is left on the high.
  """
  dw_type = jnp.promote_types(dy.dtype, jnp.float32)
  if x_as_input:
    return lax.conv_general_dilated(x, dy, (1, 1), pads,
                                    dimension_numbers=("CHWN", "IHWO", "HWNC"),
                                    precision=precision, out_sharding=out_sharding,
                                    preferred_element_type=dw_type)
  _, ho, wo, _ = dy.shape
  dy_pads = []
  for k, (pad_low, _), size, out_size in zip(kernel_hw, pads, x.shape[1:3], (ho, wo)):
    low = k - 1 - pad_low
    dy_pads.append((low, k - 1 + size - low - out_size))
  if any(out_size < size for out_size, size in zip((ho, wo), x.shape[1:3])):
    # XLA's fast CPU convolution (YNNPACK) needs the input at least as large as
    # the kernel, here x: pad dy explicitly (slower than padding in the convolution).
    dy = lax.pad(dy, jnp.zeros((), dy.dtype), ((0, 0, 0), *((lo, hi, 0) for lo, hi in dy_pads),
                                               (0, 0, 0)))
    dy_pads = ((0, 0), (0, 0))
  dw = lax.conv_general_dilated(dy, x, (1, 1), dy_pads,
                                dimension_numbers=("CHWN", "IHWO", "HWCN"),
                                precision=precision, out_sharding=out_sharding,
                                preferred_element_type=dw_type)
  return dw[::-1, ::-1]
