"""`python -m resnet_jax.main` with one fault injected from outside the package.

  python tests/faulty_trainer.py FAULT --config=... --workdir=...

FAULT is one of
  compile       SIGKILL while the train step is traced, before any step runs
  step:N        SIGKILL once step N is dispatched
  commit:N      SIGKILL inside checkpoint N's asynchronous write: every file written, none committed
  committed:N   SIGKILL right after checkpoint N is committed
  eval          SIGKILL inside the first evaluation
  restore       SIGKILL inside the first checkpoint restore
  sigterm:N     SIGTERM (a preemption notice) to this process once step N is dispatched
  sigterm-running:N  SIGTERM once the device runs step N (however far the host has dispatched)
  sigterm-startup    SIGTERM while the model is built, before any step
  pause:N       once step N is dispatched, PAUSE_SECONDS before the trainer asks whether a
                preemption notice reached every process (so that one sent to a peer at step N
                settles on step N rather than racing the run's last steps)
  fill:N        once step N is dispatched, fill the workdir's filesystem to 100 kB short of full
  hold:N        once step N is dispatched, wait (up to HOLD_SECONDS) until the file
                <workdir>.go exists, so that a test can act while the run is surely live
and is announced on stderr as "fault: FAULT" when it strikes.
"""
import itertools
import os
import runpy
import shutil
import signal
import sys
import threading
import time

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint._src.path import atomicity

from resnet_jax.training import loop

FAULT = sys.argv.pop(1)
KIND, _, ARG = FAULT.partition(":")
WORKDIR = next(arg.split("=", 1)[1] for arg in sys.argv if arg.startswith("--workdir="))
# jax.distributed agrees on a preemption step in the background, over the coordination
# service: milliseconds on an idle machine, and generously covered here on a loaded one.
PAUSE_SECONDS = 5
HOLD_SECONDS = 300


def strike(*args, signum=signal.SIGKILL, **kwargs):
  """Announces the fault and sends `signum` to this process; stands in for any function."""
  del args, kwargs
  print(f"fault: {FAULT}", file=sys.stderr, flush=True)
  os.kill(os.getpid(), signum)


_commit = atomicity.on_commit_callback  # Renames a checkpoint's temporary directory into place.


async def _on_commit(tmp_dir, **kwargs):
  if KIND == "commit" and tmp_dir.get_final().name == ARG:
    strike()
  await _commit(tmp_dir, **kwargs)
  if KIND == "committed" and tmp_dir.get_final().name == ARG:
    strike()


_reached = loop._Preemption.reached  # Called once after every step.


def _after_step(self, step):
  if step == int(ARG) and KIND == "fill":
    with open(f"{WORKDIR}.fill", "wb") as filler:
      filler.write(bytes(shutil.disk_usage(WORKDIR).free - 100_000))
    print(f"fault: {FAULT}", file=sys.stderr, flush=True)
  elif step == int(ARG) and KIND == "pause":
    time.sleep(PAUSE_SECONDS)
  elif step == int(ARG) and KIND == "hold":
    print(f"fault: {FAULT}", file=sys.stderr, flush=True)
    deadline = time.monotonic() + HOLD_SECONDS
    while not os.path.exists(f"{WORKDIR}.go") and time.monotonic() < deadline:
      time.sleep(0.1)
  elif step == int(ARG):
    strike(signum=signal.SIGTERM if KIND == "sigterm" else signal.SIGKILL)
  return _reached(self, step)


_compile = loop._compile  # Compiles the train step ahead of the loop.


def _signalling_compile(train_fn, state, inputs):
  """The compiled train step, whose step ARG sends SIGTERM once the device has run it."""
  compiled, seconds = _compile(train_fn, state, inputs)
  steps = itertools.count(int(state.step) + 1)

  def step_fn(*args):
    state, step_metrics = compiled(*args)
    if next(steps) == int(ARG):
      # The metrics, which no later step is given: the loop donates the state to the next
      # step, which may delete it before this thread looks.
      threading.Thread(target=lambda: (jax.block_until_ready(step_metrics),
                                       strike(signum=signal.SIGTERM)), daemon=True).start()
    return state, step_metrics

  return step_fn, seconds


_create_model = loop.create_model


def _signalled_create_model(*args, **kwargs):
  strike(signum=signal.SIGTERM)
  return _create_model(*args, **kwargs)


atomicity.on_commit_callback = _on_commit
if KIND == "compile":
  loop.train_step = strike
elif KIND == "eval":
  loop.evaluate = strike
elif KIND == "sigterm-running":
  loop._compile = _signalling_compile
elif KIND == "sigterm-startup":
  loop.create_model = _signalled_create_model
elif KIND == "restore":
  ocp.CheckpointManager.restore = strike
elif KIND in ("step", "sigterm", "pause", "fill", "hold"):
  loop._Preemption.reached = _after_step
elif KIND not in ("commit", "committed"):
  sys.exit(f"unknown fault {FAULT!r}")
runpy.run_module("resnet_jax.main", run_name="__main__", alter_sys=True)
