"""Faults a long run meets besides a crash: a stop signal, and a second process on the same output folder.

* Preemption. Preemptible / spot TPU VMs and cluster schedulers send SIGTERM and allow about 30 s; a user
  presses Ctrl-C (SIGINT). Inside :func:`stop_signals` either signal only records a stop request; the
  runner's step loop asks :func:`stop_requested` after every step and, when asked to stop, saves a
  checkpoint at that exact position and raises :class:`Preempted` (the CLI exits with 128 + the signal
  number: 143 for SIGTERM, 130 for SIGINT). A second signal while the first is pending takes the default
  action at once (a second Ctrl-C ends a run stuck in a long evaluation).
* One writer per output folder. :func:`output_lock` holds the file ``<output>/.migu-jax.lock`` (pid, host,
  start time) while a run writes there; a second process gets :class:`OutputLocked`, naming the holder. A
  lock left by a dead process is taken over with a :class:`FaultWarning`: on the same host when its pid is
  gone, on any host when its holder stopped refreshing it (every ``heartbeat_s``; stale after
  ``stale_after_s``, default 120 s, so a preempted VM's run restarts elsewhere within two minutes).

Multi-process runs (a TPU pod slice): process 0 holds the lock for all and tells the others whether it got
it; a stop request on any process stops every process after the same step (one scalar all-gather per
step), so orbax's coordinated save sees every process; each prints where it stopped and exits with 143 / 130.
A preempted TPU VM gives every host SIGTERM; one host's is enough (tests/test_tpu.py sends both kinds).

JAX's preemption service (``jax_enable_preemption_service``, on by default) installs a C++ SIGTERM handler in
``jax.distributed.initialize()``. Python's ``signal.signal`` in :func:`stop_signals` replaces it, so signals
that come later are ours; one that comes between the two is taken by that service (which only answers
``multihost_utils.reached_preemption_sync_point``, not called here) and the run goes on. So
experiments/tpu/run_cl.py turns the service off before ``initialize()`` (orbax reads its absence as "no
preemption") and enters :func:`stop_signals` right after it: an earlier SIGTERM ends the process at once, as
it does a one-process run before its handler, and the run resumes from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import signal
import socket
import threading
import time
import warnings
from pathlib import Path

import jax
import numpy as np

from migu_jax.cl import storage

LOCK_NAME = ".migu-jax.lock"
_UNLOCKED: set[str] = set()  # remote folders already warned about


class FaultWarning(UserWarning):
  """A fault was met and handled: a damaged checkpoint skipped, a stale lock taken over."""


class Preempted(Exception):
  """A stop signal ended the run after it saved a checkpoint at the step it had reached.

  Attributes:
    signum: the signal (``signal.SIGTERM`` or ``signal.SIGINT``).
    exit_code: the shell's code for a process ended by that signal, 128 + ``signum``.
  """

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = signum
    self.exit_code = 128 + int(signum)


class OutputLocked(RuntimeError):
  """Another live process holds the output folder's lock."""


# ---------------------------------------------------------------------------------------------- signals

_STOP = {"signum": 0, "depth": 0, "previous": {}}


def _on_signal(signum, frame):
  del frame
  if _STOP["signum"]:  # a second signal: the default action now
    signal.signal(signum, _STOP["previous"].get(signum, signal.SIG_DFL))
    os.kill(os.getpid(), signum)
    return
  _STOP["signum"] = signum


@contextlib.contextmanager
def stop_signals(signals=(signal.SIGTERM, signal.SIGINT)):
  """Within the block, ``signals`` record a stop request (see :func:`stop_requested`) instead of ending
  the process. Nested blocks share the outermost one's handlers; the previous handlers come back at its end.
  Outside the main thread (where Python cannot set handlers) the block changes nothing."""
  install = _STOP["depth"] == 0 and threading.current_thread() is threading.main_thread()
  if install:
    _STOP["signum"] = 0
    _STOP["previous"] = {s: signal.signal(s, _on_signal) for s in signals}
  _STOP["depth"] += 1
  try:
    yield
  finally:
    _STOP["depth"] -= 1
    if install:
      for s, handler in _STOP["previous"].items():
        signal.signal(s, handler)
      _STOP["previous"], _STOP["signum"] = {}, 0


def stop_requested() -> int:
  """The number of the stop signal received (0: none). Every process must call it at the same points:
  with several processes it is an all-gather, so all of them see a request that reached any of them."""
  local = _STOP["signum"]
  if jax.process_count() == 1:
    return local
  from jax.experimental import multihost_utils

  return int(np.max(multihost_utils.process_allgather(np.int32(local))))


def preempted(signum: int, where: str, checkpoint: int, folder: Path) -> Preempted:
  """The :class:`Preempted` error of a run stopped by ``signum`` after saving ``checkpoint`` at ``where``."""
  name = signal.Signals(signum).name
  return Preempted(f"stopped by {name} at {where}; saved checkpoint {checkpoint} in {folder}. Run the same "
                   "command again to resume from there.", signum)


# ---------------------------------------------------------------------------------------------- the lock


@dataclasses.dataclass(frozen=True)
class LockHolder:
  """Who holds an output folder's lock: ``pid`` on ``host`` since ``started``; ``refreshed`` (epoch
  seconds) is renewed by its heartbeat."""

  pid: int
  host: str
  started: str
  refreshed: float

  def __str__(self):
    return f"pid {self.pid} on host {self.host}, started {self.started}"


def _read_holder(path: Path) -> LockHolder | None:
  try:
    values = json.loads(path.read_text())
    return LockHolder(int(values["pid"]), str(values["host"]), str(values["started"]), float(values["refreshed"]))
  except FileNotFoundError:
    return None
  except (ValueError, KeyError, TypeError, OSError):  # being written, or damaged: as old as the file
    try:
      return LockHolder(-1, "?", "?", path.stat().st_mtime)
    except OSError:
      return None


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, another user's
    return True
  return True


def stale_reason(holder: LockHolder, stale_after_s: float, now: float | None = None) -> str | None:
  """Why ``holder``'s lock may be taken over (its process is gone, or it stopped refreshing), or None."""
  now = time.time() if now is None else now
  if holder.host == socket.gethostname() and holder.pid > 0 and not _pid_alive(holder.pid):
    return f"process {holder.pid} is no longer running"
  if now - holder.refreshed > stale_after_s:
    return f"not refreshed for {now - holder.refreshed:.0f} s"
  return None


class OutputLock:
  """The exclusive lock of one output folder, held by this process (see the module docstring).

  Args:
    folder: the output folder; the lock is the file ``folder/.migu-jax.lock``.
    stale_after_s: a lock not refreshed for this long is taken over, whatever its host.
    heartbeat_s: how often the holder refreshes it.
  """

  def __init__(self, folder, *, stale_after_s: float = 120.0, heartbeat_s: float = 20.0):
    self.path = Path(folder).absolute() / LOCK_NAME
    self.stale_after_s, self.heartbeat_s = stale_after_s, heartbeat_s
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    self.holder = LockHolder(os.getpid(), socket.gethostname(), started, time.time())
    self._stop = threading.Event()
    self._thread = None

  def _text(self) -> str:
    return json.dumps({**dataclasses.asdict(self.holder), "refreshed": time.time()})

  def acquire(self) -> "OutputLock":
    """Takes the lock, or a stale one over (with a :class:`FaultWarning`).

    Raises:
      OutputLocked: a live process holds it; the message names it and the way out.
    """
    self.path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        self._take_over_if_stale()
        continue
      with os.fdopen(fd, "w") as f:
        f.write(self._text())
      self._thread = threading.Thread(target=self._heartbeat, name="migu-jax-lock", daemon=True)
      self._thread.start()
      return self
    raise OutputLocked(f"{self.path}: could not take the lock (it changed hands while trying); try again.")

  def _take_over_if_stale(self) -> None:
    holder = _read_holder(self.path)
    if holder is None:  # released meanwhile
      return
    reason = stale_reason(holder, self.stale_after_s)
    if reason is None:
      raise OutputLocked(
          f"{self.path.parent} is in use by another run ({holder}): two processes must not write one output "
          f"folder. Wait for it to end, stop it, or choose another output folder (--output). If that process "
          f"is gone, the lock is taken over {self.stale_after_s:.0f} s after its last refresh, or delete "
          f"{self.path}.")
    aside = self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
    try:
      os.replace(self.path, aside)
    except FileNotFoundError:
      return
    if _read_holder(aside) != holder:  # another process took it over first: give its lock back
      with contextlib.suppress(OSError):
        os.link(aside, self.path)
      aside.unlink(missing_ok=True)
      return
    aside.unlink(missing_ok=True)
    warnings.warn(f"{self.path}: took over the lock of {holder} ({reason}).", FaultWarning, stacklevel=4)

  def _heartbeat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      current = _read_holder(self.path)
      if current is None or (current.pid, current.host) != (self.holder.pid, self.holder.host):
        return  # taken over (we were presumed dead): leave it to its new holder
      tmp = self.path.with_name(f"{LOCK_NAME}.{os.getpid()}.tmp")
      with contextlib.suppress(OSError):
        tmp.write_text(self._text())
        os.replace(tmp, self.path)

  def release(self) -> None:
    """Gives the lock up (only if this process still holds it)."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    current = _read_holder(self.path)
    if current is not None and (current.pid, current.host) == (self.holder.pid, self.holder.host):
      self.path.unlink(missing_ok=True)

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


_HELD: dict[Path, list] = {}  # lock path -> [OutputLock, depth]: nested holds in one process share one lock


@contextlib.contextmanager
def output_lock(folder, **lock_options):
  """Holds ``folder``'s :class:`OutputLock` for the block; nested blocks of this process on the same folder
  share it. With several processes, process 0 holds it for all and every process raises if it failed.

  A remote folder (``gs://``: an object store has no exclusive create to lock with) is not locked: a
  :class:`FaultWarning` says so once, and one job per folder is the user's to ensure.

  Raises:
    OutputLocked: another live process holds the folder.
  """
  if not storage.is_local(folder):
    if jax.process_index() == 0 and str(folder) not in _UNLOCKED:
      _UNLOCKED.add(str(folder))
      warnings.warn(f"{folder}: a remote output folder is not locked against a second job writing there; "
                    "run one job per folder.", FaultWarning, stacklevel=3)
    yield
    return
  path = Path(folder).absolute() / LOCK_NAME
  error = None
  if jax.process_index() == 0:
    try:
      if path in _HELD:
        _HELD[path][1] += 1
      else:
        _HELD[path] = [OutputLock(folder, **lock_options).acquire(), 1]
    except OutputLocked as e:
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    if int(multihost_utils.broadcast_one_to_all(np.int32(error is not None))) and error is None:
      error = OutputLocked(f"{folder}: process 0 could not take the output folder's lock (its error says why).")
  if error is not None:
    raise error
  try:
    yield
  finally:
    if jax.process_index() == 0:
      _HELD[path][1] -= 1
      if _HELD[path][1] == 0:
        _HELD.pop(path)[0].release()
