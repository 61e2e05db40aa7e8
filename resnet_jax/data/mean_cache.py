"""Caches the per-pixel training-set mean (paper section 4.2) as a small .npy file.

The cache lives in `cache_dir` when given, else $RESNET_JAX_CACHE_DIR, else ~/.cache/resnet_jax:
never next to the data, which is often read-only or shared.
"""
import hashlib
import os
import pathlib
import tempfile
from typing import Callable

import jax
import numpy as np


def cache_path(key: str, cache_dir: str | None = None) -> pathlib.Path:
  root = cache_dir or os.environ.get("RESNET_JAX_CACHE_DIR") or pathlib.Path.home() / ".cache" / "resnet_jax"
  digest = hashlib.sha1(key.encode()).hexdigest()[:12]
  readable = "".join(c if c.isalnum() or c in "-_" else "_" for c in key)[:60]
  return pathlib.Path(root) / f"mean_{readable}_{digest}.npy"


def load_or_compute(key: str, compute: Callable[[], np.ndarray], cache_dir: str | None = None) -> np.ndarray:
  """The cached array for `key`, or `compute()` saved for next time (by process 0 only)."""
  path = cache_path(key, cache_dir)
  if path.exists():
    return np.load(path)
  mean = np.asarray(compute(), np.float32)
  if jax.process_index() == 0:
    try:
      path.parent.mkdir(parents=True, exist_ok=True)
      with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npy", delete=False) as file:
        np.save(file, mean)
      os.replace(file.name, path)  # Atomic: concurrent runs never read a half-written file.
    except OSError:
      pass  # An unwritable cache costs one recomputation per run, nothing else.
  return mean
