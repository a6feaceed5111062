"""Fault injection for the reliability tests: crash or hold a rank at a named point
(``MPINN_FAULT`` / ``MPINN_HOLD``); shipped with the package so tests of a
user's install can use it, never triggered without those variables."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any

from mpinn.errors import MpinnError


def inject_fault(point: str, rank: int) -> bool:
    """Testing hook: fail here if MPINN_FAULT names this point and rank.

    ``MPINN_FAULT=POINT:RANK[:N]`` raises at the N-th (default first) pass through POINT
    on RANK (``*``: on every rank): ``load``, ``save`` and ``sync`` an OSError (a failed
    read, a failed write as a checkpoint begins, a failed flush once its rows are
    written), ``data`` a MpinnError raised on that rank alone, ``step`` a RuntimeError
    inside the engine. It first prints ``MPINN_FAULT: rank R fails at POINT`` to stderr,
    the moment the tests measure the time to the end of the job from. ``nan`` raises
    nothing but returns True, and the engine makes its loss share NaN. The reliability
    tests use it to prove that a failure on one rank never hangs the others.

    The points of ``HOLD_POINTS`` raise nothing: the rank prints ``MPINN_FAULT: rank R
    (pid P) holds at POINT`` and waits there for a signal, so that a test can kill or
    signal the job at a moment the program itself reports instead of after a guessed
    delay. ``hold`` is the start of a training step (before the stop-signal check);
    the ``save-*`` points are the phases of a checkpoint (``io.checkpoint.Checkpoint``).
    """
    spec = os.environ.get("MPINN_FAULT")
    if not spec:
        return False
    parts = spec.split(":")
    if parts[0] != point or parts[1] not in ("*", str(rank)):
        return False
    _passes[point] = _passes.get(point, 0) + 1
    if _passes[point] != (int(parts[2]) if len(parts) > 2 else 1):
        return False
    if point == "nan":
        return True
    if point in HOLD_POINTS:
        _hold(f"MPINN_FAULT: rank {rank} (pid {os.getpid()}) holds at {point}")
        return False
    message = f"injected fault at {point} on rank {rank}"
    print(f"MPINN_FAULT: rank {rank} fails at {point}", file=sys.stderr, flush=True)
    if point in ("load", "save", "sync"):
        raise OSError(message)
    if point == "data":
        raise MpinnError(message)
    raise RuntimeError(message)


# the phases of a checkpoint save, in order: the new file's layout is written (its rows are
# not), every row is written (not yet synced), the file is synced and closed, rank 0 is
# about to rename it over the model, rank 0 has renamed it (the directory is not yet synced)
SAVE_PHASES = ("save-begun", "save-written", "save-synced", "save-rename", "save-renamed")
HOLD_POINTS = ("hold", *SAVE_PHASES)

_passes: dict[str, int] = {}


def _hold(line: str) -> None:
    """Print ``line`` and wait for a signal; SIGKILL ends the rank here, a handled SIGTERM,
    SIGUSR1 or SIGINT runs its handler and lets the rank go on (unhandled: its default), and
    SIGCONT only lets it go on, so a test can hold a job while it checks something beside it.

    The handlers that note the signal are installed before the line is printed, and the
    wait polls: a signal sent the moment the test reads the line (before a ``pause()``
    would have started) or delivered to another thread is never missed."""
    if threading.current_thread() is not threading.main_thread():
        print(line, flush=True)
        signal.pause()
        return
    got: list[int] = []
    previous: dict[int, Any] = {}

    def note(signum: int, frame: Any) -> None:
        got.append(signum)
        handler = previous[signum]
        if callable(handler):
            handler(signum, frame)
        elif handler == signal.SIG_DFL:  # its default action, as if never caught
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGCONT):
        previous[sig] = signal.signal(sig, note)
    try:
        print(line, flush=True)
        while not got:
            time.sleep(0.01)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
