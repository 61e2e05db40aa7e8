"""Training and evaluation throughput: `python -m resnet_jax.tools.benchmark --model=cifar_resnet20`.

Times the trainer's own jitted steps (`loop.train_step`, `loop.eval_step`) in
steady state: each step is compiled and run once before timing, and every timed
repeat ends in `block_until_ready`. Reports compile time, the median step time
with its spread over repeats, images per second and model FLOP utilisation
(MFU): FLOPs = 2 x `analysis.count_macs`, a training step counts 3 x the forward
pass (forward, input gradient, weight gradient).

By default the batch is already on the device ("model alone"); with
`--input_pipeline` the training step also samples and augments its batch from a
synthetic dataset of `resnet_jax.data` (the full input-to-update path).

With `--serve` it times on request instead, for a driver in another process (the
PyTorch baseline in another interpreter, `benchmarks/torch_baseline.py --compare`):
it prints one JSON line {"jax": version, "python": version, "device": kind,
"compile_s": {step: s}},
then answers each input line "STEP STEPS" with one line, the seconds per step of
STEPS chained calls of that step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import platform
import statistics
import sys
import time
from typing import Callable, Sequence, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from jax.sharding import NamedSharding, PartitionSpec

from resnet_jax.training import cli, optim, loop
from resnet_jax import data
from resnet_jax.models import analysis, cpu_kernels

# Dense (no sparsity) peak TFLOP/s of one chip: NVIDIA H100/H200 SXM datasheets
# (float32 is the non-tensor-core rate) and the Cloud TPU system architecture
# pages. Matched as substrings of `device.device_kind`, first match wins.
PEAK_TFLOPS = (
    ("H200", {"bfloat16": 989.0, "float32": 67.0}),
    ("H100", {"bfloat16": 989.0, "float32": 67.0}),
    ("TPU v5 lite", {"bfloat16": 197.0}),
    ("TPU v5e", {"bfloat16": 197.0}),
    ("TPU v5p", {"bfloat16": 459.0}),
    ("TPU v5", {"bfloat16": 459.0}),  # v5p reports itself as "TPU v5".
    ("TPU v4", {"bfloat16": 275.0}),
)


def peak_tflops(device_kind: str, dtype: str) -> float | None:
  """The known dense peak of `device_kind` at `dtype`, or None."""
  for pattern, peaks in PEAK_TFLOPS:
    if pattern in device_kind:
      return peaks.get(dtype)
  return None


@dataclasses.dataclass
class Result:
  """Timings of one jitted step; `step_s` holds the mean step time of each repeat."""
  name: str
  batch_size: int
  flops_per_step: float
  compile_s: float
  step_s: list[float]

  @property
  def median_s(self) -> float:
    return statistics.median(self.step_s)

  @property
  def images_per_s(self) -> float:
    return self.batch_size / self.median_s

  def mfu(self, peak: float | None) -> float | None:
    return None if not peak else self.flops_per_step / self.median_s / (peak * 1e12)


class Runner:
  """Runs `steps` chained calls of a compiled step and returns the seconds per step.

  `step` maps a carry to a new carry; the carry is threaded from call to call,
  so every timed step does the real work of the loop it stands for.
  """

  def __init__(self, step: Callable, carry, *args):
    start = time.perf_counter()
    self._step = step.lower(carry, *args).compile()
    self.compile_s = time.perf_counter() - start
    self._carry, self._args = carry, args
    self.run(1)  # Warm-up: first-run allocations and thread-pool start stay out of the timings.

  def run(self, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
      self._carry = self._step(self._carry, *self._args)
    jax.block_until_ready(self._carry)
    return (time.perf_counter() - start) / steps


def measure(runners: dict[str, object], repeats: int, steps: int) -> dict[str, list[float]]:
  """Per-repeat step times of each runner, interleaved so that all see the same machine load."""
  times = {name: [] for name in runners}
  for _ in range(repeats):
    for name, runner in runners.items():
      times[name].append(runner.run(steps))
  return times


def make_config(model: str, batch_size: int, dtype: str, batch_norm_group: int | None = None):
  """The model's training recipe (configs/), with synthetic data of the right shape; its batch
  norm groups (`config.batch_norm_group`) unless `batch_norm_group` is given."""
  from resnet_jax.configs import cifar_base, imagenet_base  # pylint: disable=g-import-not-at-top
  base = cifar_base if model.startswith("cifar_") else imagenet_base
  config = base.get_config(model)
  if batch_norm_group is not None:
    config.batch_norm_group = batch_norm_group
  num_classes, image_size = config.dataset.num_classes, config.dataset.image_size
  config.dataset = data.default_config("synthetic")
  # Enough distinct images that sampling is real work, few enough to stay small in memory.
  config.dataset.update(num_classes=num_classes, image_size=image_size,
                        synthetic_train_size=4 * batch_size, synthetic_eval_size=batch_size)
  config.batch_size = config.eval_batch_size = batch_size
  config.dtype = dtype
  return config


def build_runners(config, *, input_pipeline: bool) -> tuple[dict[str, Runner], int]:
  """Runners for "train", "eval" (and "train+input"); also returns the forward MACs per batch."""
  mesh = data.core.make_mesh()
  replicated = NamedSharding(mesh, PartitionSpec())
  batch_sharding = NamedSharding(mesh, PartitionSpec(data.core.DATA_AXIS))
  size, classes = config.dataset.image_size, config.dataset.num_classes
  platform = data.core.platform(mesh)
  model = loop.create_model(config, classes, config.seed, platform)
  macs = analysis.count_macs(model, (config.batch_size, size, size, 3))
  recipe = optim.create(config)
  state = jax.device_put(loop.create_train_state(model, recipe), replicated)
  # Training steps donate their state: each runner gets its own copy.
  copy_state = lambda: jax.tree.map(jnp.copy, state)

  rng = np.random.default_rng(0)
  batch = jax.device_put(data.Batch(
      images=rng.standard_normal((config.batch_size, size, size, 3), np.float32),
      labels=rng.integers(0, classes, config.batch_size, dtype=np.int32),
      mask=np.ones(config.batch_size, bool)), batch_sharding)

  train_step = lambda state, batch: loop.train_step(recipe, state, batch)[0]
  # Evaluation carries a running error count, so no call is dead code.
  eval_step = lambda total, state, batch: total + loop.eval_step(state, batch)["top1_errors"]
  jit = functools.partial(jax.jit, compiler_options=cpu_kernels.compiler_options(platform))
  jit_inference = functools.partial(
      jax.jit, compiler_options=cpu_kernels.compiler_options(platform, training=False))
  runners = {
      "train": Runner(jit(train_step, donate_argnums=0), copy_state(), batch),
      "eval": Runner(jit_inference(eval_step), jnp.zeros((), jnp.int32), state, batch),
  }
  if input_pipeline:
    dataset = data.create(loop.dataset_config(config), mesh)
    if not isinstance(dataset, data.OnDeviceDataset):
      raise ValueError(f"--input_pipeline needs an on-device dataset; {config.model} at "
                       f"{size}x{size} gets a {type(dataset).__name__}.")
    fused = lambda state, ds: train_step(state, ds.train_batch(state.step, config.batch_size))
    runners["train+input"] = Runner(jit(fused, donate_argnums=0), copy_state(), dataset)
  return runners, macs


def results(runners: dict[str, Runner], times: dict[str, list[float]], macs: int,
            batch_size: int) -> list[Result]:
  forward_flops = 2 * macs
  return [Result(name, batch_size, (forward_flops if name == "eval" else 3 * forward_flops),
                 runner.compile_s, times[name]) for name, runner in runners.items()]


def format_table(rows: Sequence[Result], peak: float | None) -> str:
  lines = [f"{'step':<12} {'compile s':>9} {'median ms':>10} {'min-max ms':>15} "
           f"{'images/s':>9} {'GFLOP/step':>10} {'MFU':>7}"]
  for r in rows:
    mfu = r.mfu(peak)
    lines.append(
        f"{r.name:<12} {r.compile_s:9.2f} {r.median_s * 1e3:10.2f} "
        f"{min(r.step_s) * 1e3:7.1f}-{max(r.step_s) * 1e3:<7.1f} {r.images_per_s:9.1f} "
        f"{r.flops_per_step / 1e9:10.2f} {'n/a' if mfu is None else f'{100 * mfu:6.2f}%':>7}")
  return "\n".join(lines)


def serve(runners: dict[str, Runner], requests: TextIO, replies: TextIO) -> None:
  """The `--serve` protocol of the module doc, until `requests` ends."""
  replies.write(json.dumps({"jax": jax.__version__, "python": platform.python_version(),
                            "device": jax.devices()[0].device_kind,
                            "compile_s": {name: r.compile_s for name, r in runners.items()}}) + "\n")
  replies.flush()
  for line in requests:
    name, steps = line.split()
    replies.write(f"{runners[name].run(int(steps))!r}\n")
    replies.flush()


def run(config, steps: int = 5, repeats: int = 5, input_pipeline: bool = False,
        peak: float | None = None, trace_dir: str | None = None) -> list[Result]:
  """Times the steps of `config` (`make_config`'s): `repeats` repeats of `steps` steps each;
  prints the table and returns its rows. `peak`: the device's TFLOP/s for MFU (default:
  `peak_tflops`); `trace_dir`: where a jax.profiler trace of the timed repeats goes."""
  device = jax.devices()[0]
  peak = peak or peak_tflops(device.device_kind, config.dtype)
  runners, macs = build_runners(config, input_pipeline=input_pipeline)
  with (jax.profiler.trace(trace_dir) if trace_dir else contextlib.nullcontext()):
    times = measure(runners, repeats, steps)
  rows = results(runners, times, macs, config.batch_size)
  print(f"{config.model}, batch {config.batch_size}, {config.dtype}, {jax.device_count()} x "
        f"{device.device_kind} ({jax.default_backend()}), peak "
        f"{'unknown' if peak is None else f'{peak} TFLOP/s'}; {repeats} repeats of "
        f"{steps} steps")
  print(format_table(rows, peak))
  by_name = {r.name: r for r in rows}
  print(f"eval/train throughput: {by_name['eval'].images_per_s / by_name['train'].images_per_s:.2f}x")
  return rows


def _define_flags() -> None:
  flags.DEFINE_string("model", "cifar_resnet20", "The network, by its models.create name "
                      "(cifar_resnet20, resnet50, ...), with its dataset's training recipe.")
  flags.DEFINE_integer("batch", 128, "Global batch size.")
  flags.DEFINE_integer("batch_norm_group", None, "Images per batch norm group (default: the "
                       "recipe's; 0: the batch).")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
  flags.DEFINE_integer("steps", 5, "Steps per timed repeat.")
  flags.DEFINE_integer("repeats", 5, "Timed repeats.")
  flags.DEFINE_bool("input_pipeline", False, "Also time the full input-to-update step on "
                    "synthetic data.")
  flags.DEFINE_float("peak_tflops", None, "Device peak for MFU (default: looked up for known "
                     "devices).")
  flags.DEFINE_string("trace_dir", None, "Write a jax.profiler trace of the timed repeats here "
                      "(XProf, Perfetto).")
  flags.DEFINE_bool("serve", False, "Time steps on request from stdin (module doc) instead of "
                    "timing repeats.")


def main(argv: list[str]) -> None:
  del argv  # No positional arguments (cli.run).
  cpu_kernels.keep_step_memory()  # As the trainer's process (`cli.start_run`).
  options = flags.FLAGS
  config = make_config(options.model, options.batch, options.dtype, options.batch_norm_group)
  try:
    loop.validate(config, data.core.make_mesh())
  except ValueError as error:
    cli.fail(str(error))
  if options.serve:
    serve(build_runners(config, input_pipeline=options.input_pipeline)[0], sys.stdin, sys.stdout)
  else:
    run(config, options.steps, options.repeats, options.input_pipeline, options.peak_tflops,
        options.trace_dir)


if __name__ == "__main__":
  cli.run(main, _define_flags)
