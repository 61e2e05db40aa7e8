"""Time to the first step of a resumed run, with and without the persistent compilation cache.

    python benchmarks/resume_start.py --model=cifar_resnet110 --repeats=2

Trains one step in a fresh workdir (filling its cache, WORKDIR/compilation_cache), then
resumes it one step at a time, alternating a run with the cache and one with
`--compilation_cache=off`, so both see the same background load. Each run is the user's
command, `python -m resnet_jax.main`, on small synthetic data (the data phase is not what is
measured); the time to the first step is from the process's launch to its first progress line
(`log_every_steps=1`), and the compile time is the one the run reports. Figures in
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "cifar_resnet20.py")


def run_until_first_step(workdir: str, model: str, steps: int, cache: bool
                         ) -> tuple[float, float]:
  """(seconds from launch to the first progress line, compile seconds) of one run to `steps`."""
  command = [sys.executable, "-m", "resnet_jax.main", f"--config={CONFIG}", f"--workdir={workdir}",
             f"--config.model={model}", "--config.dataset.name=synthetic",
             "--config.dataset.synthetic_train_size=1024",
             "--config.dataset.synthetic_eval_size=256", f"--config.num_train_steps={steps}",
             "--config.lr_boundaries=()", "--config.log_every_steps=1",
             f"--config.eval_every_steps={steps}", f"--config.checkpoint_every_steps={steps}",
             *([] if cache else ["--compilation_cache=off"])]
  env = {key: value for key, value in os.environ.items() if key != "JAX_COMPILATION_CACHE_DIR"}
  env["PYTHONPATH"] = REPO
  launched = time.perf_counter()
  process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             text=True, cwd=REPO)
  first_step = compile_seconds = None
  for line in process.stderr:
    if compile_seconds is None and (match := re.search(r"\] compile: train step in ([\d.]+) s", line)):
      compile_seconds = float(match.group(1))
    if first_step is None and re.search(rf"\] \[.*\] step {steps}/{steps} ", line):
      first_step = time.perf_counter() - launched
  if process.wait() or first_step is None:
    raise SystemExit(f"{' '.join(command)} failed (status {process.returncode})")
  return first_step, compile_seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="cifar_resnet110")
  parser.add_argument("--repeats", type=int, default=2)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory(dir=os.path.expanduser("~")) as workdir:
    cold, cold_compile = run_until_first_step(workdir, args.model, 1, cache=True)
    print(f"{args.model}: fresh run, empty cache: first step after {cold:.1f} s "
          f"(compile {cold_compile:.1f} s)")
    times = {True: [], False: []}
    step = 1
    for _ in range(args.repeats):
      for cache in (True, False):
        step += 1
        times[cache].append(run_until_first_step(workdir, args.model, step, cache))
  for cache, label in ((True, "with the cache"), (False, "without (--compilation_cache=off)")):
    first = statistics.median(t for t, _ in times[cache])
    compile_ = statistics.median(c for _, c in times[cache])
    print(f"{args.model}: resumed, {label}: first step after {first:.1f} s "
          f"(compile {compile_:.1f} s); runs: "
          + ", ".join(f"{t:.1f}/{c:.1f}" for t, c in times[cache]))
  with_cache = statistics.median(t for t, _ in times[True])
  without = statistics.median(t for t, _ in times[False])
  print(f"{args.model}: the cache brings the first step {without / with_cache:.2f}x sooner "
        f"({without - with_cache:.1f} s saved per restart)")


if __name__ == "__main__":
  main()
