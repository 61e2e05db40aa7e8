"""Caches an array computed once from a dataset as a small .npy file: the per-pixel training-set
mean (paper sections 3.4, 4.2), the evaluation images' sizes (multi-scale testing).

`write` saves such a file atomically (the trainer's WORKDIR/input_mean.npy too).

The cache lives in `cache_dir` when given, else $RESNET_JAX_CACHE_DIR, else ~/.cache/resnet_jax
(local or gs://): never next to the data, which is often read-only or shared.
"""
import hashlib
import io
import os
import uuid
from typing import Callable

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from numpy.typing import DTypeLike


def cache_path(key: str, cache_dir: str | None = None, kind: str = "mean") -> epath.Path:
  root = epath.Path(cache_dir or os.environ.get("RESNET_JAX_CACHE_DIR") or "~/.cache/resnet_jax")
  digest = hashlib.sha1(key.encode()).hexdigest()[:12]
  readable = "".join(c if c.isalnum() or c in "-_" else "_" for c in key)[:60]
  return root.expanduser() / f"{kind}_{readable}_{digest}.npy"


def load_or_compute(key: str, compute: Callable[[], np.ndarray], cache_dir: str | None = None, *,
                    shape: tuple[int, ...], dtype: DTypeLike = np.float32, kind: str = "mean",
                    what: str = "the per-pixel mean") -> np.ndarray:
  """The cached array of `kind` for `key`, or `compute()` as `dtype` saved for next time; `what`
  names it in the log. `key` must name everything the array is computed from (its data, and the
  parameters that shape the result), so that other data never finds it. A cached file that is
  unreadable or holds another `shape` or `dtype` is computed again, with one WARNING naming it.

  With several processes, all of them load or all compute, so `compute` may be collective (each
  process reading a share): a cache on each host's own disk can hold the file on some hosts and
  not on others. Each process saves its copy, so such caches all hold it afterwards.
  """
  path = cache_path(key, cache_dir, kind)
  array = _read(path, shape, np.dtype(dtype), what) if path.exists() else None
  cached = array is not None
  if jax.process_count() > 1:
    cached = bool(multihost_utils.process_allgather(np.asarray(cached)).all())
  if cached:
    logging.info("Loading %s from %s", what, path)
    return array
  array = np.asarray(compute(), dtype)
  try:
    # Concurrent runs never read a half-written file; processes sharing the cache replace the
    # file with equal copies.
    write(path, array)
  except Exception:  # pylint: disable=broad-except  (OSError here, tf.errors.* on gs://)
    pass  # An unwritable cache costs one recomputation per run, nothing else.
  return array


def write(path: epath.Path, array: np.ndarray) -> None:
  """Saves `array` as the .npy file `path` (local or gs://, through etils.epath), its folder
  made if needed, atomically: written beside it under a name of its own, then renamed over it,
  so that a reader finds the old file or the new one, never half of one."""
  buffer = io.BytesIO()
  np.save(buffer, array)
  partial = path.parent / f".{path.name}.{uuid.uuid4().hex}"
  path.parent.mkdir(parents=True, exist_ok=True)
  partial.write_bytes(buffer.getvalue())
  partial.replace(path)


def _read(path: epath.Path, shape: tuple[int, ...], dtype: np.dtype,
          what: str) -> np.ndarray | None:
  """The array cached in `path`, or None (and a WARNING naming it) if it is not one of `shape`
  and `dtype`."""
  try:
    array = np.load(io.BytesIO(path.read_bytes()))
  except Exception as error:  # pylint: disable=broad-except  (numpy's ValueError, OSError, gs://)
    problem = f"is unreadable ({error})"
  else:
    if array.shape == tuple(shape) and array.dtype == dtype:
      return array
    problem = (f"holds a {array.dtype} array of shape {array.shape}, not {dtype} of shape "
               f"{tuple(shape)}")
  logging.warning("The cache file %s %s; computing %s again, and caching it anew.", path, problem,
                  what)
  return None
