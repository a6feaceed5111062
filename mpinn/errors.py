"""The one exception type users see: a message they can act on, turned into one line by the CLI."""

from __future__ import annotations

import os
import sys
from typing import Any


class MpinnError(Exception):
    """A user-facing error: bad input, a bad file, a partition that does not fit the job.

    ``agreed`` is set once every rank is known to raise the same error (see
    ``comm.collectives.agree``); only then may rank 0 report it alone and all ranks exit cleanly.
    """

    def __init__(self, message: str, agreed: bool = False) -> None:
        super().__init__(message)
        self.agreed = agreed


def print_error(text: str) -> None:
    """Write ``mpinn: error: TEXT`` to stderr, its newline in the same write: under mpirun a
    line written in two parts (as ``print`` writes it) can have the launcher's own abort
    banner land between the text and its newline, and the line no longer ends as written."""
    sys.stderr.write(f"mpinn: error: {text}\n")
    sys.stderr.flush()


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) on some ranks, seen by every rank at the same training step: every
    rank stops there, nothing committed past the last checkpoint (``train.StepGuard``)."""


def install_excepthook() -> None:
    """Show an ``MpinnError`` (or ``Interrupted``) that a script does not catch as one
    ``mpinn: error:`` line instead of a traceback on every rank: printed by rank 0 alone
    when every rank raised it (``agreed``), else by each rank that did, naming it.
    ``MPINN_DEBUG=1`` keeps the tracebacks; other exceptions go to the previous hook."""
    previous = sys.excepthook
    if getattr(previous, "mpinn", False):
        return

    def hook(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
        if not isinstance(exc, (MpinnError, Interrupted)) or os.environ.get("MPINN_DEBUG"):
            previous(kind, exc, tb)
            return
        agreed = isinstance(exc, Interrupted) or exc.agreed
        rank, size = _world()
        if agreed and rank != 0:
            return
        where = f" (rank {rank})" if size > 1 and not agreed else ""
        print_error(f"{exc}{where}")

    hook.mpinn = True  # type: ignore[attr-defined]
    sys.excepthook = hook

def _world() -> tuple[int, int]:
    """This process's rank and the job's size, if MPI is up (never starting it here)."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None or not mpi.Is_initialized() or mpi.Is_finalized():
        return 0, 1
    return mpi.COMM_WORLD.rank, mpi.COMM_WORLD.size
