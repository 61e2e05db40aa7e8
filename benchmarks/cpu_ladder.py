"""What each of resnet_jax's CPU changes buys: one training step, nine ways, in one process.

    python benchmarks/cpu_ladder.py --model=cifar_resnet20 --repeats=8 --steps=3
    python benchmarks/cpu_ladder.py --layers   # each kind of CIFAR 3x3 convolution, in isolation

Variants, each adding one change to the one before:
  1. XLA's defaults: flax's `nnx.Conv` and `nnx.BatchNorm`, default compiler options (what
     `models.create` builds by default);
  2. `cpu_kernels.weight_gradient` (with lax's input gradient, as before 0.4.0);
  3. the YNNPACK fusions off (`cpu_kernels.compiler_options("cpu")` on jaxlib 0.10.2);
  4. dy and x materialised before the backward convolutions (`cpu_kernels._conv_bwd`'s barrier);
  5. strided input gradients by phase (`cpu_kernels.input_gradient`);
  6. oneDNN's convolution (XLA's oneDNN rewriter, which then takes every convolution);
  7. lax's form of the weight gradient where x has fewer channels than dy
     (`cpu_kernels.weight_gradient`'s default): `cpu_kernels.Conv`'s XLA forms;
  8. the YNNPACK fusions back on, oneDNN's rewriter taking the convolutions they leave
     (`cpu_kernels.compiler_options("cpu")` on jaxlib 0.12);
  9. oneDNN's own kernels for the three passes of each convolution, through this package's
     extension (`cpu_kernels.has_onednn()`): the trainer's step on CPU
     (`cpu_kernels.training_layers("cpu")`, `cpu_kernels.compiler_options("cpu")`), in a
     process of one CPU device. Where the extension is not here, row 9 is left out.
Rows 2 to 8 use this script's `LadderConv`, `cpu_kernels.Conv`'s XLA forms without the later
changes.
Every row's batch norm is flax's `nnx.BatchNorm` over the whole batch (the trainer's
`models.BatchNorm` without groups, `config.batch_norm_group`); 0.4.0's `cpu_kernels.BatchNorm`,
rows 4 and 5 of its ladder, is gone (BENCHMARKS.md, "flax's batch norm again"). Each row is the
trainer's own `loop.train_step` on data already on the device, in a process whose CPU steps
keep their memory, as the trainer's do (`cpu_kernels.keep_step_memory`; --no-keep_memory
leaves malloc as it is), and all are timed in alternating repeats
(`resnet_jax.tools.benchmark.measure`) so that they see the same machine load. With --layers
it times instead the forward pass, input gradient and weight gradient
(`cpu_kernels.input_gradient`, `cpu_kernels.weight_gradient`) of each kind of CIFAR 3x3
convolution at batch 128, with XLA's default options, without YNNPACK fusions, and without
them but with oneDNN's rewriter; then oneDNN's own kernels (`cpu_kernels.onednn_forward`,
`onednn_input_gradient`, `onednn_weight_gradient`). Figures in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from resnet_jax.tools import benchmark  # pylint: disable=g-import-not-at-top
from resnet_jax import data, models  # pylint: disable=g-import-not-at-top
from resnet_jax.models import cpu_kernels  # pylint: disable=g-import-not-at-top
from resnet_jax.training import optim, loop  # pylint: disable=g-import-not-at-top


NHWC = ("NHWC", "HWIO", "NHWC")


class LadderConv(nnx.Conv):
  """`cpu_kernels.Conv`'s XLA forms without its later changes: dy and x as XLA fuses them unless
  `materialise`; lax's input gradient for every stride unless `by_phase`
  (`cpu_kernels.input_gradient`); `cpu_kernels.weight_gradient` with dy as its convolution's
  input throughout (`x_as_input=False`) unless `lax_form_fewer_channels_in` (its default)."""

  def __init__(self, *args, materialise: bool, by_phase: bool = False,
               lax_form_fewer_channels_in: bool = False, **kwargs):
    def forward(x, w, strides, pads):
      return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=NHWC)

    def backward(strides, pads, residuals, dy):
      x, w = residuals
      if materialise:
        dy, x = lax.optimization_barrier((dy, x))
      if by_phase:
        dx = cpu_kernels.input_gradient(dy, w, jax.ShapeDtypeStruct(x.shape, x.dtype), strides,
                                        pads)
      else:
        (dx,) = jax.vjp(lambda x: forward(x, w, strides, pads), x)[1](dy)
      dw = cpu_kernels.weight_gradient(x, dy, w.shape, strides, pads,
                                       x_as_input=None if lax_form_fewer_channels_in else False)
      return dx, dw.astype(w.dtype)

    conv = jax.custom_vjp(forward, nondiff_argnums=(2, 3))
    conv.defvjp(lambda x, w, strides, pads: (forward(x, w, strides, pads), (x, w)), backward)

    def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                             rhs_dilation=None, feature_group_count=1, **unused):
      if any(d != 1 for d in (lhs_dilation or ()) + (rhs_dilation or ())) or feature_group_count != 1:
        raise ValueError("cpu_ladder: the ladder's networks have plain convolutions only")
      if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
      return conv(lhs, rhs, tuple(window_strides), tuple((int(lo), int(hi)) for lo, hi in padding))

    super().__init__(*args, conv_general_dilated=conv_general_dilated, **kwargs)


NO_YNNPACK = {"xla_cpu_experimental_ynn_fusion_type": ""}
ONEDNN_ALONE = {**NO_YNNPACK, "xla_cpu_experimental_onednn_custom_call": True}  # All convolutions.


# (input size, input channels, output channels, stride) of each kind of CIFAR 3x3 convolution.
CIFAR_LAYERS = ((32, 16, 16, 1), (16, 32, 32, 1), (8, 64, 64, 1), (32, 16, 32, 2), (16, 32, 64, 2))


def time_layers(batch: int, repeats: int) -> None:
  """Median ms of the three passes of each CIFAR 3x3 convolution: XLA's, under three option sets,
  and oneDNN's own kernels (`cpu_kernels.has_onednn()`) where they are here."""
  padding = ((1, 1), (1, 1))
  rng = np.random.default_rng(0)
  for size, c_in, c_out, stride in CIFAR_LAYERS:
    strides = (stride, stride)
    x = jnp.asarray(rng.standard_normal((batch, size, size, c_in)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, c_in, c_out)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((batch, size // stride, size // stride, c_out)), jnp.float32)
    x_type = jax.ShapeDtypeStruct(x.shape, x.dtype)
    xla = {
        "forward": lambda x, w, dy: lax.conv_general_dilated(x, w, strides, padding,
                                                             dimension_numbers=NHWC),
        "input gradient": lambda x, w, dy: cpu_kernels.input_gradient(dy, w, x_type, strides, padding),
        "weight gradient": lambda x, w, dy: cpu_kernels.weight_gradient(x, dy, w.shape, strides, padding),
    }
    rows = [("XLA defaults", None, xla), ("YNNPACK fusions off", NO_YNNPACK, xla),
            ("+ oneDNN convolutions", ONEDNN_ALONE, xla)]
    if cpu_kernels.has_onednn():
      rows.append(("oneDNN's own kernels", None, {
          "forward": lambda x, w, dy: cpu_kernels.onednn_forward(x, w, strides, padding),
          "input gradient": lambda x, w, dy: cpu_kernels.onednn_input_gradient(
              dy, w, x.shape, strides, padding),
          "weight gradient": lambda x, w, dy: cpu_kernels.onednn_weight_gradient(
              x, dy, w.shape[:2], strides, padding),
      }))
    for label, option_set, passes in rows:
      cells = []
      for name, fn in passes.items():
        compiled = jax.jit(fn, compiler_options=option_set).lower(x, w, dy).compile()
        jax.block_until_ready(compiled(x, w, dy))  # Warm-up.
        step_s = []
        for _ in range(repeats):
          start = time.perf_counter()
          jax.block_until_ready(compiled(x, w, dy))
          step_s.append(time.perf_counter() - start)
        cells.append(f"{name} {statistics.median(step_s) * 1e3:6.2f}")
      print(f"{size:2d}x{size:<2d} {c_in:2d} to {c_out:2d} stride {stride}, {label:21s} "
            + "  ".join(cells) + " ms")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="cifar_resnet20")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--steps", type=int, default=3, help="steps per timed repeat")
  parser.add_argument("--repeats", type=int, default=8)
  parser.add_argument("--layers", action="store_true", help="time single convolutions instead")
  parser.add_argument("--keep_memory", action=argparse.BooleanOptionalAction, default=True,
                      help="CPU steps keep their memory, as the trainer's (cpu_kernels.keep_step_memory)")
  args = parser.parse_args()
  if args.keep_memory:
    cpu_kernels.keep_step_memory()
  if args.layers:
    time_layers(args.batch, args.repeats)
    return

  config = benchmark.make_config(args.model, args.batch, "float32")
  size, classes = config.dataset.image_size, config.dataset.num_classes
  rng = np.random.default_rng(0)
  batch = data.Batch(
      images=jnp.asarray(rng.standard_normal((args.batch, size, size, 3), np.float32)),
      labels=jnp.asarray(rng.integers(0, classes, args.batch, dtype=np.int32)),
      mask=jnp.ones(args.batch, bool))
  fused = functools.partial(LadderConv, materialise=False)
  materialised = functools.partial(LadderConv, materialise=True)
  by_phase = functools.partial(LadderConv, materialise=True, by_phase=True)
  xla_forms = functools.partial(LadderConv, materialise=True, by_phase=True,
                                lax_form_fewer_channels_in=True)
  variants = (  # (name, compiler options, convolution, batch norm)
      ("XLA's defaults", None, nnx.Conv, nnx.BatchNorm),
      ("+ cpu_kernels weight gradient", None, fused, nnx.BatchNorm),
      ("+ YNNPACK fusions off", NO_YNNPACK, fused, nnx.BatchNorm),
      ("+ dy and x materialised", NO_YNNPACK, materialised, nnx.BatchNorm),
      ("+ strided input gradient by phase", NO_YNNPACK, by_phase, nnx.BatchNorm),
      ("+ oneDNN convolutions", ONEDNN_ALONE, by_phase, nnx.BatchNorm),
      ("+ lax's weight gradient, fewer channels in", ONEDNN_ALONE, xla_forms, nnx.BatchNorm),
      ("+ YNNPACK fusions back, beside oneDNN", cpu_kernels.compiler_options("cpu"), xla_forms,
       nnx.BatchNorm),
  )
  if cpu_kernels.has_onednn() and len(jax.devices("cpu")) == 1:
    variants += (("+ oneDNN's kernels for training", cpu_kernels.compiler_options("cpu"),
                  cpu_kernels.Conv, nnx.BatchNorm),)
  else:
    print("no row 9: oneDNN's kernels need resnet_jax.models._onednn and one CPU device",
          file=sys.stderr)
  runners = {}
  for name, options, conv, norm in variants:
    model = models.create(config.model, num_classes=classes, rngs=nnx.Rngs(config.seed),
                          conv=conv, norm=norm, **config.model_overrides)
    recipe = optim.create(config)
    step = lambda state, batch, recipe=recipe: loop.train_step(recipe, state, batch)[0]
    runners[name] = benchmark.Runner(
        jax.jit(step, donate_argnums=0, compiler_options=options),
        loop.create_train_state(model, recipe), batch)
  times = benchmark.measure(runners, args.repeats, args.steps)
  print(f"{args.model}, batch {args.batch}, float32, {jax.device_count()} x "
        f"{jax.devices()[0].device_kind}; {args.repeats} alternating repeats of {args.steps} steps")
  previous = None
  for name, step_s in times.items():
    median = statistics.median(step_s)
    gain = ""
    if previous is not None:  # Also per repeat: rows of one repeat ran back to back.
      paired = [before / after for before, after in zip(previous, step_s)]
      gain = (f"  {statistics.median(previous) / median:.2f}x over the row above (per repeat "
              f"{statistics.median(paired):.2f}x, {min(paired):.2f}-{max(paired):.2f})")
    print(f"{name:44s} median {1e3 * median:8.1f} ms  (min {1e3 * min(step_s):.1f}){gain}")
    previous = step_s


if __name__ == "__main__":
  main()
