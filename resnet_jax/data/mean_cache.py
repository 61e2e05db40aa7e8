"""Caches the per-pixel training-set mean (paper section 4.2) as a small .npy file.

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


def cache_path(key: str, cache_dir: str | None = None) -> epath.Path:
  root = epath.Path(cache_dir or os.environ.get("RESNET_JAX_CACHE_DIR") or "~/.cache/resnet_jax")
  digest = hashlib.sha1(key.encode()).hexdigest()[:12]
  readable = "".join(c if c.isalnum() or c in "-_" else "_" for c in key)[:60]
  return root.expanduser() / f"mean_{readable}_{digest}.npy"


def load_or_compute(key: str, compute: Callable[[], np.ndarray], cache_dir: str | None = None) -> np.ndarray:
  """The cached array for `key`, or `compute()` saved for next time (by process 0 only)."""
  path = cache_path(key, cache_dir)
  if path.exists():
    logging.info("Loading the per-pixel mean from %s", path)
    return np.load(io.BytesIO(path.read_bytes()))
  mean = np.asarray(compute(), np.float32)
  if jax.process_index() == 0:
    buffer = io.BytesIO()
    np.save(buffer, mean)
    partial = path.parent / f".{path.name}.{uuid.uuid4().hex}"
    try:
      path.parent.mkdir(parents=True, exist_ok=True)
      partial.write_bytes(buffer.getvalue())
      partial.replace(path)  # Concurrent runs never read a half-written file.
    except Exception:  # pylint: disable=broad-except  (OSError here, tf.errors.* on gs://)
      pass  # An unwritable cache costs one recomputation per run, nothing else.
  return mean
