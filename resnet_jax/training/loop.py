"""The training loop: data-parallel SGD over a device mesh, evaluation and checkpoints.

`train_and_evaluate(config, workdir)` reads as the algorithm: check the config,
claim the workdir (one run per workdir: `claim`, checked before each write), build the
mesh, data, model and optimizer and resume from the newest checkpoint (`_set_up`), then
step, log, evaluate and save until `num_train_steps` (`_train`). The config stops at the
trainer's edge: the jitted step is given the `optim.Recipe` made from it, nothing else.

Data parallelism is `jax.jit` over a one-axis mesh ("data"): batches are sharded
on it, parameters, BN statistics and optimizer state replicated. Batch norm
normalises, in training, each group of `config.batch_norm_group` consecutive images
of the global batch by its own statistics (`models.BatchNorm`), as each GPU of the
paper's runs normalised its own images: 64 of CIFAR's batch of 128 on two GPUs
(Sec. 4.2), 32 on ImageNet (Goyal et al., 2017, Sec. 2.3, 5.1). The groups are
consecutive rows of the batch, so a group size that divides the per-device batch
keeps every statistic on its device; with 0, batch norm normalises over the whole
global batch (XLA inserts the all-reduce).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import itertools
import signal
import time
from typing import Any, Callable, Iterator

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import serialize_executable
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from resnet_jax.training import checkpoints, claim, metrics, optim
from resnet_jax import data, models
from resnet_jax.data import mean_cache
from resnet_jax.models import cpu_kernels

# Exit status of a run stopped by SIGTERM (a preemption notice) after saving:
# EX_TEMPFAIL, "try again", so schedulers and scripts can tell it from a failure.
PREEMPTED_EXIT_CODE = 75
# WORKDIR/INPUT_MEAN_FILE: the mean the run's pipeline subtracts from pixels (`data.Dataset.mean`),
# written as the run starts, so that its weights can be used where its dataset is not.
INPUT_MEAN_FILE = "input_mean.npy"
# Training steps the host may dispatch ahead of the device: after a preemption notice the save
# waits for at most these and the step running (RELIABILITY.md).
MAX_STEPS_AHEAD = 2


class StartupError(Exception):
  """The run cannot start: a bad config, a missing dataset, an unusable workdir."""


class NonFiniteError(FloatingPointError):
  """Training produced a non-finite loss, gradient or weights, or a model non-finite scores."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32: the number of updates applied so far.
  params: nnx.State
  batch_stats: nnx.State
  opt_state: optax.OptState
  warmup: optim.Warmup  # The ResNet-110 warm-up (Sec. 4.2).
  nonfinite_step: jax.Array  # int32: first step with a non-finite loss, gradient or weights, else -1.
  graphdef: nnx.GraphDef = flax.struct.field(pytree_node=False)


@flax.struct.dataclass
class Weights:
  """A model as evaluation reads it (`eval_step`, which takes a `TrainState` too): its
  parameters, batch norm statistics and graph. `Weights.of(model)`."""
  params: nnx.State
  batch_stats: nnx.State
  graphdef: nnx.GraphDef = flax.struct.field(pytree_node=False)

  @classmethod
  def of(cls, model: models.ResNet) -> "Weights":
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    return cls(params=params, batch_stats=batch_stats, graphdef=graphdef)


def dtype_for(config: ml_collections.ConfigDict, platform: str) -> Any:
  """The compute dtype on devices of `platform`: the config's, else bfloat16 on TPU and
  float32 elsewhere."""
  name = config.dtype or ("bfloat16" if platform == "tpu" else "float32")
  if name not in ("float32", "bfloat16"):
    raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {name!r}.")
  return jnp.dtype(name)


def dataset_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.dataset`, its seed the run's (`config.seed`) unless `dataset.seed` sets it apart."""
  dataset = config.dataset.copy_and_resolve_references()
  if dataset.seed is None:
    dataset.seed = config.seed
  return dataset


# Config fields added since runs were recorded (config.json), and the value that lays out and
# reproduces such a run: before batch norm groups, the gradual warm-up and the BN decay switch,
# every batch norm took the whole batch, no warm-up ramped and every parameter was decayed.
# Runs from before the windowed warm-up recorded no window: their configs read with a window of 1.
_FIELDS_ADDED = {"batch_norm_group": 0, "lr_warmup_steps": 0, "lr_warmup_from": 0.0,
                 "weight_decay_batch_norm": True, "warmup_window": 1}


def recorded_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A run's recorded config (its config.json), each field added to the configs since then set
  as that run had it."""
  for field, value in _FIELDS_ADDED.items():
    if field not in config:
      config[field] = value
  return config


def create_model(config: ml_collections.ConfigDict, num_classes: int, seed: int,
                 platform: str) -> models.ResNet:
  """The config's network for devices of `platform` (`data.core.platform(mesh)`): its
  dtype (`dtype_for`), training kernels (`cpu_kernels.training_layers`) and batch norm groups
  (`config.batch_norm_group`, `models.BatchNorm`)."""
  layers = {"norm": models.BatchNorm, **cpu_kernels.training_layers(platform)}
  layers["norm"] = functools.partial(layers["norm"], group_size=config.batch_norm_group)
  return models.create(config.model, num_classes=num_classes, rngs=nnx.Rngs(seed),
                       dtype=dtype_for(config, platform), **config.model_overrides, **layers)


def create_train_state(model: models.ResNet, recipe: optim.Recipe) -> TrainState:
  """The state of step 0: `model`'s weights, and `recipe`'s optimizer and warm-up at their
  start."""
  graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
      opt_state=recipe.tx.init(params), warmup=recipe.init_warmup(),
      nonfinite_step=-jnp.ones((), jnp.int32),
      graphdef=graphdef)


def abstract_train_state(config: ml_collections.ConfigDict, num_classes: int, mesh: Mesh,
                         recipe: optim.Recipe) -> TrainState:
  """The train state's shapes, dtypes and shardings (replicated) on `mesh`, nothing computed:
  what a checkpoint restores into, and what `resnet_jax.training.compile` compiles the steps for."""
  replicated = NamedSharding(mesh, PartitionSpec())
  platform = data.core.platform(mesh)
  shapes = jax.eval_shape(lambda: create_train_state(
      create_model(config, num_classes, config.seed, platform), recipe))
  return jax.tree.map(
      lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated), shapes)


def jit_train_step(recipe: optim.Recipe, mesh: Mesh,
                   batch_of: Callable[[Any, jax.Array], data.Batch]):
  """The trainer's jitted step on `mesh`: (state, inputs) -> (state, metrics), the state
  donated and replicated, and the batch `batch_of(inputs, state.step)` made inside the step
  (`TrainIterator.batch`: an on-device dataset samples and augments there)."""
  step = lambda state, inputs: train_step(recipe, state, batch_of(inputs, state.step))
  return jax.jit(step, out_shardings=NamedSharding(mesh, PartitionSpec()), donate_argnums=0,
                 compiler_options=cpu_kernels.compiler_options(data.core.platform(mesh)))


def jit_eval_step(mesh: Mesh, preprocessing: Callable[[jax.Array], jax.Array] | None = None):
  """`eval_step`, jitted for the devices of `mesh`, with `preprocessing` (for batches of raw
  pixels: a `pretrained.Preprocessing`) applied to each view inside it."""
  step = eval_step if preprocessing is None else functools.partial(
      eval_step, preprocessing=preprocessing)
  return jax.jit(step, compiler_options=cpu_kernels.compiler_options(data.core.platform(mesh),
                                                                  training=False))


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return jnp.sum(jnp.where(mask, losses, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def topk_errors(scores: jax.Array, labels: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
  """Counts (not rates) of top-1 and top-5 mistakes over the unmasked rows.

  A label is in the top k when fewer than k other classes score at least as high: a tie counts
  against it (uniform scores are all wrong), and so does any NaN in its row.
  """
  k = min(5, scores.shape[-1])
  label_scores = jnp.take_along_axis(scores, labels[:, None], axis=-1)
  ranks = jnp.where(jnp.isnan(scores).any(axis=-1), scores.shape[-1],
                    jnp.sum(scores >= label_scores, axis=-1) - 1)
  return {"top1_errors": jnp.sum(mask & (ranks >= 1)), "top5_errors": jnp.sum(mask & (ranks >= k)),
          "count": jnp.sum(mask)}


def train_step(recipe: optim.Recipe, state: TrainState,
               batch: data.Batch) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD update on a global batch, by `recipe`'s optimizer at its learning rate of
  `state.step`. A non-finite loss, gradient or new weights leave the state as it was but for
  `nonfinite_step`, the first such step."""

  def loss_fn(params, batch_stats):
    # Merging from (copied) arguments lets BatchNorm update its statistics under grad.
    model = nnx.merge(state.graphdef, params, batch_stats, copy=True)
    model.train()
    logits = model(batch.images)
    return cross_entropy(logits, batch.labels, batch.mask), (logits, nnx.state(model, nnx.BatchStat))

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params, state.batch_stats)
  rate = recipe.learning_rate(state.step, state.warmup)
  opt_state = optim.set_learning_rate(state.opt_state, rate)
  updates, opt_state = recipe.tx.update(grads, opt_state, state.params, value=loss)
  errors = topk_errors(logits, batch.labels, batch.mask)
  train_error = errors["top1_errors"] / errors["count"]
  new_state = state.replace(
      step=state.step + 1, params=optax.apply_updates(state.params, updates),
      batch_stats=batch_stats, opt_state=opt_state,
      warmup=recipe.update_warmup(state.warmup, state.step, train_error))
  # The host stops at its next check of nonfinite_step, so no NaN ever reaches a checkpoint.
  # Global norms, not a test per leaf (BENCHMARKS.md); a norm that overflows float32 counts as
  # divergence.
  grad_norm, param_norm = optax.tree.norm(grads), optax.tree.norm(new_state.params)
  finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
            & jnp.isfinite(optax.tree.norm(batch_stats)))
  new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
  new_state = new_state.replace(nonfinite_step=jnp.where(
      finite | (state.nonfinite_step >= 0), state.nonfinite_step, state.step))
  # Errors in percent, as evaluate() reports them.
  step_metrics = {"loss": loss, "top1_error": 100 * train_error,
                  "top5_error": 100 * errors["top5_errors"] / errors["count"],
                  "grad_norm": grad_norm, "param_norm": param_norm,
                  "learning_rate": rate * recipe.plateau_scale(opt_state)}
  return new_state, step_metrics


def eval_step(state: TrainState | Weights, batch: data.Batch,
              preprocessing: Callable[[jax.Array], jax.Array] | None = None
              ) -> dict[str, jax.Array]:
  """Error counts of one (padded, masked) batch; multi-view batches average softmax scores.
  `preprocessing`, if given, maps each view (then raw pixels) to the model's input."""
  model = nnx.merge(state.graphdef, state.params, state.batch_stats)
  model.eval()
  views = data.views(batch)
  if preprocessing is not None:
    views = tuple(map(preprocessing, views))
  scores = [jax.nn.softmax(model(view)) for view in views]
  mean_scores = sum(scores) / len(scores)
  sums = topk_errors(mean_scores, batch.labels, batch.mask)
  sums["nonfinite"] = jnp.sum(batch.mask & ~jnp.isfinite(mean_scores).all(axis=-1))
  sums["loss_sum"] = jnp.sum(jnp.where(
      batch.mask, -jnp.log(jnp.take_along_axis(mean_scores, batch.labels[:, None], 1)[:, 0]
                           + 1e-12), 0.0))
  return sums


def evaluate(eval_fn, state: TrainState | Weights, batches) -> dict[str, float]:
  """Top-1/top-5 error (%) and loss over every example of the evaluation split."""
  totals = None
  for batch in batches:
    sums = eval_fn(state, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = int(totals["count"])
  if totals["nonfinite"]:
    scores = (f"the model's scores are not finite for {int(totals['nonfinite'])} of the {count} "
              "evaluation images")
    if isinstance(state, Weights):
      raise NonFiniteError(f"{scores}; check the weights and their preprocessing, or use "
                           "float32 (--config.dtype=float32).")
    raise NonFiniteError(
        f"{scores} at step {int(state.step)}, though its weights are; nothing of this step is "
        "saved. Lower the learning rate, or use float32 (--config.dtype=float32).")
  return {"top1_error": 100.0 * float(totals["top1_errors"]) / count,
          "top5_error": 100.0 * float(totals["top5_errors"]) / count,
          "loss": float(totals["loss_sum"]) / count, "examples": count}


class Preempted(BaseException):
  """SIGTERM before the first step, when there is nothing to save. Not an Exception, so that no
  `except Exception` on its way (a checkpoint restore's) takes it for a failure of its own."""


class _Preemption:
  """SIGTERM during start-up raises Preempted at once; once `training`, it is a flag the loop
  polls after each step. On many hosts jax.distributed handles it, and they agree on the step."""

  def __init__(self):
    self.requested = False
    self.training = False
    self._previous_handler = None

  def __enter__(self):
    if jax.process_count() == 1:
      self._previous_handler = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc_info):
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)

  def _handle(self, signum, frame):
    del signum, frame
    if not self.training:
      raise Preempted()
    self.requested = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      # jax.distributed's preemption service catches SIGTERM on every host and
      # makes all of them answer True at the same step.
      from jax.experimental import multihost_utils
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested


def validate(config: ml_collections.ConfigDict, mesh: Mesh | jax.sharding.AbstractMesh) -> None:
  """Every check of the config that needs no data and no compilation, for a run on `mesh` (an
  AbstractMesh: on devices not at hand); raises ValueError naming the fix."""
  optim.validate(config)
  if config.eval_protocol not in data.core.EVAL_PROTOCOLS:
    raise ValueError(f"unknown eval_protocol {config.eval_protocol!r}; choose one of "
                     f"{data.core.EVAL_PROTOCOLS}.")
  for field in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps",
                "eval_batch_size", "keep_checkpoints"):
    if config[field] <= 0:
      raise ValueError(f"{field} must be positive, got {config[field]}.")
  for field in ("batch_size", "eval_batch_size"):
    data.core.check_batch_size(config[field], mesh, name=field)
  group = config.batch_norm_group or 0
  if group < 0:
    raise ValueError(f"batch_norm_group must be positive, or 0 for batch norm over the whole "
                     f"batch; got {group}.")
  if group and config.batch_size % group:
    raise ValueError(
        f"batch_size {config.batch_size} is not a whole number of batch norm groups of {group} "
        f"images; use a multiple of {group} (e.g. --config.batch_size="
        f"{max(1, round(config.batch_size / group)) * group}) or a --config.batch_norm_group "
        f"that divides it.")


@contextlib.contextmanager
def _startup_errors() -> Iterator[None]:
  """Turns a ValueError (a bad config, a missing dataset, an unusable workdir) into a
  StartupError."""
  try:
    yield
  except ValueError as error:
    raise StartupError(str(error)) from error


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains `config.model` by the config's recipe; returns the final evaluation."""
  workdir = epath.Path(workdir)
  # Before any data is read: a bad config, an unusable workdir, another run in it.
  with _startup_errors():
    mesh = data.core.make_mesh()
    validate(config, mesh)
    created = checkpoints.check_writable(workdir)
    run_claim = claim.acquire_for_job(workdir)
  try:
    with run_claim or contextlib.nullcontext(), _Preemption() as preemption:
      try:
        with contextlib.ExitStack() as cleanup:
          run = _set_up(config, workdir, mesh, run_claim, cleanup)
          state, eval_result = _train(run, preemption)
          return _finish(run, state, eval_result)
      except Preempted:
        logging.warning("Preempted during start-up: nothing was trained or saved; rerun the same "
                        "command to start again.")
        raise SystemExit(PREEMPTED_EXIT_CODE) from None
  except StartupError:
    checkpoints.remove_if_empty(created)  # A run that never started leaves no workdir behind.
    raise


def _due(step: int, every: int, total: int) -> bool:
  """Whether something done `every` steps of a run of `total` steps falls at `step` (1-based):
  at each multiple of `every`, and at the last step."""
  return step % every == 0 or step == total


@dataclasses.dataclass(frozen=True)
class _Run:
  """A run ready for its first step (`_set_up`): what the loop reads and writes."""
  config: ml_collections.ConfigDict
  workdir: epath.Path
  started: float  # time.perf_counter() at the start of the set-up.
  recipe: optim.Recipe
  num_params: int
  dataset: data.Dataset
  eval_fn: Callable[[TrainState, data.Batch], dict[str, jax.Array]]
  manager: checkpoints.Manager
  writer: metrics.Writer
  check_claim: Callable[[], None]  # Before each write: stops a run whose workdir was taken over.
  state: TrainState  # Restored from the newest checkpoint, else step 0's.
  start_step: int  # The state's step: the updates applied before this command.
  train_iter: data.TrainIterator
  batches: Iterator[Any]  # Each step's inputs, the first one's included.
  train_fn: Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]] | None
  compile_seconds: float

  @property
  def steps(self) -> range:
    """The steps this command runs, numbered from 1 as `num_train_steps` counts them."""
    return range(self.start_step + 1, self.config.num_train_steps + 1)

  def evaluate(self, state: TrainState) -> dict[str, float]:
    with self.writer.paused("evaluation"):
      return evaluate(self.eval_fn, state, self.dataset.eval_batches(
          self.config.eval_batch_size, self.config.eval_protocol))


def _set_up(config: ml_collections.ConfigDict, workdir: epath.Path, mesh: Mesh,
            run_claim: claim.Claim | None, cleanup: contextlib.ExitStack) -> _Run:
  """Builds the data, model and optimizer, restores the newest checkpoint and compiles the train
  step; `cleanup` closes what it opens."""
  run_started = time.perf_counter()
  platform = data.core.platform(mesh)
  metrics.log_line("run: %s for %d steps of batch %d on %d %s devices, in %s", config.model,
                   config.num_train_steps, config.batch_size, mesh.size, platform, workdir)
  with _startup_errors():  # Everything else that can fail on a bad config, before compiling.
    started = time.perf_counter()
    dataset = data.create(dataset_config(config), mesh)
    info = dataset.info
    data.core.check_protocol(config.eval_protocol, info, dataset.eval_protocols)
    metrics.log_line("data: %s ready in %.1f s (%d training, %d evaluation images)", info.name,
                     time.perf_counter() - started, info.train_size, info.eval_size)
    started = time.perf_counter()
    model = create_model(config, info.num_classes, config.seed, platform)
    num_params = models.count_params(model)
    metrics.log_line("model: %s, %s parameters, built in %.1f s", config.model,
                     f"{num_params:,}", time.perf_counter() - started)
    manager = checkpoints.Manager(workdir, config, keep=config.keep_checkpoints,
                                  num_classes=info.num_classes)
    recipe = optim.create(config)
    state = jax.device_put(create_train_state(model, recipe), NamedSharding(mesh, PartitionSpec()))
    started = time.perf_counter()
    checkpoints.check_space(workdir, state)
    state, data_state = manager.restore_latest(state)
    start_step = int(state.step)
    train_iter = dataset.train_iterator(config.batch_size, start_step)
  if data_state is not None:
    train_iter.set_state(data_state)
  _report_restore(config, start_step, manager, time.perf_counter() - started)
  writer = metrics.Writer(workdir, total_steps=config.num_train_steps,
                          batch_size=config.batch_size, train_size=info.train_size,
                          dataset_name=info.name, start_step=start_step)
  writer.write_config(config)
  if jax.process_index() == 0:
    mean_cache.write(workdir / INPUT_MEAN_FILE, data.core.host_copy(dataset.mean))
  cleanup.callback(writer.close)
  # Saves in flight complete even when training stops on an error (a non-finite loss).
  cleanup.callback(manager.wait)
  cleanup.callback(train_iter.close)
  train_fn, compile_seconds, batches = None, 0.0, iter(())
  if start_step < config.num_train_steps:
    first_inputs = next(train_iter)
    train_fn, compile_seconds = _compile(
        jit_train_step(recipe, mesh, train_iter.batch), state, first_inputs)
    metrics.log_line("train: throughput and ETA count training steps only; evaluation and "
                     "checkpoint time is totalled in the closing line")
    batches = itertools.chain([first_inputs], train_iter)
    writer.start_timer(start_step)
  return _Run(config=config, workdir=workdir, started=run_started, recipe=recipe,
              num_params=num_params, dataset=dataset,
              eval_fn=jit_eval_step(mesh), manager=manager, writer=writer,
              check_claim=functools.partial(claim.check_for_job, run_claim, workdir),
              state=state, start_step=start_step, train_iter=train_iter, batches=batches,
              train_fn=train_fn, compile_seconds=compile_seconds)


def _train(run: _Run, preemption: _Preemption) -> tuple[TrainState, dict[str, float] | None]:
  """Runs `run.steps`, logging, evaluating and saving at the config's cadence; returns the last
  state and evaluation. Each of log, evaluation and save first checks the state is finite and,
  for a write, that the workdir is still this run's."""
  config, writer, state = run.config, run.writer, run.state
  total, pending, in_flight, eval_result = config.num_train_steps, [], collections.deque(), None
  warming_up = not bool(state.warmup.over)
  preemption.training = True
  for step, inputs in zip(run.steps, run.batches):
    with jax.transfer_guard("disallow"):  # Nothing may move between host and device here.
      state, step_metrics = run.train_fn(state, inputs)
    pending.append(step_metrics)
    in_flight.append(step_metrics["loss"])
    if len(in_flight) > MAX_STEPS_AHEAD:
      in_flight.popleft().block_until_ready()
    preempted = preemption.reached(step)
    if _due(step, config.log_every_steps, total) or preempted:
      _check_finite(state)
      run.check_claim()
      writer.write_train(step, jax.device_get(pending))
      pending = []
      if warming_up and state.warmup.over:
        warming_up = False
        writer.write_warmup_end(int(state.warmup.end_step), float(state.warmup.end_error),
                                run.recipe.warmup)
    evaluated = _due(step, config.eval_every_steps, total)
    if evaluated:
      _check_finite(state)  # Also waits for the steps still queued: they count as training.
      eval_result = run.evaluate(state)
      run.check_claim()
      writer.write_eval(step, eval_result)
    if _due(step, config.checkpoint_every_steps, total) or preempted:
      _check_finite(state)
      run.check_claim()
      with writer.paused("checkpoints"):
        run.manager.save(step, state, run.train_iter.get_state(),
                         eval_result if evaluated else None)
    if preempted:
      _stop_preempted(run, step)
  return state, eval_result


def _stop_preempted(run: _Run, step: int) -> None:
  """Once step `step` is saved: waits for the save, records the run and exits with
  PREEMPTED_EXIT_CODE."""
  run.manager.wait()
  run.writer.write_run(step, steps_run=step - run.start_step,
                       compile_seconds=run.compile_seconds,
                       wall_seconds=time.perf_counter() - run.started, ended="preempted")
  logging.warning("Preempted: saved step %d to %s; rerun the same command to resume.", step,
                  run.workdir)
  raise SystemExit(PREEMPTED_EXIT_CODE)


def _finish(run: _Run, state: TrainState, eval_result: dict[str, float] | None
            ) -> dict[str, float]:
  """Waits for the last save and writes the summary; returns the final evaluation."""
  with run.writer.paused("checkpoints"):
    run.manager.wait()
  if eval_result is None:  # Resumed at the final step: evaluate what was restored.
    eval_result = run.evaluate(state)
    run.writer.write_eval(run.start_step, eval_result, logged=False)
  best_step = run.manager.best_step()
  run.check_claim()
  run.writer.write_summary(run.config.model, eval_result, num_params=run.num_params,
                           steps_run=len(run.steps),
                           wall_seconds=time.perf_counter() - run.started,
                           compile_seconds=run.compile_seconds,
                           best_checkpoint=None if best_step is None
                           else run.manager.directory / str(best_step))
  return eval_result


def _report_restore(config: ml_collections.ConfigDict, start_step: int,
                    manager: checkpoints.Manager, seconds: float) -> None:
  # On every process: each restores its own part of the state.
  if not start_step:
    logging.info("restore: no checkpoint in %s; training from step 0", manager.directory)
  elif start_step >= config.num_train_steps:
    logging.info("restore: the run finished already (step %d of %d, restored in %.1f s); "
                   "evaluating its final state again, nothing to train", start_step,
                   config.num_train_steps, seconds)
  else:
    logging.info("restore: resumed at step %d of %d from %s in %.1f s; the data order "
                   "continues from there", start_step, config.num_train_steps,
                   manager.directory / str(start_step), seconds)


def _compile(train_fn, state: TrainState, inputs) -> tuple[jax.stages.Compiled, float]:
  """The train step compiled ahead of the first step: its time is reported alone, and the loop
  can only run this one executable (a shape or sharding drifting between steps is an error,
  not a silent recompilation).

  The log line says whether jax's persistent compilation cache served it, read from the cache
  directory (through etils.epath, so gs:// too): an entry more, the executable was stored; none
  more in a cache that held entries, it was loaded (jax stores every compile that took
  `jax_persistent_cache_min_compile_time_secs`; a quicker one in a cache filled by other
  programs reads the same), unless it cannot be stored at all: jaxlib 0.12.0.1 cannot
  serialise a CPU executable that calls oneDNN (the CPU training step), and jax then only
  warns that it could not write the entry.
  """
  cache_dir = jax.config.jax_compilation_cache_dir
  entries_before = _cache_entries(cache_dir)
  started = time.perf_counter()
  compiled = train_fn.lower(state, inputs).compile()
  seconds = time.perf_counter() - started
  if not cache_dir:
    source = "no persistent compilation cache"
  elif _cache_entries(cache_dir) - entries_before:
    source = f"compiled, and stored in the persistent compilation cache {cache_dir}"
  elif (unstorable := _why_unstorable(compiled)) is not None:
    source = (f"compiled; this jaxlib cannot store it in the persistent compilation cache "
              f"({unstorable})")
  elif entries_before:
    source = f"loaded from the persistent compilation cache {cache_dir}"
  else:
    source = "compiled; too quick to be worth the persistent compilation cache"
  metrics.log_line("compile: train step in %.1f s (%s)", seconds, source)
  return compiled, seconds


def _why_unstorable(compiled: jax.stages.Compiled) -> str | None:
  """Why `compiled` cannot be serialised, as the persistent cache would store it; None if it can."""
  try:
    serialize_executable.serialize(compiled)
  except Exception as error:  # pylint: disable=broad-except
    return f"{type(error).__name__}: {error}"
  return None


def _cache_entries(cache_dir: str | None) -> set[str]:
  """The names in the persistent compilation cache directory `cache_dir` (none without one)."""
  directory = epath.Path(cache_dir) if cache_dir else None
  if directory is None or not directory.exists():
    return set()
  return {entry.name for entry in directory.iterdir()}


def _check_finite(state: TrainState) -> None:
  bad_step = int(state.nonfinite_step)
  if bad_step >= 0:
    raise NonFiniteError(
        f"non-finite loss, gradient or weights at step {bad_step + 1}; the last finite state "
        "was not saved over. Lower the learning rate, check the input data, or use float32.")
