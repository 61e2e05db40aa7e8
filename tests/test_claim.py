"""One run per workdir: a live run's claim refuses a second run; a stale one is taken over."""
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from etils import epath

import processes
from resnet_jax.training import claim


def write_holder(workdir: epath.Path, **fields) -> dict:
  holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": "2026-01-01 00:00:00 UTC",
            "heartbeat": time.time(), "token": "old", **fields}
  (workdir / "claim").mkdir(parents=True)
  (workdir / "claim" / "holder.json").write_text(json.dumps(holder))
  return holder


def dead_pid() -> int:
  process = subprocess.Popen([sys.executable, "-c", ""])
  process.wait()
  return process.pid


def instance(pid: int) -> dict:
  """What a claim records to tell process `pid` from a later one given its id: the boot's id and
  the process's start in clock ticks since boot (field 22 of /proc/PID/stat)."""
  with open("/proc/sys/kernel/random/boot_id") as boot_id, open(f"/proc/{pid}/stat") as stat:
    return {"boot_id": boot_id.read().strip(),
            "process_start": int(stat.read().rsplit(")", 1)[1].split()[19])}


needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/stat"),
                                reason="no /proc: the heartbeat rule decides for this host too")


def test_a_claim_refuses_a_second_one_until_it_is_released(tmp_path):
  workdir = epath.Path(tmp_path)
  held = claim.acquire(workdir)
  holder = json.loads((workdir / "claim" / "holder.json").read_text())
  assert (holder["host"], holder["pid"]) == (socket.gethostname(), os.getpid())
  with pytest.raises(ValueError) as refused:
    claim.acquire(workdir)
  assert str(refused.value) == (
      f"workdir {workdir} is in use by process {os.getpid()} on {socket.gethostname()} since "
      f"{holder['since']}; wait for that run to end, or pass another --workdir.")
  held.release()
  assert not (workdir / "claim").exists()
  claim.acquire(workdir).release()


@pytest.mark.parametrize("fields,reason", [
    (lambda: {"pid": dead_pid()}, "which is no longer running"),
    (lambda: {"host": "elsewhere", "heartbeat": time.time() - 11 * 60},
     "which has not renewed its claim for 11 min"),
    # Its process id names a live process, started after the holder or in a later boot.
    pytest.param(lambda: {**instance(os.getpid()), "process_start": 0},
                 "which is no longer running (its process id names another process now)",
                 marks=needs_proc),
    pytest.param(lambda: {**instance(os.getpid()), "boot_id": "a boot before"},
                 "which is no longer running (its process id names another process now)",
                 marks=needs_proc),
    # A live process id in a claim without the process's start (an older claim, or written
    # without /proc), silent for too long: the heartbeat rule.
    (lambda: {"heartbeat": time.time() - 11 * 60}, "which has not renewed its claim for 11 min")],
    ids=["dead_process", "silent_host", "reused_pid", "pid_of_an_earlier_boot",
         "silent_claim_without_process_start"])
def test_a_stale_claim_is_taken_over_with_a_warning(tmp_path, caplog, fields, reason):
  workdir = epath.Path(tmp_path)
  stale = write_holder(workdir, **fields())
  with caplog.at_level(logging.WARNING):
    held = claim.acquire(workdir)
  assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
      f"Took over workdir {workdir} from process {stale['pid']} on {stale['host']} since "
      f"{stale['since']}, {reason}."]
  assert json.loads((workdir / "claim" / "holder.json").read_text())["token"] == held.holder["token"]
  assert sorted(p.name for p in workdir.iterdir()) == ["claim"]  # Nothing left aside.
  held.release()


@needs_proc
def test_a_live_holder_of_this_host_keeps_its_claim_however_long_it_is_silent(tmp_path):
  workdir = epath.Path(tmp_path)
  stopped = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    os.kill(stopped.pid, signal.SIGSTOP)  # As a run stopped by SIGSTOP or a debugger.
    holder = write_holder(workdir, pid=stopped.pid, heartbeat=time.time() - 11 * 60,
                          **instance(stopped.pid))
    with pytest.raises(ValueError, match=re.escape(
        f"workdir {workdir} is in use by process {stopped.pid} on {socket.gethostname()} since")):
      claim.acquire(workdir)
  finally:
    stopped.kill()
    stopped.wait()
  assert json.loads((workdir / "claim" / "holder.json").read_text()) == holder


def claim_in(workdir: epath.Path) -> dict | None:
  """The holder of the workdir's claim; None if there is no claim."""
  return (json.loads((workdir / "claim" / "holder.json").read_text())
          if (workdir / "claim").exists() else None)


@pytest.mark.parametrize("taken_over", [True, False], ids=["taken_over", "removed"])
def test_a_run_that_lost_its_claim_stops_at_its_check_and_leaves_the_claim_alone(
    tmp_path, monkeypatch, taken_over):
  monkeypatch.setattr(claim, "HEARTBEAT_SECONDS", 0.05)
  workdir = epath.Path(tmp_path)
  held = claim.acquire(workdir)
  held.check()  # Its own.
  # What a run taking it over leaves in its place (after 11 minutes' silence, on another host).
  (workdir / "claim").rmtree()
  taker = write_holder(workdir, host="elsewhere", token="new") if taken_over else None
  time.sleep(0.5)  # Ten heartbeats, which must not write over the claim.
  assert claim_in(workdir) == taker
  by = (f"to process {os.getpid()} on elsewhere since 2026-01-01 00:00:00 UTC" if taken_over
        else "to a run that took it over or removed it")
  with pytest.raises(claim.LostClaimError, match=re.escape(
      f"lost the claim on workdir {workdir} {by} (this run was silent for 0 min); stopping "
      "without writing anything more.")):
    held.check()
  held.release()
  assert claim_in(workdir) == taker


def test_a_live_claim_of_another_host_is_refused(tmp_path):
  workdir = epath.Path(tmp_path)
  write_holder(workdir, host="elsewhere", pid=dead_pid(), heartbeat=time.time() - 9 * 60)
  with pytest.raises(ValueError, match=r"is in use by process \d+ on elsewhere since 2026-01-01"):
    claim.acquire(workdir)


def test_an_unreadable_claim_is_refused_and_named(tmp_path):
  workdir = epath.Path(tmp_path)
  (workdir / "claim").mkdir()
  with pytest.raises(ValueError, match=re.escape(
      f"workdir {workdir} is claimed by a run whose claim {workdir}/claim is unreadable; if no "
      "run uses this workdir, delete that directory.")):
    claim.acquire(workdir)


def test_the_heartbeat_renews_the_claim_until_release(tmp_path, monkeypatch):
  monkeypatch.setattr(claim, "HEARTBEAT_SECONDS", 0.05)
  workdir = epath.Path(tmp_path)
  held = claim.acquire(workdir)
  first = json.loads((workdir / "claim" / "holder.json").read_text())["heartbeat"]
  time.sleep(0.5)
  assert json.loads((workdir / "claim" / "holder.json").read_text())["heartbeat"] > first
  held.release()
  time.sleep(0.2)
  assert not (workdir / "claim").exists()  # The stopped heartbeat wrote nothing after.


def test_a_second_run_on_a_live_workdir_stops_at_start_up_naming_the_first(
    tmp_path, compilation_cache):
  workdir = tmp_path / "w"
  args = ["--config=configs/cifar_resnet20.py:smoke", "--config.model=cifar_resnet8",
          "--config.num_train_steps=2", "--config.lr_boundaries=(1,)", f"--workdir={workdir}"]
  env = processes.environment(8, **compilation_cache)
  log = tmp_path / "first.log"
  with open(log, "w") as stderr:  # Held at step 1 until workdir.go exists.
    first = subprocess.Popen([sys.executable, processes.FAULTY_TRAINER, "hold:1", *args],
                             cwd=processes.REPO, env=env, stdout=subprocess.DEVNULL,
                             stderr=stderr, text=True)
  try:
    deadline = time.monotonic() + 300
    while "fault: hold:1" not in log.read_text():
      assert first.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
      time.sleep(0.2)
    holder = json.loads((workdir / "claim" / "holder.json").read_text())
    assert holder["pid"] == first.pid
    (second,) = processes.run([[sys.executable, "-m", "resnet_jax.main", *args]], env, 300)
    assert second.returncode == 2, second.stderr[-3000:]
    assert [line for line in second.stderr.splitlines() if line.strip()] == [
        f"error: workdir {workdir} is in use by process {first.pid} on {socket.gethostname()} "
        f"since {holder['since']}; wait for that run to end, or pass another --workdir."]
    (tmp_path / "w.go").touch()
    assert first.wait(timeout=300) == 0, log.read_text()[-3000:]
  finally:
    if first.poll() is None:
      first.kill()
      first.wait()
  assert not (workdir / "claim").exists()  # Released at the end of the run.
  assert (workdir / "summary.json").exists()


def test_every_process_of_a_job_stops_on_a_claimed_workdir(tmp_path, compilation_cache):
  workdir = tmp_path / "w"
  holder = write_holder(epath.Path(workdir))  # This test's own process: alive, on this host.
  args = ["--config=configs/cifar_resnet20.py:smoke", "--config.model=cifar_resnet8"]
  first, second = processes.train(workdir, args, num_processes=2, timeout=300,
                                  **compilation_cache)
  assert (first.returncode, second.returncode) == (2, 2), (first.stderr[-3000:],
                                                           second.stderr[-3000:])
  assert first.stderr.strip().splitlines()[-1] == (
      f"error: workdir {workdir} is in use by process {os.getpid()} on {socket.gethostname()} "
      f"since {holder['since']}; wait for that run to end, or pass another --workdir.")
  assert second.stderr.strip().splitlines()[-1] == (
      f"error: workdir {workdir} is in use by another run (process 0 names it).")
  assert json.loads((workdir / "claim" / "holder.json").read_text()) == holder


def files_written(workdir) -> dict:
  """Every file a run wrote but its claim and TensorBoard's events (which it flushes as it ends)."""
  return {path: path.read_bytes() for path in workdir.rglob("*") if path.is_file()
          and path.relative_to(workdir).parts[0] != "claim" and "events.out" not in path.name}


def test_a_stopped_run_whose_claim_another_host_took_writes_nothing_more(
    tmp_path, compilation_cache):
  workdir = tmp_path / "w"
  args = ["--config=configs/cifar_resnet20.py:smoke", "--config.model=cifar_resnet8",
          "--config.num_train_steps=2", "--config.lr_boundaries=(1,)",
          "--config.log_every_steps=1", "--config.checkpoint_every_steps=1", f"--workdir={workdir}"]
  log = tmp_path / "first.log"
  with open(log, "w") as stderr:  # Held at step 2 until w.go exists: step 1 logged and saved.
    first = subprocess.Popen([sys.executable, processes.FAULTY_TRAINER, "hold:2", *args],
                             cwd=processes.REPO, env=processes.environment(8, **compilation_cache),
                             stdout=subprocess.DEVNULL, stderr=stderr, text=True)
  second = None
  try:
    deadline = time.monotonic() + 300
    while "fault: hold:2" not in log.read_text() or not (workdir / "checkpoints" / "1").exists():
      assert first.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
      time.sleep(0.2)
    os.kill(first.pid, signal.SIGSTOP)  # A laptop asleep, a VM paused, a debugger.
    written = files_written(workdir)
    holder_json = workdir / "claim" / "holder.json"
    holder = json.loads(holder_json.read_text())
    assert holder["pid"] == first.pid
    holder_json.write_text(json.dumps(dict(holder, heartbeat=time.time() - 11 * 60)))
    if os.path.exists("/proc/self/stat"):  # Alive on this host: kept however silent.
      with pytest.raises(ValueError, match=f"is in use by process {first.pid} on "):
        claim.acquire(epath.Path(workdir))
    # Seen from another host, silent for 11 minutes: taken over, as a run there would.
    holder_json.write_text(json.dumps(dict(holder, heartbeat=time.time() - 11 * 60,
                                           host="elsewhere")))
    second = claim.acquire(epath.Path(workdir))
    (tmp_path / "w.go").touch()
    os.kill(first.pid, signal.SIGCONT)
    assert first.wait(timeout=300) == 1, log.read_text()[-3000:]
    assert re.fullmatch(re.escape(
        f"error: lost the claim on workdir {workdir} to process {os.getpid()} on "
        f"{socket.gethostname()} since {second.holder['since']} (this run was silent for ")
        + r"\d+" + re.escape(" min); stopping without writing anything more."),
        log.read_text().strip().splitlines()[-1]), log.read_text()[-3000:]
    assert files_written(workdir) == written
    assert json.loads(holder_json.read_text()) == second.holder
  finally:
    if first.poll() is None:
      first.kill()
      first.wait()
    if second:
      second.release()


def test_every_process_of_a_job_stops_when_its_claim_is_taken_over(tmp_path, compilation_cache):
  workdir = tmp_path / "w"
  args = ["--config=configs/cifar_resnet20.py:smoke", "--config.model=cifar_resnet8",
          "--config.num_train_steps=2", "--config.lr_boundaries=(1,)",
          "--config.log_every_steps=1", "--config.checkpoint_every_steps=1"]
  results = []  # Process 0 held at step 2 until w.go exists: step 1 logged and saved.
  job = threading.Thread(target=lambda: results.extend(processes.train(
      workdir, args, num_processes=2, faults={0: "hold:2"}, timeout=300, **compilation_cache)))
  job.start()
  deadline = time.monotonic() + 300
  while not (workdir / "checkpoints" / "1").exists():
    assert job.is_alive() and time.monotonic() < deadline
    time.sleep(0.2)
  written = files_written(workdir)
  taker = dict(claim_in(epath.Path(workdir)), host="elsewhere", token="new")
  (workdir / "claim" / "holder.json").write_text(json.dumps(taker))  # As a run there would.
  (tmp_path / "w.go").touch()
  job.join()
  first, second = results
  assert (first.returncode, second.returncode) == (1, 1), (first.stderr[-3000:],
                                                           second.stderr[-3000:])
  assert re.fullmatch(re.escape(
      f"error: lost the claim on workdir {workdir} to process {taker['pid']} on elsewhere since "
      f"{taker['since']} (this run was silent for ") + r"\d+" + re.escape(
          " min); stopping without writing anything more."),
      first.stderr.strip().splitlines()[-1]), first.stderr[-3000:]
  assert second.stderr.strip().splitlines()[-1] == (
      f"error: lost the claim on workdir {workdir} to another run (process 0 names it); "
      "stopping without writing anything more.")
  assert files_written(workdir) == written
  assert claim_in(epath.Path(workdir)) == taker
