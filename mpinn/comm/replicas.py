"""Data x neuron parallelism: R replica groups of the same partition, each on its
share of the batch, with gradients summed across the groups in buckets while
backward goes on."""

from __future__ import annotations

import time

import numpy as np
from mpi4py import MPI
from mpi4py.util.dtlib import from_numpy_dtype

from mpinn.comm.collectives import SUM, allreduce, displacements
from mpinn.errors import MpinnError

# ---------------------------------------------------------------- data x neuron parallelism


def replica_shares(n: int, replicas: int) -> np.ndarray:
    """Bounds of ``replicas`` contiguous shares of ``n`` samples: group g takes
    ``[b[g], b[g + 1])``. The shares differ by at most one sample; a group gets none when
    ``n < replicas``. Pure."""
    return (np.arange(replicas + 1, dtype=np.int64) * n) // replicas


class ReplicaGroups:
    """P = R x Q ranks seen as R groups of Q ranks (data x neuron parallelism).

    Group g is the contiguous world ranks ``g*Q .. g*Q + Q - 1``; each group holds one copy
    of a Q-rank partition, so the neuron exchange (``ExchangePlan``) stays inside a group,
    within one node when the ranks are placed by node. ``across`` joins the R ranks that
    hold the same rows in every group (world ranks r, r+Q, r+2Q, ...): the gradients of
    those rows are summed on it (``GradientReducer``). Both communicators are made once.
    """

    def __init__(self, comm: MPI.Comm, replicas: int) -> None:
        """Split ``comm`` (collective; every rank passes the same ``replicas``, as ``check``
        accepts it)."""
        self.world = comm
        self.replicas = replicas
        self.ranks_per_group = comm.size // replicas
        self.index = comm.rank // self.ranks_per_group  # my group
        if replicas == 1:  # the plain layout: no new communicator, nothing changes
            self.group: MPI.Comm = comm
            self.across: MPI.Comm | None = None
        else:
            self.group = comm.Split(self.index, comm.rank)
            self.across = comm.Split(comm.rank % self.ranks_per_group, comm.rank)

    @staticmethod
    def check(replicas: object, nranks: int) -> int:
        """``replicas`` if it is a whole number >= 1 that divides the rank count."""
        if isinstance(replicas, bool) or not isinstance(replicas, (int, np.integer)):
            raise MpinnError(f"--replicas must be a whole number, got {replicas!r}")
        if replicas < 1:
            raise MpinnError(f"--replicas must be at least 1, got {replicas}")
        if nranks % replicas:
            raise MpinnError(f"--replicas {replicas} does not divide the {nranks} ranks "
                             f"(P = R x Q: run a multiple of {replicas} ranks)")
        return int(replicas)

    def share(self, n: int) -> slice:
        """My group's contiguous share of ``n`` samples (of a batch, or of a data set)."""
        bounds = replica_shares(n, self.replicas)
        return slice(int(bounds[self.index]), int(bounds[self.index + 1]))

    def sum_across(self, value: int | float) -> float:
        """A per-group number (hits of its share) summed over the groups."""
        if self.across is None:
            return value
        return float(allreduce(self.across, np.array([value], dtype=np.float64), SUM)[0])

    def gather_samples(self, local: np.ndarray, n: int) -> np.ndarray:
        """(rows, n) on every rank from each group's columns ``share(n)`` of it, (rows, share):
        one Allgatherv over ``across``, for ``predict`` (each rank keeps only its rows)."""
        if self.across is None:
            return local
        bounds = replica_shares(n, self.replicas)
        counts = np.diff(bounds) * local.shape[0]
        mpi_type = from_numpy_dtype(local.dtype)
        gathered = np.empty((n, local.shape[0]), dtype=local.dtype)  # sample-major: contiguous
        self.across.Allgatherv([np.ascontiguousarray(local.T), mpi_type],
                               [gathered, (counts, displacements(counts)), mpi_type])
        return np.ascontiguousarray(gathered.T)

    def from_first(self, arrays: dict[str, object] | None) -> dict[str, object]:
        """Group 0's ``arrays`` (numpy arrays and small numbers, by name; None elsewhere) on
        the rank holding the same rows in every group: names, shapes and numbers in one small
        broadcast over ``across``, then one Bcast per array (a shard read by group 0 only)."""
        if self.across is None:
            assert arrays is not None
            return arrays
        header = None
        if self.index == 0:
            assert arrays is not None
            header = {name: ("array", value.shape, value.dtype.str) if isinstance(value, np.ndarray)
                      else ("value", value) for name, value in arrays.items()}
        header = self.across.bcast(header, root=0)
        received: dict[str, object] = {}
        for name, entry in header.items():
            if entry[0] == "value":
                received[name] = entry[1]
                continue
            values = (np.ascontiguousarray(arrays[name]) if self.index == 0  # type: ignore[index]
                      else np.empty(entry[1], dtype=np.dtype(entry[2])))
            self.across.Bcast([values, from_numpy_dtype(values.dtype)], root=0)
            received[name] = values
        return received

    def free(self) -> None:
        """Release the communicators made here (collective)."""
        if self.across is not None:
            self.group.Free()
            self.across.Free()
            self.across = None
            self.group = self.world


BUCKET_BYTES = 4 << 20


def gradient_buffers(sizes: list[int], dtype: np.dtype) -> tuple[np.ndarray, list[np.ndarray]]:
    """One zeroed buffer for every layer's gradients and a view of ``sizes[i]`` values per
    layer i, laid out last layer first (backward's order): layers that backward finishes one
    after another are neighbours, so a ``GradientReducer`` bucket of them is one slice."""
    flat = np.zeros(sum(sizes), dtype)
    ends = np.cumsum(sizes[::-1])[::-1]  # layer i ends where layers i..n-1 end, last first
    return flat, [flat[end - n: end] for n, end in zip(sizes, ends, strict=True)]


def gradient_buckets(nbytes: list[int], bucket_bytes: int | None = None) -> list[int]:
    """The lowest layer of each bucket, in the order they are summed: layers taken from the
    last down, a bucket closed once it holds ``bucket_bytes`` (``nbytes[i]``: layer i's
    gradients on this rank; default ``BUCKET_BYTES``) and at layer 0. Pure: the cost model
    counts them too."""
    bucket_bytes = BUCKET_BYTES if bucket_bytes is None else bucket_bytes
    lowest, filled = [], 0
    for i in range(len(nbytes) - 1, -1, -1):
        filled += nbytes[i]
        if filled >= bucket_bytes or i == 0:
            lowest.append(i)
            filled = 0
    return lowest


class GradientReducer:
    """Sums the layers' weight and bias gradients over the R groups, in buckets of layers,
    one allreduce per bucket, overlapped with the rest of backward.

    ``flat`` holds every layer's gradients, last layer first, ``layers[i]`` layer i's view of
    it (``gradient_buffers``). Consecutive layers, from the last down, are grouped into
    buckets of at least ``bucket_bytes`` (PyTorch DDP's buckets): a bucket is one slice of
    ``flat``, summed by one allreduce as soon as its lowest layer's gradients exist. A small
    model is then one allreduce per step instead of one per layer (a small model's step is
    about 1.6 ms, of which each collective's fixed cost is a visible part); a large one
    keeps one per layer, overlapped. The sums are the per-layer allreduce's: element
    by element the same values are added (the association of three or more groups' values
    is the allreduce algorithm's, as before).

    Every rank of ``comm`` holds the same rows, so the same buckets, and must post the
    collectives in the same order: buckets go out last layer first; a layer ready early
    (the pipeline computes layer 0 first) waits until the layers above it are posted. The
    last bucket is a blocking Allreduce: nothing is left to overlap it with, and Open MPI's
    blocking allreduce was twice as fast as its nonblocking one (0.17 against 0.28-0.33 ms
    for the 64-256-256-10 model's gradients on 2 ranks). ``wait`` before the optimizer
    reads the gradients.
    """

    def __init__(self, comm: MPI.Comm, flat: np.ndarray, layers: list[np.ndarray],
                 bucket_bytes: int | None = None) -> None:
        self.comm = comm
        self.layers = layers
        # the bucket a layer closes (its lowest layer), as the slice of flat it covers
        self.buckets: dict[int, np.ndarray] = {}
        start, top = 0, len(layers)
        for lowest in gradient_buckets([layer.nbytes for layer in layers], bucket_bytes):
            end = start + sum(layer.size for layer in layers[lowest:top])
            self.buckets[lowest] = flat[start:end]
            start, top = end, lowest
        self._ready = [False] * len(layers)
        self._next = len(layers) - 1
        self._requests: list[MPI.Request] = []
        # per rank and step, what a ring allreduce moves: 2 (R - 1) / R of the gradients
        self.bytes_per_step = int(2 * (comm.size - 1) / comm.size * flat.nbytes)
        self.seconds_wait = 0.0

    def post(self, layer: int) -> None:
        """Layer ``layer``'s gradients are final here: post the buckets now complete, in
        the fixed order."""
        self._ready[layer] = True
        # in seconds_wait too: libnbc progresses (and sums) the ones in flight inside these calls
        started = time.perf_counter()
        if self._requests:  # a call into MPI lets the ones in flight progress (libnbc)
            MPI.Request.Testall(self._requests)
        while self._next >= 0 and self._ready[self._next]:
            bucket = self.buckets.get(self._next)
            # the buffer alone: mpi4py then names the predefined MPI type, which reductions
            # need (from_numpy_dtype's is a derived one, refused with MPI_ERR_OP)
            if self._next == 0:
                self.comm.Allreduce(MPI.IN_PLACE, bucket, op=SUM)
            elif bucket is not None:
                self._requests.append(self.comm.Iallreduce(MPI.IN_PLACE, bucket, op=SUM))
            self._next -= 1
        self.seconds_wait += time.perf_counter() - started

    def post_all(self) -> None:
        """Post every layer (a group with no samples in this batch: its gradients are 0)."""
        for layer in range(len(self.layers)):
            self.post(layer)

    def wait(self) -> None:
        """Wait until every bucket is summed; the buffers then hold the whole batch's gradients."""
        assert self._next < 0, "wait before every layer was posted"
        started = time.perf_counter()
        MPI.Request.Waitall(self._requests)
        self.seconds_wait += time.perf_counter() - started
        self._requests = []
        self._ready = [False] * len(self.layers)
        self._next = len(self.layers) - 1
