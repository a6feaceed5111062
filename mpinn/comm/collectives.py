"""The small collectives every command uses: agree on a result or an error,
do something on rank 0 and share it, sums and gathers of small arrays."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import numpy as np
from mpi4py import MPI
from mpi4py.util.dtlib import from_numpy_dtype

from mpinn.comm.failures import combine_errors
from mpinn.errors import MpinnError

T = TypeVar("T")

MAX, MIN, SUM = MPI.MAX, MPI.MIN, MPI.SUM


def displacements(counts: np.ndarray) -> np.ndarray:
    """Offsets of consecutive blocks of ``counts`` (the displacements of a v-collective)."""
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)


# ---------------------------------------------------------------- small collectives


def allreduce(comm: MPI.Comm, values: np.ndarray, op: MPI.Op) -> np.ndarray:
    """Reduce a small numpy array over all ranks, in place (one rank: nothing to do, a
    replica group of one calls this a few times per step)."""
    if comm.size > 1:
        comm.Allreduce(MPI.IN_PLACE, values, op=op)
    return values


def on_root(comm: MPI.Comm, action: Callable[[], T]) -> T:
    """Run ``action`` on rank 0 only and hand its result, or its error, to every rank.

    For work that needs one process's view of something large but not huge (a graph
    partition of the wiring): the other ranks wait in the broadcast, never in a hang.
    """
    result, error = None, None
    if comm.rank == 0:
        try:
            result = action()
        except Exception as exc:  # noqa: BLE001 - raised on every rank below
            error = str(exc) if isinstance(exc, MpinnError) else f"{type(exc).__name__}: {exc}"
    result, error = comm.bcast((result, error), root=0)
    if error is not None:
        raise MpinnError(error, agreed=True)
    return result  # type: ignore[return-value]


def agree(comm: MPI.Comm, action: Callable[[], T]) -> T:
    """Run ``action`` on every rank; if it fails anywhere, raise the same error everywhere.

    This is the check point placed before collectives: a rank that failed alone would
    otherwise leave the others waiting in the next collective forever.
    """
    error: str | None = None
    result = None
    try:
        result = action()
    except Exception as exc:  # noqa: BLE001 - reported on every rank, with its type
        error = str(exc) if isinstance(exc, MpinnError) else f"{type(exc).__name__}: {exc}"
    errors = comm.allgather(error)
    failed = [(rank, msg) for rank, msg in enumerate(errors) if msg is not None]
    if failed:
        raise MpinnError(combine_errors(failed, comm.size), agreed=True)
    return result  # type: ignore[return-value]


def first_difference(comm: MPI.Comm, value: object) -> int | None:
    """The lowest rank whose small picklable ``value`` differs from rank 0's, or None."""
    values = comm.allgather(value)
    return next((rank for rank, v in enumerate(values) if v != values[0]), None)


def gather_layer(comm: MPI.Comm, owner: np.ndarray, local: np.ndarray) -> np.ndarray:
    """A whole layer's values on every rank, (neurons, columns), from each rank's rows.

    ``owner`` is the layer's owner per neuron (the metadata table's); ``local`` my rows,
    (owned neurons, columns) in ascending neuron order. One Allgatherv: for outputs that
    every rank must see (``Network.predict``), never for weights.
    """
    columns = local.shape[1]
    counts = np.bincount(owner, minlength=comm.size).astype(np.int64) * columns
    gathered = np.empty((owner.size, columns), dtype=local.dtype)
    comm.Allgatherv([np.ascontiguousarray(local), from_numpy_dtype(local.dtype)],
                    [gathered, (counts, displacements(counts)), from_numpy_dtype(local.dtype)])
    whole = np.empty_like(gathered)
    whole[np.argsort(owner, kind="stable")] = gathered  # rank by rank, ascending within each
    return whole


@contextmanager
def take_turn(comm: MPI.Comm) -> Iterator[None]:
    """Run the body on one rank at a time, in rank order (a token passed along the ranks).

    For file writes without MPI-IO: serial HDF5 allows one writer at a time. If the body
    fails, the token is not passed; the waiting ranks are ended by the CLI's failure path.
    """
    if comm.rank > 0:
        comm.recv(source=comm.rank - 1, tag=TURN_TAG)
    yield
    if comm.rank + 1 < comm.size:
        comm.send(None, dest=comm.rank + 1, tag=TURN_TAG)


TURN_TAG = 78
