"""One run per workdir: a run claims its workdir at start-up and releases it when it ends.

The claim is the directory `workdir/claim/`, made by an exclusive mkdir, holding `holder.json`:
the holder's host, process id, start time and a heartbeat that a background thread refreshes
every `HEARTBEAT_SECONDS`; on Linux also the boot's id and the process's start in clock ticks
since boot (/proc), which tell the holder from a later process given the same id. A second run
on a claimed workdir stops with one line naming the holder. A claim is stale, and taken over
with a warning, when its holder is a process of this host that is no longer running (its id
gone, or naming another process), or when its heartbeat is older than `STALE_AFTER_SECONDS`
and the holder is on another host. A live holder of this host keeps its claim however long it
is silent (stopped by SIGSTOP or a debugger, its machine asleep); where /proc is missing (macOS),
or in a claim written without the process's start, the heartbeat rule decides for this host too.

A run can still lose its claim while it is silent: a run on another host (or, without /proc,
on this one) takes it over after `STALE_AFTER_SECONDS`. Its heartbeat reads the claim before
each renewal and stops once another run's is there, and `Claim.check`, which the trainer calls
before each of its writes, raises `LostClaimError`: the run stops without writing anything more.

Locally the mkdir and the rename of a stale claim out of the way are atomic, so of two runs
starting together exactly one holds the workdir. On gs:// a directory is a name prefix: epath
can neither create one exclusively nor rename one atomically, so two runs reaching the claim
within the same fraction of a second may both take it; a run started later is refused.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

HEARTBEAT_SECONDS = 60.0
STALE_AFTER_SECONDS = 600.0


class LostClaimError(RuntimeError):
  """Another run took over this run's claim on its workdir (or the claim was removed)."""


def _process_instance(pid: int) -> dict:
  """What tells process `pid` from a later one given the same id: the boot's id and the
  process's start in clock ticks since boot (field 22 of /proc/PID/stat); {} without /proc."""
  try:
    with open("/proc/sys/kernel/random/boot_id") as boot_id, open(f"/proc/{pid}/stat") as stat:
      boot, fields = boot_id.read().strip(), stat.read()
  except OSError:
    return {}
  # Field 2, the command's name in parentheses, may itself hold spaces and parentheses.
  return {"boot_id": boot, "process_start": int(fields[fields.rindex(")") + 2:].split()[19])}


def _holder() -> dict:
  now = time.time()
  return {"host": socket.gethostname(), "pid": os.getpid(), **_process_instance(os.getpid()),
          "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now)),
          "heartbeat": now, "token": uuid.uuid4().hex}


def _describe(holder: dict) -> str:
  return f"process {holder['pid']} on {holder['host']} since {holder['since']}"


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Another user's process.
    return True
  return True


def _stale_reason(holder: dict) -> str | None:
  """Why `holder` no longer holds its claim, or None if it may still be running."""
  if holder["host"] == socket.gethostname():
    if not _alive(holder["pid"]):
      return "is no longer running"
    running = _process_instance(holder["pid"])
    if running and running.keys() <= holder.keys():
      if {key: holder[key] for key in running} != running:
        return "is no longer running (its process id names another process now)"
      return None  # Running, however long it has been silent.
  silent = time.time() - holder["heartbeat"]
  if silent > STALE_AFTER_SECONDS:
    return f"has not renewed its claim for {silent / 60:.0f} min"
  return None


class Claim:
  """This process's claim on a workdir; refreshed in the background until `release`, or until
  another run takes it over."""

  def __init__(self, directory: epath.Path, holder: dict):
    self.directory, self.holder = directory, holder
    self._lost: str | None = None  # Why `check` raises, once the claim is found lost.
    self._lock = threading.Lock()  # `check` never reads holder.json while the heartbeat writes it.
    self._stop = threading.Event()
    self._heartbeat = threading.Thread(target=self._beat, daemon=True, name="workdir-claim")
    self._heartbeat.start()

  def _beat(self) -> None:
    while not self._stop.wait(HEARTBEAT_SECONDS):
      with self._lock:
        if not self._still_held():
          return
        renewed = dict(self.holder, heartbeat=time.time())
        try:
          _write(self.directory, renewed)
        except Exception as error:  # pylint: disable=broad-except  # Retried at the next beat.
          logging.warning("Could not renew the claim on %s (%s).", self.directory.parent, error)
        else:
          self.holder = renewed

  def _still_held(self) -> bool:
    """Whether holder.json still names this claim; records the loss if not. Under the lock."""
    if self._lost is None:
      try:
        held = _parse((self.directory / "holder.json").read_text())
      except FileNotFoundError:  # Removed, or renamed aside by a run taking it over.
        held = {}
      except OSError:  # The filesystem failing for a moment: asked again at the next check.
        return True
      if held.get("token") != self.holder["token"]:
        workdir = self.directory.parent
        taker = f"to {_describe(held)}" if held else "to a run that took it over or removed it"
        silent = (time.time() - self.holder["heartbeat"]) / 60
        self._lost = (f"lost the claim on workdir {workdir} {taker} (this run was silent for "
                      f"{silent:.0f} min); stopping without writing anything more.")
    return self._lost is None

  def check(self) -> None:
    """Raises LostClaimError if another run holds this claim now (one small read)."""
    with self._lock:
      if not self._still_held():
        raise LostClaimError(self._lost)

  def release(self) -> None:
    self._stop.set()
    self._heartbeat.join()
    if _read(self.directory).get("token") == self.holder["token"]:
      self.directory.rmtree()

  def __enter__(self) -> Claim:
    return self

  def __exit__(self, *exc_info) -> None:
    self.release()


def _write(directory: epath.Path, holder: dict) -> None:
  # Written aside and renamed into place: a reader never sees half a holder.
  written = directory / f"holder.json.{holder['token']}"
  written.write_text(json.dumps(holder))
  written.replace(directory / "holder.json")


def _parse(text: str) -> dict:
  """The holder `text` names; {} if it names none."""
  try:
    holder = json.loads(text)
  except ValueError:
    return {}
  return holder if {"host", "pid", "since", "heartbeat", "token"} <= holder.keys() else {}


def _read(directory: epath.Path) -> dict:
  """The holder written in a claim; {} if it is unreadable (still being written, or gone)."""
  try:
    return _parse((directory / "holder.json").read_text())
  except OSError:
    return {}


def _create(directory: epath.Path, holder: dict) -> Claim | None:
  try:
    directory.mkdir()
  except FileExistsError:
    return None
  try:
    _write(directory, holder)
  except BaseException:
    directory.rmtree()  # A claim without its holder would refuse every later run.
    raise
  return Claim(directory, holder)


def _in_use(workdir: epath.Path, holder: dict) -> ValueError:
  if not holder:
    return ValueError(f"workdir {workdir} is claimed by a run whose claim {workdir / 'claim'} "
                      "is unreadable; if no run uses this workdir, delete that directory.")
  return ValueError(f"workdir {workdir} is in use by {_describe(holder)}; wait for that run to "
                    "end, or pass another --workdir.")


def acquire(workdir: epath.Path) -> Claim:
  """Claims `workdir` for this process, taking over a stale claim; ValueError if it is held."""
  directory = workdir / "claim"
  mine = _holder()
  claim = _create(directory, mine)
  if claim:
    return claim
  held = _read(directory)
  reason = _stale_reason(held) if held else None
  if reason is None:
    raise _in_use(workdir, held)
  # Renamed aside, not deleted: of several runs taking over together only one can move it.
  aside = workdir / f"claim.stale-{mine['token']}"
  try:
    directory.rename(aside)
  except FileNotFoundError:  # Another run moved it first.
    raise _in_use(workdir, _read(directory)) from None
  if _read(aside).get("token") != held["token"]:  # Moved a newer claim than the stale one read.
    aside.rename(directory)
    raise _in_use(workdir, _read(directory))
  aside.rmtree()
  logging.warning("Took over workdir %s from %s, which %s.", workdir, _describe(held), reason)
  claim = _create(directory, mine)
  if not claim:
    raise _in_use(workdir, _read(directory))
  return claim


def acquire_for_job(workdir: epath.Path) -> Claim | None:
  """Process 0 claims `workdir` for the whole job; every process raises if it cannot."""
  claim, error = None, None
  if jax.process_index() == 0:
    try:
      claim = acquire(workdir)
    except ValueError as raised:
      error = raised
  _raise_on_every_process(error, ValueError(
      f"workdir {workdir} is in use by another run (process 0 names it)."))
  return claim


def check_for_job(claim: Claim | None, workdir: epath.Path) -> None:
  """`Claim.check` of process 0's claim (`claim`, None on the other processes), whose
  LostClaimError every process raises: a collective where there are several."""
  error = None
  if claim is not None:
    try:
      claim.check()
    except LostClaimError as raised:
      error = raised
  _raise_on_every_process(error, LostClaimError(
      f"lost the claim on workdir {workdir} to another run (process 0 names it); stopping "
      "without writing anything more."))


def _raise_on_every_process(error: Exception | None, elsewhere: Exception) -> None:
  """Raises process 0's `error` there, and `elsewhere` on the other processes, if it is set."""
  if jax.process_count() > 1 and not multihost_utils.broadcast_one_to_all(
      np.int32(error is None)) and error is None:
    error = elsewhere
  if error is not None:
    raise error
