"""SGD with momentum, weight decay and the paper's learning-rate schedules.

Recipe (Sec. 3.4 and 4.2): SGD, momentum 0.9, weight decay 1e-4, and a
learning rate counted in iterations:

  "piecewise"  0.1, divided by 10 at each boundary (CIFAR: 32k and 48k of 64k).
               With `warmup_learning_rate` (ResNet-110, Sec. 4.2) training starts
               at that rate and switches to the schedule once the training error
               falls below `warmup_until_train_error` (80%, "about 400 iterations"):
               the mean error of the last `warmup_window` batches (`Warmup`).
  "plateau"    0.1, divided by 10 when the training loss plateaus (ImageNet),
               via optax's reduce_on_plateau.

With `lr_warmup_steps` N, either schedule starts with a gradual warm-up (Goyal et
al., 2017, Sec. 2.2, for large batches): the rate rises linearly from
`lr_warmup_from` at iteration 0 to `learning_rate` at iteration N, "a constant
amount at each iteration", and follows the schedule from there. It is not the
ResNet-110 warm-up above, and a config takes one or the other.

Weight decay is an L2 penalty on every parameter (conv and classifier weights,
classifier bias, BN scales and shifts), as in the Caffe and Torch recipes the
paper's numbers come from; decay and gradient are summed before momentum, as
PyTorch's SGD does. `weight_decay_batch_norm` False leaves the BN scales and shifts
undecayed, as Goyal et al. do (Sec. 5.1: "following [He et al.] we do not apply
weight decay on the learnable BN coefficients"); a BN parameter is one under a
module attribute named `*norm` or `norms`, as every batch norm of resnet_jax.models is.

A config is read in two places only: `validate` checks it, and `create` turns it into a
`Recipe` (the optax transformation, the schedule and the ResNet-110 warm-up rule), which is all
that the train step is given.
"""

import dataclasses
import math

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

SCHEDULES = ("piecewise", "plateau")
# The float fields of a schedule, none of which may be NaN or infinite.
_FLOAT_FIELDS = ("learning_rate", "momentum", "weight_decay", "lr_decay", "warmup_learning_rate",
                 "warmup_until_train_error", "lr_warmup_from")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the problem and the fix for an unusable schedule."""
  if config.lr_schedule not in SCHEDULES:
    raise ValueError(f"unknown lr_schedule {config.lr_schedule!r}; choose one of {SCHEDULES}.")
  for field in _FLOAT_FIELDS:
    if not math.isfinite(config[field]):
      raise ValueError(f"{field} must be a finite number, got {config[field]}.")
  if config.num_train_steps <= 0:
    raise ValueError(f"num_train_steps must be positive, got {config.num_train_steps}.")
  if config.learning_rate <= 0:
    raise ValueError(f"learning_rate must be positive, got {config.learning_rate}.")
  if not 0 <= config.momentum < 1:
    raise ValueError(f"momentum must be in [0, 1), got {config.momentum}.")
  if config.weight_decay < 0:
    raise ValueError(f"weight_decay must be non-negative, got {config.weight_decay}.")
  boundaries = list(config.lr_boundaries)
  if boundaries != sorted(set(boundaries)) or (boundaries and boundaries[0] <= 0):
    raise ValueError(f"lr_boundaries must be positive and strictly increasing, got {boundaries}.")
  if config.warmup_learning_rate and config.warmup_window <= 0:
    raise ValueError(f"warmup_window must be positive, got {config.warmup_window}.")
  if boundaries and boundaries[-1] >= config.num_train_steps:
    raise ValueError(
        f"the schedule ends before it starts: lr_boundaries {boundaries} reach past "
        f"num_train_steps={config.num_train_steps}; raise num_train_steps or lower the boundaries.")
  if config.lr_warmup_steps < 0:
    raise ValueError(f"lr_warmup_steps must be non-negative (0: no gradual warm-up), got "
                     f"{config.lr_warmup_steps}.")
  if config.lr_warmup_steps:
    if config.warmup_learning_rate:
      raise ValueError("lr_warmup_steps (a gradual warm-up) and warmup_learning_rate (ResNet-110's "
                       "warm-up) are two warm-ups; set one of them to 0.")
    if config.lr_warmup_from < 0:
      raise ValueError(f"lr_warmup_from must be non-negative, got {config.lr_warmup_from}.")
    limit, name = ((boundaries[0], "the first of lr_boundaries") if boundaries
                   else (config.num_train_steps, "num_train_steps"))
    if config.lr_warmup_steps > limit:
      raise ValueError(f"lr_warmup_steps={config.lr_warmup_steps} reaches past {name} ({limit}): "
                       f"the warm-up must end before the schedule moves on; use at most {limit}.")


@flax.struct.dataclass
class Warmup:
  """Where the ResNet-110 warm-up stands (Sec. 4.2: 0.01 "until the training error is below 80%").

  The training error is the mean over the last `WarmupRule.window` batches, not one batch's or
  a short average's: a single batch of 128 images varies by about 3.5 points around an error of
  80%, so a lucky one (or a few) would end the warm-up early.
  """
  recent_errors: jax.Array  # float32 [window]: the last batches' errors, newest first.
  end_step: jax.Array  # int32: the iterations done when the warm-up ended; -1 while it lasts.
  end_error: jax.Array  # float32: the windowed training error that ended it.

  @property
  def over(self) -> jax.Array:
    return self.end_step >= 0


@dataclasses.dataclass(frozen=True)
class WarmupRule:
  """ResNet-110's warm-up (Sec. 4.2): the rate is `learning_rate` until the mean training error
  (a fraction) of the last `window` batches is below `until_train_error`."""
  learning_rate: float
  until_train_error: float
  window: int


@dataclasses.dataclass(frozen=True)
class Recipe:
  """A config's optimizer and learning rate, made once by `create`: all that the train step
  knows of the config."""
  tx: optax.GradientTransformationExtraArgs  # Weight decay, SGD with momentum[, plateau].
  schedule: optax.Schedule  # Iteration -> rate: the gradual warm-up's line, then the schedule.
  warmup: WarmupRule | None  # The ResNet-110 warm-up; None: no such warm-up.
  plateau: bool  # Whether `tx` ends in reduce_on_plateau (the "plateau" schedule).

  def init_warmup(self) -> Warmup:
    """The warm-up before the first iteration; without a `WarmupRule`, one already over."""
    window = self.warmup.window if self.warmup else 1
    return Warmup(recent_errors=jnp.ones((window,), jnp.float32),
                  end_step=jnp.asarray(-1 if self.warmup else 0, jnp.int32),
                  end_error=jnp.zeros((), jnp.float32))

  def update_warmup(self, warmup: Warmup, step, batch_error) -> Warmup:
    """`warmup` after the update at `step` (0-based) whose batch had training error
    `batch_error` (a fraction): it ends once `WarmupRule.window` batches were seen and their
    mean is below `WarmupRule.until_train_error`."""
    recent = jnp.concatenate([jnp.asarray(batch_error, jnp.float32)[None],
                              warmup.recent_errors[:-1]])
    if self.warmup is None:  # Over before the first iteration.
      return warmup.replace(recent_errors=recent)
    mean = jnp.mean(recent)
    ends = (~warmup.over & (step + 1 >= recent.shape[0])
            & (mean < self.warmup.until_train_error))
    return Warmup(recent_errors=recent, end_step=jnp.where(ends, step + 1, warmup.end_step),
                  end_error=jnp.where(ends, mean, warmup.end_error))

  def learning_rate(self, step, warmup: Warmup) -> jax.Array:
    """The rate of the update at `step` (traceable): `schedule`'s, or the `WarmupRule`'s while
    `warmup` lasts."""
    rate = self.schedule(step)
    if self.warmup:
      rate = jnp.where(warmup.over, rate, self.warmup.learning_rate)
    return rate

  def plateau_scale(self, opt_state) -> jax.Array:
    """The factor reduce_on_plateau applies on top of the scheduled rate (1 otherwise)."""
    if not self.plateau:
      return jnp.ones(())
    return _only(opt_state, "ReduceLROnPlateauState").scale


def create(config: ml_collections.ConfigDict) -> Recipe:
  """The config's `Recipe`. The optimizer's learning rate is set each step, through
  `set_learning_rate`."""
  transforms = [
      optax.add_decayed_weights(config.weight_decay,
                                mask=None if config.weight_decay_batch_norm else _not_batch_norm),
      optax.inject_hyperparams(optax.sgd)(learning_rate=config.learning_rate,
                                          momentum=config.momentum),
  ]
  plateau = config.lr_schedule == "plateau"
  if plateau:
    transforms.append(optax.contrib.reduce_on_plateau(
        factor=config.lr_decay, patience=config.plateau_patience,
        accumulation_size=config.plateau_accumulation_steps, min_scale=1e-4))
  warmup = (WarmupRule(learning_rate=config.warmup_learning_rate,
                       until_train_error=config.warmup_until_train_error,
                       window=config.warmup_window) if config.warmup_learning_rate else None)
  return Recipe(tx=optax.chain(*transforms), schedule=_schedule(config), warmup=warmup,
                plateau=plateau)


def _schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """`learning_rate`, divided by `lr_decay` at each of `lr_boundaries`; on the gradual warm-up's
  line for the first `lr_warmup_steps`."""
  piecewise = optax.piecewise_constant_schedule(
      config.learning_rate, {b: config.lr_decay for b in config.lr_boundaries})
  if not config.lr_warmup_steps:
    return piecewise
  start, end, steps = config.lr_warmup_from, config.learning_rate, config.lr_warmup_steps

  def schedule(step):
    # Not optax.linear_schedule, whose float32 arithmetic starts a little off lr_warmup_from.
    return jnp.where(step < steps, start + (end - start) * step / steps, piecewise(step))

  return schedule


def _not_batch_norm(params):
  """The decay mask of `weight_decay_batch_norm` False: False for batch norm parameters."""
  def is_batch_norm(key) -> bool:
    name = getattr(key, "key", None)
    return isinstance(name, str) and (name.endswith("norm") or name == "norms")
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not any(is_batch_norm(key) for key in path), params)


def set_learning_rate(opt_state, rate):
  """Writes `rate` into the injected SGD hyperparameters of `opt_state`."""
  _only(opt_state, "learning_rate")  # tree_set would write every field of that name.
  return optax.tree_utils.tree_set(opt_state, learning_rate=jnp.asarray(rate, jnp.float32))


def _only(opt_state, name: str):
  """The one field or state named `name` in `opt_state`, found by name, never by position."""
  found = optax.tree_utils.tree_get_all_with_path(opt_state, name)
  if len(found) != 1:
    raise KeyError(f"the optimizer state holds {len(found)} values named {name!r}, not one; "
                   f"resnet_jax.training.optim.create's chain changed: {[path for path, _ in found]}")
  return found[0][1]
