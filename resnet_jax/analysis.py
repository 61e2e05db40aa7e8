"""Analyses of trained networks: layer responses (Fig. 7) and training curves (Figs. 1, 4, 6).

`layer_responses(model, images)` follows Sec. 4.2's analysis: "the outputs of each
3x3 layer, after BN and before other nonlinearity (ReLU/addition)", in eval mode.
Residual functions that are close to zero show up as small responses (Fig. 7).
"""

from __future__ import annotations

import json
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from resnet_jax import models


def layer_responses(model: models.ResNet, images: jax.Array | np.ndarray) -> np.ndarray:
  """Std of every 3x3 layer's output after BN, before the addition and ReLU, in layer order.

  Read from the model's own `intermediates`. The standard deviation is over every
  element of the layer's output for `images` (N, H, W, C). On CIFAR nets the first
  entry is the 3x3 stem conv (the paper's "1st layer"), then the two convs of every
  basic block; bottleneck nets give their middle 3x3 convs. Plain nets give the
  same points. Puts `model` in eval mode.
  """
  if not all(isinstance(block, models.PostActivationBlock) for block in model.blocks):
    raise ValueError("layer responses are defined for the paper's post-activation blocks; "
                     "a pre-activation block has no BN right after its convs.")
  model.eval()
  out = model.intermediates(jnp.asarray(images))
  responses = [out["stem_norm"]] if tuple(model.stem_conv.kernel_size) == (3, 3) else []
  for block, block_out in zip(model.blocks, out["blocks"]):
    responses += [output for conv, output in zip(block.convs, block_out["residual_branch"])
                  if tuple(conv.kernel_size) == (3, 3)]
  return np.asarray(jax.device_get([jnp.std(r) for r in responses]), np.float64)


def read_metrics(workdir: epath.PathLike) -> list[dict]:
  """The records of a workdir's metrics.jsonl (local or gs://); [] when there is none."""
  path = epath.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def training_curves(workdirs: Sequence[epath.PathLike]) -> dict[str, dict[str, np.ndarray]]:
  """Training and test error (%) against iterations, per workdir (keyed by str(workdir)).

  Returns {"train_step", "train_error", "test_step", "test_error"} arrays for each
  workdir. A resumed run logs again the steps between its last checkpoint and the
  stop; the record written last for a step wins. Training records give `top1_error`
  in percent; those of runs older than that, `train_error` as a fraction.
  """
  curves = {}
  for workdir in workdirs:
    by_step = {"train": {}, "eval": {}}
    for record in read_metrics(workdir):
      if record.get("kind") in by_step:
        by_step[record["kind"]][record["step"]] = record
    train_steps, test_steps = sorted(by_step["train"]), sorted(by_step["eval"])
    curves[str(workdir)] = {
        "train_step": np.asarray(train_steps, np.int64),
        "train_error": np.asarray([_train_error(by_step["train"][s]) for s in train_steps]),
        "test_step": np.asarray(test_steps, np.int64),
        "test_error": np.asarray([by_step["eval"][s]["top1_error"] for s in test_steps]),
    }
  return curves


def _train_error(record: dict) -> float:
  return record["top1_error"] if "top1_error" in record else 100 * record["train_error"]
