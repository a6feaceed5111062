"""The collective-call watchdog: every rank meets the others at each collective API call.

A collective call made on some ranks only (``if rank == 0: net.predict(X)``), or different
calls on different ranks, would otherwise wait forever in the first MPI collective inside
it. So each collective entry point of the API first sends its name and a call counter to
every other rank of the communicator, on a private duplicate of it, nonblocking, and waits
for theirs with a deadline (as PyTorch's process-group timeout): a mismatch is seen at once,
a rank that never comes is seen at the deadline, and either way one rank prints one line,
naming the call and the ranks, and ends the job (``MPI_Abort``). The deadline is
``MPINN_COLLECTIVE_TIMEOUT`` seconds (default 600; the CLI's ``--collective-timeout``).
It costs two small messages per peer and call, nothing inside training.
"""

from __future__ import annotations

import functools
import sys
import time
import zlib
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
from mpi4py import MPI

from mpinn.config import seconds_from_env
from mpinn.errors import print_error

TIMEOUT_ENV = "MPINN_COLLECTIVE_TIMEOUT"
DEFAULT_TIMEOUT = 600.0
GRACE = 5.0  # how long a rank that is not the reporter lets the reporter print and abort
TAG = 79

F = TypeVar("F", bound=Callable[..., Any])


def timeout() -> float:
    """The deadline in seconds, from ``MPINN_COLLECTIVE_TIMEOUT`` (default 600)."""
    return seconds_from_env(TIMEOUT_ENV, DEFAULT_TIMEOUT)


class CallWatch:
    """The count of collective calls on one communicator, and a private duplicate of it.

    The duplicate is made once the first call has met on every rank (its messages travel
    on the communicator itself, under a tag of their own): ``Dup`` is a collective too,
    and must not be the thing that hangs when the first call is made on some ranks only."""

    def __init__(self, parent: MPI.Comm) -> None:
        self.parent = parent
        self.private: MPI.Comm | None = None
        self.calls = 0

    @property
    def comm(self) -> MPI.Comm:
        return self.private if self.private is not None else self.parent


_watches: dict[int, CallWatch] = {}


def _code(call: str) -> int:
    return zlib.crc32(call.encode())


def _watch(comm: MPI.Comm) -> CallWatch:
    key = MPI._handleof(comm)
    watch = _watches.get(key)
    if watch is None or MPI.Comm.Compare(watch.comm, comm) not in (MPI.IDENT, MPI.CONGRUENT):
        watch = _watches[key] = CallWatch(comm)  # a new communicator behind a reused handle
    return watch


def _wait(requests: list[MPI.Request], deadline: float) -> None:
    """Poll ``requests`` until all complete or ``deadline`` (monotonic) passes."""
    pause = 0.0001
    while not MPI.Request.Testall(requests):
        if time.monotonic() > deadline:
            return
        time.sleep(pause)
        pause = min(pause * 2, 0.01)


def _ranks(ranks: list[int]) -> str:
    return f"rank{'s' if len(ranks) > 1 else ''} {','.join(map(str, ranks))}"


def _end(message: str, reporter: bool) -> None:
    """Print ``message`` (the reporter only) and end the job on every rank."""
    if reporter:
        print_error(message)
    else:
        time.sleep(GRACE)  # the reporter prints and aborts meanwhile
    sys.stdout.flush()
    MPI.COMM_WORLD.Abort(1)


def meet(comm: MPI.Comm, call: str) -> None:
    """Meet every rank of ``comm`` at collective call ``call``, or end the job (above)."""
    if comm.size == 1:
        return
    seconds = timeout()
    deadline = time.monotonic() + seconds
    watch = _watch(comm)
    watch.calls += 1
    private, rank, size = watch.comm, watch.comm.rank, watch.comm.size
    mine = np.array([watch.calls, _code(call)], dtype=np.int64)
    seen = np.empty((size, 2), dtype=np.int64)
    seen[rank] = mine
    peers = [r for r in range(size) if r != rank]
    receives = [private.Irecv(seen[r], source=r, tag=TAG) for r in peers]
    sends = [private.Isend(mine, dest=r, tag=TAG) for r in peers]
    _wait(receives, deadline)
    arrived = [rank] + [r for r, request in zip(peers, receives, strict=True) if request.Test()]
    if len(arrived) < size:
        missing = sorted(set(range(size)) - set(arrived))
        _end(f"{call} is collective, but {_ranks(missing)} of {size} did not call it "
             f"within {seconds:g} s ({TIMEOUT_ENV}), while {_ranks(sorted(arrived))} did (call "
             f"{watch.calls}): call it on every rank", reporter=rank == min(arrived))
    MPI.Request.Waitall(sends)
    if np.any(seen != mine):
        names = {_code(name): name for name in CALLS}
        groups: dict[tuple[int, int], list[int]] = {}
        for r in range(size):
            groups.setdefault((int(seen[r, 0]), int(seen[r, 1])), []).append(r)
        told = "; ".join(f"{names.get(code, 'another call')} (call {count}) on {_ranks(ranks)}"
                         for (count, code), ranks in groups.items())
        _end(f"collective calls differ between ranks: {told}; every rank must make "
             "the same collective calls in the same order", reporter=rank == 0)
    if watch.private is None:
        watch.private = comm.Dup()  # every rank is here, at the same call


# the API's collective entry points, for the names in a mismatch message
CALLS = ("create", "open", "load", "fit", "predict", "evaluate", "save", "close")


def collective(call: str) -> Callable[[F], F]:
    """Decorate a method of an object with a ``comm`` (or a classmethod taking ``comm=``)
    so that every call first meets the other ranks (``meet``)."""
    def decorate(method: F) -> F:
        @functools.wraps(method)
        def watched(first: Any, *args: Any, **kwargs: Any) -> Any:
            comm = getattr(first, "comm", None) if not isinstance(first, type) else None
            if comm is None:
                comm = kwargs.get("comm") or MPI.COMM_WORLD
            if isinstance(comm, MPI.Comm):  # anything else: the call itself refuses it
                meet(comm, call)
            return method(first, *args, **kwargs)
        return watched  # type: ignore[return-value]
    return decorate
