"""Compiles a config's steps for a TPU topology on any machine, and says whether they fit.

  python -m resnet_jax.training.compile --config=imagenet_resnet50 --topology=v5e:16x16
  python -m resnet_jax.training.compile --config=cifar_resnet110 --topology=v6e:2x2 \\
      --config.batch_size=4096

It builds what the trainer builds on that slice, from the same functions: the "data" mesh over
all of the topology's devices (in all of its processes), the model with the TPU's layers and
dtype, the train step, and the evaluation step of the config's protocol (multi-scale: one per
aspect bucket), with the real shapes and shardings; then compiles each with libtpu, which runs
on a host without a TPU. One line per step gives the compile time, the memory per chip against
the chip's HBM, XLA's FLOPs per chip beside the model's, a roofline floor of the step time (the
larger of FLOPs over the peak and bytes over the HBM bandwidth, `CHIPS`) and from it a ceiling
in images/s per chip, and for a streamed dataset the host cores each host needs to feed it.

A step that does not fit in HBM ends the command with one `error:` line, status 2, naming the
largest per-chip batch that does, found by compiling (`--largest_batch` searches it for a step
that fits too). `--record=FILE` appends each step's numbers as a JSON line (the fit table in
docs/running_at_scale.md is made so, by experiments/fit_table.py).

Needs libtpu: `pip install "resnet_jax[tpu]"` (jax[tpu]).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import re
import sys
import time
from typing import Any, Callable

import ml_collections
from absl import flags
from etils import epath

from resnet_jax.training import cli

# Per-chip figures of each TPU generation, from the Cloud TPU system architecture pages
# (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e): peak dense bfloat16 FLOP/s, HBM capacity and
# HBM bandwidth. `dims`: the rank of the generation's topology shapes; `megacore`: its chips'
# two TensorCores act as one device (as on a v4 or v5p VM), which libtpu must be told.
GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
  peak_flops: float
  hbm_bytes: int
  hbm_bytes_per_s: float
  dims: int
  megacore: bool


CHIPS = {
    "v4": Chip(peak_flops=275e12, hbm_bytes=32 * GIB, hbm_bytes_per_s=1200e9, dims=3,
               megacore=True),
    "v5e": Chip(peak_flops=197e12, hbm_bytes=16 * GIB, hbm_bytes_per_s=819e9, dims=2,
                megacore=False),
    "v5p": Chip(peak_flops=459e12, hbm_bytes=95 * GIB, hbm_bytes_per_s=2765e9, dims=3,
                megacore=True),
    "v6e": Chip(peak_flops=918e12, hbm_bytes=32 * GIB, hbm_bytes_per_s=1640e9, dims=2,
                megacore=False),
}
# The trainer's streaming ImageNet pipeline (tf.data over array_record: read, decode of the
# crop window, scale augmentation, 224 crop, flip, lighting), images per CPU-second of one core
# (BENCHMARKS.md, "Input pipelines").
STREAMING_IMAGES_PER_CORE = 323
# Batches searched for the largest that fits: multiples of this many images per chip.
BATCH_GRANULARITY = 8
# Images in each split of the datasets the configs name, so no data is read to compile.
SPLIT_SIZES = {"cifar10": {"train": 50_000, "test": 10_000, "train45k": 45_000, "val5k": 5_000},
               "cifar100": {"train": 50_000, "test": 10_000, "train45k": 45_000, "val5k": 5_000},
               "imagenet2012": {"train": 1_281_167, "validation": 50_000}}


class CompileError(ValueError):
  """The command cannot go on; the message names the problem and the fix."""


class OutOfMemory(Exception):
  """A step does not fit in the chip's HBM."""


@dataclasses.dataclass(frozen=True)
class Topology:
  generation: str
  shape: str

  @property
  def name(self) -> str:
    return f"{self.generation}:{self.shape}"

  @property
  def chip(self) -> Chip:
    return CHIPS[self.generation]


def parse_topology(name: str) -> Topology:
  """`v5e:16x16` and the like; a CompileError showing the accepted form otherwise."""
  match = re.fullmatch(r"(v\w+):(\d+(?:x\d+)*)", name or "")
  form = ("use GENERATION:SHAPE, the chips along each axis: v5e:AxB or v6e:AxB (2-D), "
          "v4:AxBxC or v5p:AxBxC (3-D), e.g. --topology=v5e:16x16")
  if not match or match.group(1) not in CHIPS:
    raise CompileError(f"unknown topology {name!r}; {form}.")
  generation, shape = match.groups()
  if len(shape.split("x")) != CHIPS[generation].dims or "0" in shape.split("x"):
    raise CompileError(f"topology {name!r} does not have the {CHIPS[generation].dims} axes of a "
                       f"{generation} slice; {form}.")
  return Topology(generation, shape)


def topology_devices(topology: Topology) -> list[Any]:
  """The compile-only devices of every process of `topology`, from libtpu."""
  if importlib.util.find_spec("libtpu") is None:
    raise CompileError('compiling for a TPU needs libtpu, which is not installed: pip install '
                       '"resnet_jax[tpu]" (jax[tpu]; for jax 0.12, Python 3.12 or later).')
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  options = {"chip_config_name": "megacore"} if topology.chip.megacore else {}
  try:
    return topologies.get_topology_desc(topology.name, platform="tpu", **options).devices
  except Exception as error:  # pylint: disable=broad-except  # libtpu's, of several types.
    raise CompileError(f"libtpu could not lay out the topology {topology.name}: "
                       f"{str(error).splitlines()[0]}") from None


@dataclasses.dataclass
class StepReport:
  """What one compiled step costs on one chip."""
  step: str
  batch_per_chip: int
  images_per_chip: int  # Images through the network per step (views counted).
  compile_s: float
  memory: dict[str, int]  # arguments, outputs, aliased, temporaries, code (bytes).
  xla_flops: float
  xla_bytes: float
  model_flops: float
  compiled: Any = dataclasses.field(default=None, repr=False)  # jax.stages.Compiled

  @property
  def memory_bytes(self) -> int:
    m = self.memory
    return m["arguments"] + m["outputs"] - m["aliased"] + m["temporaries"] + m["code"]

  def fits(self, chip: Chip) -> bool:
    return self.memory_bytes <= chip.hbm_bytes

  def floor_s(self, chip: Chip) -> tuple[float, str]:
    """The roofline floor of the step time and what binds it."""
    compute, memory = self.xla_flops / chip.peak_flops, self.xla_bytes / chip.hbm_bytes_per_s
    return (compute, "FLOPs") if compute >= memory else (memory, "bandwidth")

  def ceiling_images_per_s(self, chip: Chip) -> float:
    return self.batch_per_chip / self.floor_s(chip)[0]


def compile_step(name: str, jitted, args: tuple, batch_per_chip: int, images_per_chip: int,
                 model_flops: float) -> StepReport:
  """Lowers and compiles `jitted` for `args` (abstract, sharded over the topology's mesh)."""
  started = time.perf_counter()
  try:
    compiled = jitted.lower(*args).compile()
  except Exception as error:  # pylint: disable=broad-except  # XLA's, as a runtime error.
    if "RESOURCE_EXHAUSTED" in str(error) or "Ran out of memory" in str(error):
      raise OutOfMemory(str(error).splitlines()[0]) from None
    raise
  seconds = time.perf_counter() - started
  analysis = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  memory = {"arguments": analysis.argument_size_in_bytes,
            "outputs": analysis.output_size_in_bytes, "aliased": analysis.alias_size_in_bytes,
            "temporaries": analysis.temp_size_in_bytes,
            "code": analysis.generated_code_size_in_bytes}
  return StepReport(name, batch_per_chip, images_per_chip, seconds, memory,
                    float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0)),
                    model_flops, compiled)


def dataset_info(dataset: ml_collections.ConfigDict):
  """The `DatasetInfo` a run of `dataset` would see, read from no image (an image folder's files
  are listed, and its first image read for its size)."""
  from resnet_jax.data import config as data_config  # pylint: disable=g-import-not-at-top
  from resnet_jax.data import core  # pylint: disable=g-import-not-at-top
  dataset = data_config.resolve(dataset)
  size = dataset.image_size
  if dataset.name == "synthetic":
    return core.DatasetInfo(dataset.name, dataset.num_classes, (size, size, 3),
                            dataset.synthetic_train_size, dataset.synthetic_eval_size, True)
  if dataset.name == "image_folder":
    from resnet_jax.data import decoding, sources  # pylint: disable=g-import-not-at-top
    train = sources.folder_records(dataset.data_dir, dataset.train_split)
    evaluation = sources.folder_records(dataset.data_dir, dataset.eval_split)
    shape = tuple(decoding.peek_shape(train))
    if max(shape[:2]) > 64:
      shape = (224, 224, 3)
    return core.DatasetInfo(dataset.name, dataset.num_classes, shape, len(train), len(evaluation))
  sizes = SPLIT_SIZES[dataset.name]
  shape = (224, 224, 3) if dataset.name == "imagenet2012" else (32, 32, 3)
  return core.DatasetInfo(dataset.name, data_config.NUM_CLASSES[dataset.name], shape,
                          sizes[dataset.train_split], sizes[dataset.eval_split])


class Target:
  """A config's steps, built for the devices of a TPU topology as the trainer builds them."""

  def __init__(self, config: ml_collections.ConfigDict, devices: list[Any]):
    import jax  # pylint: disable=g-import-not-at-top
    from flax import nnx  # pylint: disable=g-import-not-at-top
    from resnet_jax import data  # pylint: disable=g-import-not-at-top
    from resnet_jax.models import analysis  # pylint: disable=g-import-not-at-top
    from resnet_jax.training import optim, loop  # pylint: disable=g-import-not-at-top
    self.config = config
    self.mesh = data.core.make_mesh(devices)
    self.platform = data.core.platform(self.mesh)
    self.num_devices = len(devices)
    self.num_processes = len({device.process_index for device in devices})
    loop.validate(config, self.mesh)
    dataset = loop.dataset_config(config)
    self.info = dataset_info(dataset)
    self.on_device = data.pipeline.held_on_device(self.info.image_shape, self.info.train_size,
                                                  self.mesh)
    # As the datasets offer them: small or synthetic images by their centre view alone.
    protocols = (data.OnDeviceDataset.eval_protocols if self.on_device or self.info.synthetic
                 else data.core.EVAL_PROTOCOLS)
    data.core.check_protocol(config.eval_protocol, self.info, protocols)
    model = nnx.eval_shape(lambda: loop.create_model(config, self.info.num_classes,
                                                      config.seed, self.platform))
    self.macs_of = lambda height, width: analysis.count_macs(model, (height, width, 3))
    self.recipe = optim.create(config)
    self.state = loop.abstract_train_state(config, self.info.num_classes, self.mesh, self.recipe)
    self.dtype = loop.dtype_for(config, self.platform)
    self._dataset, self._jax, self._train = dataset, jax, loop

  def train_step(self, batch_size: int) -> StepReport:
    """Compiles the train step at global batch `batch_size`."""
    from resnet_jax import data  # pylint: disable=g-import-not-at-top
    if self.on_device:
      inputs = data.on_device.abstract(self.mesh, self.info, seed=self._dataset.seed,
                                       augment=self._dataset.augment)
      batch_of = inputs.train_iterator(batch_size).batch
    else:  # A streamed dataset's inputs are the batch itself (`PrefetchIterator.batch`).
      inputs = self._batch(batch_size, [self.info.image_shape[:2]])
      batch_of = lambda inputs, step: inputs
    per_chip = batch_size // self.num_devices
    model_flops = 6 * self.macs_of(*self.info.image_shape[:2]) * per_chip
    jitted = self._train.jit_train_step(self.recipe, self.mesh, batch_of)
    return compile_step("train", jitted, (self.state, inputs), per_chip, per_chip, model_flops)

  def eval_steps(self, batch_size: int) -> list[tuple[str, Callable[[], StepReport]]]:
    """The evaluation step of the config's protocol at global batch `batch_size`, as (name,
    compile) pairs: one for center and 10crop, one per aspect bucket for multiscale."""
    protocol = self.config.eval_protocol
    if protocol == "center":
      view_sets = {"eval": [self.info.image_shape[:2]]}
    elif protocol == "10crop":
      view_sets = {"eval 10crop": [self.info.image_shape[:2]] * 10}
    else:
      from resnet_jax.data import imagenet  # pylint: disable=g-import-not-at-top
      aspects = sorted({aspect for ratio in imagenet.MULTISCALE_ASPECTS
                        for aspect in (ratio, 1 / ratio)})
      view_sets = {f"eval multiscale {aspect:.2f}": [tuple(size) for size in
                                                     imagenet.multiscale_sizes(aspect)]
                   for aspect in aspects}
    per_chip = batch_size // self.num_devices
    jitted = self._train.jit_eval_step(self.mesh)

    def compile_views(name, views):
      model_flops = 2 * sum(self.macs_of(*view) for view in views) * per_chip
      return compile_step(name, jitted, (self.state, self._batch(batch_size, views)), per_chip,
                          per_chip * len(views), model_flops)

    return [(name, lambda name=name, views=views: compile_views(name, views))
            for name, views in view_sets.items()]

  def _batch(self, batch_size: int, views: list[tuple[int, int]]):
    """An abstract global `Batch` of float32 views of the given sizes, sharded on "data"."""
    from resnet_jax import data  # pylint: disable=g-import-not-at-top
    jax, jnp = self._jax, self._jax.numpy
    sharding = data.core.batch_sharding(self.mesh)
    images = [jax.ShapeDtypeStruct((batch_size, *view, 3), jnp.float32, sharding=sharding)
              for view in views]
    return data.Batch(images=images[0] if len(images) == 1 else tuple(images),
                      labels=jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=sharding),
                      mask=jax.ShapeDtypeStruct((batch_size,), jnp.bool_, sharding=sharding))


def largest_batch_per_chip(compile_at: Callable[[int], StepReport], chip: Chip,
                           fits: StepReport | None, fails: int | None,
                           step: int = BATCH_GRANULARITY,
                           emit: Callable[[str], None] = lambda line: None) -> StepReport:
  """The report of the largest per-chip batch (a multiple of `step`) whose step compiles
  within the chip's HBM, found by compiling (`compile_at(per_chip)`), from a batch that fits
  (`fits`) and one that does not (`fails`), either of which may be unknown.

  Memory grows about linearly with the batch: after a fit, the next guess is where the line
  through the two largest fits (through the origin while there is one) reaches the HBM; after a
  failure, the middle of the bracket, so that every compile narrows it. It ends when a fitting
  batch and a failing one are one step apart.
  """
  reports = {fits.batch_per_chip: fits} if fits is not None else {}
  failed = fails

  def attempt(per_chip: int) -> bool:
    nonlocal failed
    try:
      report = compile_at(per_chip)
    except OutOfMemory:
      report = None
    fitted = report is not None and report.fits(chip)
    emit(f"search: {per_chip} per chip "
         + (f"fits ({_gib(report.memory_bytes)} GiB)" if fitted else "does not fit"))
    if fitted:
      reports[per_chip] = report
    else:
      failed = per_chip if failed is None else min(failed, per_chip)
    return fitted

  while not reports:  # Halve until something fits.
    guess = max(step, (failed if failed is not None else 2 * step) // 2 // step * step)
    if not attempt(guess) and guess == step:
      raise OutOfMemory(f"not even {step} images per chip fit")
  last_fit = True
  while True:
    best = max(reports)
    if failed is not None and failed - best <= step:
      return reports[best]
    if last_fit:
      low, high = sorted(reports)[-2:] if len(reports) >= 2 else (0, best)
      low_bytes = reports[low].memory_bytes if low else 0
      slope = (reports[high].memory_bytes - low_bytes) / (high - low)
      guess = best + (chip.hbm_bytes - reports[best].memory_bytes) / slope if slope > 0 else 2 * best
    else:
      guess = (best + failed) / 2
    upper = (failed - 1) // step * step if failed is not None else math.inf
    last_fit = attempt(int(min(max(guess // step * step, best + step), upper)))


def _gib(num_bytes: float) -> str:
  return f"{num_bytes / GIB:.2f}"


def describe(report: StepReport, topology: Topology, num_devices: int, num_processes: int,
             streamed: bool, images_per_core: float) -> str:
  """The one line the command prints for a compiled step."""
  chip = topology.chip
  m = report.memory
  floor, bound = report.floor_s(chip)
  ceiling = report.ceiling_images_per_s(chip)
  line = (f"{report.step}: {report.batch_per_chip} per chip, compiled in {report.compile_s:.1f} s; "
          f"memory per chip {_gib(report.memory_bytes)} GiB of {_gib(chip.hbm_bytes)} GiB "
          f"({'fits' if report.fits(chip) else 'DOES NOT FIT'}; arguments {_gib(m['arguments'])}, "
          f"outputs {_gib(m['outputs'])}, aliased {_gib(m['aliased'])}, temporaries "
          f"{_gib(m['temporaries'])}, code {_gib(m['code'])}); "
          f"{report.xla_flops / 1e9:,.1f} GFLOP per chip (XLA) against "
          f"{report.model_flops / 1e9:,.1f} from the model's MACs "
          f"({report.xla_flops / report.model_flops:.2f}x); "
          f"floor {floor * 1e3:.2f} ms, {bound}-bound (FLOPs {report.xla_flops / chip.peak_flops * 1e3:.2f} ms, "
          f"HBM {report.xla_bytes / chip.hbm_bytes_per_s * 1e3:.2f} ms): at most "
          f"{ceiling:,.0f} images/s per chip")
  if report.step == "train":
    per_host = ceiling * num_devices / num_processes
    if streamed:
      line += (f"; each host feeds {per_host:,.0f} images/s: "
               f"{math.ceil(per_host / images_per_core)} cores at {images_per_core:g} images/s "
               "per core")
    else:
      line += "; the data is held on the chips: no host input pipeline"
  return line


def record(report: StepReport, topology: Topology, config: ml_collections.ConfigDict,
           overrides: list[str], num_devices: int, num_processes: int, streamed: bool,
           images_per_core: float) -> dict[str, Any]:
  """A JSON-ready record of a compiled step (`--record`)."""
  chip = topology.chip
  floor, bound = report.floor_s(chip)
  ceiling = report.ceiling_images_per_s(chip)
  per_host = ceiling * num_devices / num_processes
  return {
      "model": config.model, "topology": topology.name, "overrides": overrides,
      "chips": num_devices, "hosts": num_processes, "step": report.step,
      "batch_per_chip": report.batch_per_chip, "global_batch": report.batch_per_chip * num_devices,
      "compile_s": round(report.compile_s, 1), "memory_bytes": report.memory_bytes,
      "memory": report.memory, "hbm_bytes": chip.hbm_bytes, "fits": report.fits(chip),
      "xla_flops": report.xla_flops, "model_flops": report.model_flops,
      "xla_bytes": report.xla_bytes, "floor_s": floor, "bound": bound,
      "ceiling_images_per_s_per_chip": ceiling,
      "host_cores": (math.ceil(per_host / images_per_core)
                     if streamed and report.step == "train" else 0),
  }


def run(config: ml_collections.ConfigDict, topology_name: str, *, largest_batch: bool = False,
        which: str = "all", images_per_core: float = STREAMING_IMAGES_PER_CORE,
        overrides: tuple[str, ...] = (),
        emit: Callable[[str], None] = print,
        record_to: epath.Path | None = None) -> list[StepReport]:
  """Compiles every step of `config` for `topology_name` (`which`: "all", "train" or "eval");
  returns their reports.

  Raises CompileError for a bad topology, a missing libtpu or a bad config, and for a step that
  does not fit (naming the largest per-chip batch that does), before or instead of the rest.
  """
  topology = parse_topology(topology_name)
  devices = topology_devices(topology)
  try:
    target = Target(config, devices)
  except ValueError as error:
    raise CompileError(str(error)) from None
  n, hosts = target.num_devices, target.num_processes
  emit(f"compile: {config.model} on {topology.name} ({n} chips, {hosts} "
       f"host{'s' if hosts > 1 else ''}, "
       f"{devices[0].device_kind}), batch {config.batch_size} ({config.batch_size // n} per chip), "
       f"eval batch {config.eval_batch_size}, {target.dtype}, "
       f"{'data held on the chips' if target.on_device else 'data streamed by the hosts'}")
  # A training batch is whole batch norm groups: per chip, a multiple of what n chips need.
  group = config.batch_norm_group
  train_granularity = (math.lcm(BATCH_GRANULARITY, group // math.gcd(group, n)) if group
                       else BATCH_GRANULARITY)
  steps = []
  if which in ("all", "train"):
    steps.append(("train", "batch_size", lambda: target.train_step(config.batch_size),
                  lambda per_chip: target.train_step(per_chip * n), train_granularity))
  if which in ("all", "eval"):
    for name, compile_eval in target.eval_steps(config.eval_batch_size):
      steps.append((name, "eval_batch_size", compile_eval,
                    lambda per_chip, name=name: dict(target.eval_steps(per_chip * n))[name](),
                    BATCH_GRANULARITY))
  reports = []
  for name, field, compile_now, compile_at, granularity in steps:
    try:
      report = compile_now()
    except OutOfMemory:
      report = None
    per_chip = config[field] // n
    if report is None or not report.fits(topology.chip):
      try:
        largest = largest_batch_per_chip(compile_at, topology.chip, None, per_chip,
                                         granularity, emit)
      except OutOfMemory as error:
        raise CompileError(f"{name} at {per_chip} per chip does not fit in a {topology.generation} "
                           f"chip's {_gib(topology.chip.hbm_bytes)} GiB of HBM, and {error}.") from None
      raise CompileError(
          f"{name} at {per_chip} per chip (--config.{field}={config[field]}) does not fit in a "
          f"{topology.generation} chip's {_gib(topology.chip.hbm_bytes)} GiB of HBM; the largest "
          f"that does is {largest.batch_per_chip} per chip (--config.{field}="
          f"{largest.batch_per_chip * n}, {_gib(largest.memory_bytes)} GiB).")
    found = [report]
    if largest_batch and name == "train":
      found.append(largest_batch_per_chip(compile_at, topology.chip, report, None, granularity,
                                          emit))
    for item in found:
      emit(describe(item, topology, n, hosts, not target.on_device, images_per_core)
           + (" (the largest that fits)" if item is not report else ""))
      if record_to is not None:
        entry = record(item, topology, config, list(overrides), n, hosts, not target.on_device,
                       images_per_core)
        entry["largest"] = item is not report
        with record_to.open("a") as file:
          file.write(json.dumps(entry) + "\n")
      reports.append(item)
  return reports


def _define_flags() -> None:
  cli.define_config_flag()
  flags.DEFINE_string("topology", None, "The TPU slice to compile for, GENERATION:SHAPE in chips: "
                      f"{', '.join(CHIPS)}; e.g. v5e:16x16 (256 chips), v4:2x2x1, v6e:2x4.")
  flags.DEFINE_enum("steps", "all", ["all", "train", "eval"], "Which steps to compile: the "
                    "train step, the evaluation steps, or both. (Each compile holds on to host "
                    "memory until the process ends: ResNet-1202's two need more than 24 GB together.)")
  flags.DEFINE_bool("largest_batch", False, "Also find, by compiling, the largest per-chip "
                    "batch whose train step fits.")
  flags.DEFINE_float("host_images_per_core", STREAMING_IMAGES_PER_CORE, "Images/s one host core "
                     "decodes and augments in the streaming pipeline (BENCHMARKS.md).")
  flags.DEFINE_string("record", None, "Append each compiled step's numbers to this file, one "
                      "JSON line each.")


def main(argv: list[str]) -> None:
  del argv  # No positional arguments (cli.run).
  if not flags.FLAGS.topology:
    cli.fail("--topology is missing; pass the TPU slice to compile for, e.g. --topology=v5e:2x2.")
  overrides = tuple(arg for arg in sys.argv[1:] if arg.startswith("--config."))
  try:
    run(flags.FLAGS.config, flags.FLAGS.topology, largest_batch=flags.FLAGS.largest_batch,
        which=flags.FLAGS.steps,
        images_per_core=flags.FLAGS.host_images_per_core, overrides=overrides,
        record_to=epath.Path(flags.FLAGS.record) if flags.FLAGS.record else None)
  except CompileError as error:
    cli.fail(str(error))


if __name__ == "__main__":
  cli.run(main, _define_flags)
