"""Failure reporting across ranks: a rank that fails tells the others (or aborts
the job alone, after a grace time) instead of leaving them in a collective."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from mpi4py import MPI

from mpinn.errors import print_error


class FailureChannel:
    """A private communicator on which failing ranks find out whether all ranks failed.

    A rank that hits an error outside an agreed check point cannot know whether the
    others are about to fail too or are already waiting in a collective. It posts a
    nonblocking barrier here (its own communicator, so it never mismatches the engine's
    collectives) and waits a bounded time: if every rank arrives, they report one message
    together and exit cleanly. Otherwise it sends its message to rank 0, where a watcher
    thread (polling, so it costs nothing while all is well) prints it once and aborts the
    job; a failing rank 0, or a rank 0 that never answers, aborts by itself.
    """

    TAG = 77

    def __init__(self, comm: MPI.Comm, before_abort: Callable[[], None] = lambda: None) -> None:
        """``before_abort`` runs on the rank that aborts the job, just before (the CLI
        releases its locks there: an aborted job must not leave them)."""
        self.comm = comm.Dup()
        self.before_abort = before_abort
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        if self.comm.rank == 0 and self.comm.size > 1:
            self._watcher = threading.Thread(target=self._watch, name="mpinn-failures", daemon=True)
            self._watcher.start()

    def _watch(self) -> None:
        status = MPI.Status()
        while not self._stop.wait(0.05):
            if self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=self.TAG, status=status):
                message, code = self.comm.recv(source=status.Get_source(), tag=self.TAG)
                print_error(f"{message} (rank {status.Get_source()}); aborting all ranks")
                self.before_abort()
                self.comm.Abort(code)

    def close(self) -> None:
        """Stop the watcher (before MPI is finalized)."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join()

    def gather_failures(self, message: str, timeout: float) -> list[tuple[int, str]] | None:
        """Every rank's message if all ranks failed within ``timeout`` seconds, else None."""
        request = self.comm.Ibarrier()
        deadline = time.monotonic() + timeout
        while not request.Test():
            if time.monotonic() > deadline:
                return None
            time.sleep(0.005)
        return list(enumerate(self.comm.allgather(message)))

    def report_alone(self, message: str, timeout: float, code: int = 1) -> None:
        """Have rank 0 print ``message`` and abort the job with exit status ``code``; abort
        here if it cannot."""
        if self.comm.rank != 0:
            self.comm.isend((message, code), dest=0, tag=self.TAG)
            time.sleep(timeout)  # rank 0's watcher aborts the job meanwhile
        print_error(f"{message} (rank {self.comm.rank}); aborting all ranks")
        self.before_abort()
        self.comm.Abort(code)


def combine_errors(failed: list[tuple[int, str]], size: int) -> str:
    """One line for errors raised on several ranks, naming the ranks once per distinct message."""
    by_message: dict[str, list[int]] = {}
    for rank, msg in failed:
        by_message.setdefault(msg, []).append(rank)
    parts = []
    for msg, ranks in by_message.items():
        if size == 1:
            parts.append(msg)
        elif len(ranks) == size:
            parts.append(f"{msg} (all ranks)")
        else:
            parts.append(f"{msg} (rank{'s' if len(ranks) > 1 else ''} "
                         f"{','.join(map(str, ranks))})")
    return "; ".join(parts)
