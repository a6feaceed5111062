"""One writer per file: a lock file ``PATH.lock`` beside what a job writes, held for its run.

The lock is made with ``O_CREAT | O_EXCL``, which is atomic on local filesystems and on
NFS (v3 and later) and Lustre, and needs no ``flock``. It records who holds it (host, pid,
the process's start time, SLURM job id, the action and since when) so a second job can be
told whom it waits for. A lock whose process is gone on the same host (SIGKILL, the OOM
killer) is stale and is broken, under a second exclusive file so two jobs never break the
same lock; so is one left by an earlier run of the same SLURM job before it was requeued.
Any other lock from another host cannot be checked from here: the message says how to
remove it by hand. A lock whose record cannot be written (a full disk) is removed at once;
an empty or unreadable one is being written by its job, unless it is older than
``EMPTY_STALE`` seconds: then its job died before writing it, and it is broken too.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from mpinn.errors import MpinnError

SUFFIX = ".lock"
BREAK_TIMEOUT = 30.0  # a ``.lock.break`` older than this was left by a killed breaker
# an empty lock older than this was left by a job killed (or out of disk) between creating
# and writing it: a live job writes its few hundred bytes within milliseconds of creating it
EMPTY_STALE = 30.0


def lock_name(path: str) -> str:
    return f"{path}{SUFFIX}"


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), or None if it is gone
    (or a zombie): with the pid it names one process, even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):  # killed, not yet reaped by its parent (mpirun): gone
        return None
    return fields[19]


def _me(action: str) -> dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": _process_start(pid),
            "job": os.environ.get("SLURM_JOB_ID"), "restart": _restarts(), "action": action,
            "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv[1:])[:500]}


def _read(lock: str) -> dict[str, Any] | None:
    """The holder recorded in ``lock``; None if it is gone or unreadable (being written)."""
    try:
        with open(lock) as fh:
            holder = json.load(fh)
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _restarts() -> int:
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def _stale(holder: dict[str, Any]) -> bool:
    """Whether the holder is gone: a process on this host that no longer runs, or an earlier
    run of this very SLURM job, which SLURM ended before requeueing it (on any node)."""
    job = os.environ.get("SLURM_JOB_ID")
    restart = holder.get("restart")
    if job and holder.get("job") == job and isinstance(restart, int) and restart < _restarts():
        return True
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    now = _process_start(holder["pid"])
    # no start time recorded (an older or hand-written lock): only a pid that is gone tells
    return now is None or (holder.get("start") is not None and now != holder["start"])


def _abandoned(lock: str) -> tuple[int, int, float] | None:
    """(inode, mtime in ns, age in s) of an unreadable ``lock`` older than ``EMPTY_STALE``;
    None while it may still be being written (or is gone)."""
    try:
        st = os.stat(lock)
    except OSError:
        return None
    age = time.time() - st.st_mtime
    return (st.st_ino, st.st_mtime_ns, age) if age > EMPTY_STALE else None


def describe(path: str, holder: dict[str, Any] | None) -> str:
    """``PATH is being trained by pid 4242 on node7 (job 17) since ...; ...`` for a refusal."""
    lock = lock_name(path)
    if holder is None:
        return (f"{path} is locked by another job ({lock} exists but names no holder yet); wait "
                f"for it, or remove {lock} if no job is using {path}")
    job = f" (SLURM job {holder['job']})" if holder.get("job") else ""
    return (f"{path} is being {holder.get('action', 'written')} by pid {holder.get('pid')} on "
            f"{holder.get('host')}{job} since {holder.get('since')}; wait for it or remove "
            f"{lock} if that job is gone")


@dataclass
class Lock:
    """A held lock; ``release`` removes the file if it is still ours."""

    path: str
    record: dict[str, Any]
    broke: dict[str, Any] | None = None  # the stale holder this lock replaced, if any

    def release(self) -> None:
        lock = lock_name(self.path)
        if _read(lock) == self.record:
            with suppress(OSError):
                os.remove(lock)


def acquire(path: str, action: str) -> Lock:
    """Take the lock of ``path`` for ``action`` ("trained", "written", ...) or refuse, naming
    the holder. Breaks a stale lock left on this host by a process that is gone."""
    lock = lock_name(path)
    record = _me(action)
    broke = None
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _read(lock)
            if holder is None:
                left = _abandoned(lock)
                if left is None:
                    raise MpinnError(describe(path, holder)) from None
                _break(lock, None, left[:2])
                broke = {"empty": round(left[2])}
                continue
            if not _stale(holder):
                raise MpinnError(describe(path, holder)) from None
            _break(lock, holder)
            broke = holder
            continue
        except OSError as exc:
            raise MpinnError(f"{path}: cannot create the lock file {lock} ({exc.strerror})") from None
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(record, fh)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            # an empty lock left here would block every later run: it is ours, remove it
            with suppress(OSError):
                os.remove(lock)
            raise MpinnError(f"{path}: cannot write the lock file {lock} ({exc.strerror}); "
                             "nothing was changed") from None
        return Lock(path, record, broke)
    raise MpinnError(describe(path, _read(lock)))


def _break(lock: str, holder: dict[str, Any] | None,
           identity: tuple[int, int] | None = None) -> None:
    """Remove the stale ``lock`` unless another job replaced it meanwhile: it must still
    name ``holder``, or, for an empty one, still be unreadable with the same inode and
    modification time (``identity``), never a new lock being written."""
    breaker = f"{lock}.break"
    with suppress(OSError):
        if time.time() - os.path.getmtime(breaker) > BREAK_TIMEOUT:
            os.remove(breaker)
    try:
        os.close(os.open(breaker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except FileExistsError:
        time.sleep(0.1)  # another job is breaking it: try again to take it
        return
    try:
        if _read(lock) == holder and (identity is None or _identity(lock) == identity):
            os.remove(lock)
    finally:
        os.remove(breaker)


def _identity(lock: str) -> tuple[int, int] | None:
    try:
        st = os.stat(lock)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns)


def take_all(locked: dict[str, str], held: list[Lock]) -> list[str]:
    """Take the lock of every path of ``locked`` for its action, adding each to ``held`` (the
    caller releases them, also when one is refused); returns a note for each stale lock
    that was broken on the way, to print once."""
    notes = []
    for path, action in locked.items():
        got = acquire(path, action)
        held.append(got)
        if got.broke and "empty" in got.broke:
            notes.append(f"mpinn: note: {path}: removed an empty lock file left "
                         f"{got.broke['empty']} s ago by a job that died before writing it")
        elif got.broke:
            notes.append(f"mpinn: note: {path}: removed a stale lock of pid "
                         f"{got.broke.get('pid')} on {got.broke.get('host')} (since "
                         f"{got.broke.get('since')}), whose process is gone")
    return notes


def release_all(held: list[Lock]) -> None:
    """Release (and forget) every lock of ``held``, the last taken first."""
    while held:
        held.pop().release()
