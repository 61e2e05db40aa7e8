"""Time to build a model, with its draws made in one program and op by op.

    python benchmarks/build_time.py --models=cifar_resnet20,resnet50 --repeats=3

Each build runs in a fresh process, as a user's first `models.create` does: the import, the
first build and a second build of the same network in that process are timed apart. Builds
alternate between the fast build (the library's) and the op-by-op one (each initializer
called eagerly, `resnet._drawn_together` off), so both see the same background load; the best
of `--repeats` is printed, with the ratio. Figures in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ONE_PROCESS = """
import json, sys, time
from importlib import metadata
started = time.perf_counter()
import jax
from flax import nnx
from resnet_jax import models
from resnet_jax.models import resnet
imported = time.perf_counter()
name, op_by_op = sys.argv[1], sys.argv[2] == "op_by_op"
if op_by_op:
  resnet._drawn_together = lambda key, shape, dtype: False
builds = []
for _ in range(2):
  begun = time.perf_counter()
  model = models.create(name, num_classes=10 if name.startswith("cifar_") else 1000,
                        rngs=nnx.Rngs(0))
  jax.block_until_ready(nnx.state(model))
  builds.append(time.perf_counter() - begun)
print(json.dumps({"import": imported - started, "first": builds[0], "second": builds[1],
                  "jax": metadata.version("jax")}))
"""


def one_process(name: str, how: str) -> dict:
  env = dict(os.environ, PYTHONPATH=REPO)
  output = subprocess.run([sys.executable, "-c", ONE_PROCESS, name, how], env=env, check=True,
                          capture_output=True, text=True).stdout
  return json.loads(output.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="cifar_resnet20,cifar_resnet110,resnet50")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}")
  for name in args.models.split(","):
    runs = {"op_by_op": [], "fast": []}
    for _ in range(args.repeats):
      for how in runs:
        runs[how].append(one_process(name, how))
    best = {how: {field: min(run[field] for run in results) for field in ("first", "second")}
            for how, results in runs.items()}
    print(f"{name} (jax {runs['fast'][0]['jax']}): first build {best['op_by_op']['first']:.2f} s "
          f"op by op, {best['fast']['first']:.2f} s fast ({best['op_by_op']['first'] / best['fast']['first']:.1f}x); "
          f"second build {best['op_by_op']['second']:.2f} s -> {best['fast']['second']:.2f} s; "
          f"import {min(run['import'] for run in runs['fast']):.2f} s", flush=True)


if __name__ == "__main__":
  main()
