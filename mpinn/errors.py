"""The one exception type users see: a message they can act on, turned into one line by the CLI."""

from __future__ import annotations

import os


class MpinnError(Exception):
    """A user-facing error: bad input, a bad file, a partition that does not fit the job.

    ``agreed`` is set once every rank is known to raise the same error (see
    ``exchange.agree``); only then may rank 0 report it alone and all ranks exit cleanly.
    """

    def __init__(self, message: str, agreed: bool = False) -> None:
        super().__init__(message)
        self.agreed = agreed


def inject_fault(point: str, rank: int) -> bool:
    """Testing hook: fail here if MPINN_FAULT names this point and rank.

    ``MPINN_FAULT=POINT:RANK[:N]`` raises at the N-th (default first) pass through POINT
    on RANK: ``load`` and ``save`` an OSError (a failed read or write), ``data`` a
    MpinnError raised on that rank alone, ``step`` a RuntimeError inside the engine;
    ``nan`` raises nothing but returns True, and the engine makes its loss share NaN. The
    reliability tests use it to prove that a failure on one rank never hangs the others.
    """
    spec = os.environ.get("MPINN_FAULT")
    if not spec:
        return False
    parts = spec.split(":")
    if parts[0] != point or int(parts[1]) != rank:
        return False
    _passes[point] = _passes.get(point, 0) + 1
    if _passes[point] != (int(parts[2]) if len(parts) > 2 else 1):
        return False
    if point == "nan":
        return True
    message = f"injected fault at {point} on rank {rank}"
    if point in ("load", "save"):
        raise OSError(message)
    if point == "data":
        raise MpinnError(message)
    raise RuntimeError(message)


_passes: dict[str, int] = {}
