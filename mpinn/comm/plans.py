"""Per-layer exchange plans: the Alltoallv plan and the kinds built on its counts.

An ``ExchangePlan`` is built once per layer from the metadata table. ``forward`` moves the
activations of layer l-1 from their owners to every rank whose rows read them, with one
Alltoallv of numpy buffers; ``backward`` sends the partial sums ``W^T dz`` the other way
and adds them up at the owners (its adjoint). Buffers are allocated once, for the largest
batch. The engine posts (``start_*``), computes, then waits (``finish_*``).

Each kind is a class built from the Alltoallv plan of a layer (``comm.exchange.PLANS``),
moving the same bytes: ``ExchangePlan`` (``alltoallv``), one Ialltoallv over the whole
communicator; ``GatherPlan`` (``allgather``), for a layer every rank reads whole, forward
one Iallgatherv and backward the Alltoallv (bitwise its results);
``ReduceScatterPlan`` (``collective``), the same forward and one Ireduce_scatter backward;
``NeighborPlan`` (``neighbor``), one Ineighbor_alltoallv over a graph communicator of the
ranks that actually exchange. The two-level kinds across nodes are in ``comm.node``.

A rank's gathered inputs are laid out in *receive order* (``partition.traffic``): grouped
by owning rank, ascending index within each owner. The receive buffer is then directly the
GEMM operand, and the shard stores its weight columns in the same order, so nothing is
unpacked on the hot path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from mpi4py import MPI
from mpi4py.util.dtlib import from_numpy_dtype

from mpinn.comm.collectives import MAX, allreduce, displacements
from mpinn.errors import MpinnError
from mpinn.kernels import csr_matmul
from mpinn.partition.metadata import MetadataTable
from mpinn.trace import EXCHANGE as EXCHANGE_TRACK
from mpinn.trace import NULL, NullTracer


@dataclass
class Job:
    """What the plans of one ``make_plans`` call share: the job's communicator, the node
    of every rank, and the communicators some kinds build once (made on first use)."""

    comm: MPI.Comm
    node: np.ndarray
    node_comm: MPI.Comm | None = None
    graphs: dict[bytes, MPI.Distgraphcomm] = field(default_factory=dict)

    def nodes_comm(self) -> MPI.Comm:
        """The ranks of my node, in rank order (one ``Split``, shared by the layers)."""
        if self.node_comm is None:
            self.node_comm = self.comm.Split(int(self.node[self.comm.rank]), self.comm.rank)
        return self.node_comm


class ExchangePlan:
    """Alltoallv plan that feeds the rows of one layer with the activations they read.

    The base of every kind: the counts, the receive order and the buffers are agreed here;
    a kind's class (``PLANS``) is built from this plan and changes how bytes move.
    """

    kind = "alltoallv"

    @classmethod
    def build(cls, base: ExchangePlan, dense: bool, job: Job) -> ExchangePlan:
        """This kind's plan from the Alltoallv plan ``base`` of a layer (``dense``: every
        rank reads it whole), or ``base`` where the kind does not apply (collective over
        the job when it builds a communicator)."""
        return base

    tracer: NullTracer = NULL  # the engine's, when a run is traced (mpinn.trace)
    _posted: float | None = None  # when the exchange now in flight was posted (traced runs)
    _direction = "forward"

    def __init__(self, comm: MPI.Comm, table: MetadataTable, layer: int, inputs: np.ndarray,
                 max_batch: int, dtype: np.dtype, shared: bool = False) -> None:
        """Agree with the other ranks on who sends what (collective).

        ``inputs`` are the in-layer indices of layer ``layer - 1`` this rank's rows read,
        already in receive order: for a sparse layer only those its rows name, so the
        volume is exactly the (remote input, reading rank) pairs. With ``shared`` the
        buffers come from ``share_buffers`` (plans used one after another, inference).
        """
        self.comm = comm
        # communicators make_plans built for this plan (shared with other plans; free_plans)
        self.graph: MPI.Distgraphcomm | None = None
        self.node_comm: MPI.Comm | None = None
        self.shared = shared
        self.layer = layer
        self.max_batch = max_batch
        self.dtype = np.dtype(dtype)
        self.mpi_type = from_numpy_dtype(self.dtype)
        rank, size = comm.rank, comm.size
        # looked up for the inputs read and the neurons asked for, never for the whole layer
        self.recv_counts = np.bincount(table.owner_of(layer - 1, inputs),
                                       minlength=size).astype(np.int64)
        self.send_counts = np.zeros(size, dtype=np.int64)
        comm.Alltoall(self.recv_counts, self.send_counts)
        # receive buffer: my own inputs first, then ranks rank+1, rank+2, ... (receive_order)
        rotation = np.roll(np.arange(size), -rank)
        self.recv_displs = np.empty(size, dtype=np.int64)
        self.recv_displs[rotation] = displacements(self.recv_counts[rotation])
        self.send_displs = displacements(self.send_counts)
        self.table_counts = table.counts(layer - 1).astype(np.int64)  # neurons per owner
        requested = np.empty(int(self.send_counts.sum()), dtype=np.int64)
        comm.Alltoallv([np.ascontiguousarray(inputs, dtype=np.int64),
                        (self.recv_counts, self.recv_displs), MPI.INT64_T],
                       [requested, (self.send_counts, self.send_displs), MPI.INT64_T])
        if requested.size and np.any(table.owner_of(layer - 1, requested) != rank):
            raise MpinnError(f"layer {layer}: exchange plan asked rank {rank} for neurons it does "
                             "not own (ranks disagree on the partition)")
        self.requested = requested  # per destination, the neurons of layer l-1 it reads
        self.inputs = np.asarray(inputs, dtype=np.int64)
        self.table = table
        # what each destination needs from me, as positions in my local activations
        self.send_index = table.local_index(layer - 1, requested)
        self.n_send = n_send = requested.size
        self.n_local = int(table.counts(layer - 1)[rank])
        self.n_inputs = int(inputs.size)
        # my own inputs skip MPI: they are copied straight into the head of the receive buffer
        self.n_own_inputs = int(self.recv_counts[rank])
        self.self_send = slice(self.send_displs[rank], self.send_displs[rank] + self.send_counts[rank])
        self.self_recv = slice(0, self.n_own_inputs)
        # what goes to other ranks: the send segments before and after my own
        self.own_index = self.send_index[self.self_send]
        self.own_contiguous = bool(np.array_equal(self.own_index, np.arange(self.own_index.size)))
        self.remote_send = [slice(0, self.self_send.start), slice(self.self_send.stop, n_send)]
        self.mpi_send_counts = self.send_counts.copy()
        self.mpi_recv_counts = self.recv_counts.copy()
        self.mpi_send_counts[rank] = 0
        self.mpi_recv_counts[rank] = 0
        # sums the partial sums received in backward onto the owned neurons, in a fixed order
        import scipy.sparse as sp  # here, not at import: most processes build no plan

        self.accumulate = sp.csr_matrix(
            (np.ones(n_send, dtype=self.dtype), (self.send_index, np.arange(n_send))),
            shape=(self.n_local, n_send))
        self.sum_buffer = np.empty(0 if shared else self.n_local * max_batch, dtype=self.dtype)
        # rows of the send and receive buffers (the collective kind needs more of both)
        self.send_rows, self.recv_rows = n_send, self.n_inputs
        self.relay_rows = 0  # the node kinds' staging buffer (comm.node)
        self._allocate()
        self._request: MPI.Request | None = None
        self._parts: dict[int, MPI.Request] = {}  # parts in flight, by first column
        self._part_posted: dict[int, tuple[float, int]] = {}
        self._batch = 0
        # counted per call, for benchmarks and the traffic tests
        self.bytes_sent = 0
        self.bytes_received = 0
        self.seconds_pack = 0.0  # packing, unpacking and summing partial sums
        self.seconds_wait = 0.0  # posting the Ialltoallv and waiting for it

    def _allocate(self) -> None:
        if not self.shared:
            self.send_buffer = np.empty(self.send_rows * self.max_batch, dtype=self.dtype)
            self.recv_buffer = np.empty(self.recv_rows * self.max_batch, dtype=self.dtype)
            self.relay_buffer = np.empty(self.relay_rows * self.max_batch, dtype=self.dtype)

    def reads_whole_layer(self) -> bool:
        """Whether my rows read every neuron of layer l-1 (then I ask every owner for all of
        its neurons, in its local order): a dense layer's pattern."""
        return bool(np.array_equal(self.recv_counts, self.table_counts))

    def values_between_nodes(self, node: np.ndarray) -> int:
        """Values per sample this rank sends forward to ranks on other nodes (``node``: the
        node of every rank): what crosses the network for this layer, from the plan's counts."""
        return int(self.mpi_send_counts[node != node[self.comm.rank]].sum())

    def node_union_values(self, node: np.ndarray) -> int:
        """Values per sample I would send to other nodes if each crossed to a node once (the
        ``node`` kind's figure, from this plan's requests alone: no communication)."""
        mine = node[self.comm.rank]
        return sum(self._requested_by_any(np.flatnonzero(node == other)).size
                   for other in np.unique(node[node != mine]))

    def _requested_by(self, dest: int) -> np.ndarray:
        start = self.send_displs[dest]
        return self.requested[start: start + self.send_counts[dest]]

    def _requested_by_any(self, readers: np.ndarray) -> np.ndarray:
        """The neurons of mine that any of ``readers`` reads, ascending, each once."""
        return np.unique(np.concatenate([self._requested_by(int(d)) for d in readers]))

    @staticmethod
    def share_buffers(plans: list[ExchangePlan]) -> None:
        """One send and one receive buffer for plans that never have messages in flight at
        the same time (a forward-only pass, layer after layer)."""
        if not plans:
            return
        batch, dtype = plans[0].max_batch, plans[0].dtype
        send = np.empty(max(p.send_rows for p in plans) * batch, dtype=dtype)
        recv = np.empty(max(p.recv_rows for p in plans) * batch, dtype=dtype)
        relay = np.empty(max(p.relay_rows for p in plans) * batch, dtype=dtype)
        for plan in plans:
            plan.send_buffer, plan.recv_buffer, plan.relay_buffer = send, recv, relay

    def _packed(self, started: float) -> None:
        """Count (and trace) packing or unpacking that began at ``started``."""
        now = time.perf_counter()
        self.seconds_pack += now - started
        self.tracer.add("pack", "pack", started, now)

    def _waited(self, started: float, what: str) -> None:
        """Count (and trace) time in MPI that began at ``started``: posting a nonblocking
        exchange ("post"), waiting for it ("wait", which also traces the exchange in
        flight since its post, on the second track) or a blocking one."""
        now = time.perf_counter()
        self.seconds_wait += now - started
        if self.tracer.enabled:
            self.tracer.add(what, "wait", started, now)
            if what == "post":
                self._posted = started
            elif what == "wait" and self._posted is not None:
                self.tracer.add(f"layer {self.layer} {self._direction}", "exchange",
                                self._posted, now, EXCHANGE_TRACK)
                self._posted = None

    def _check_batch(self, batch: int) -> None:
        if batch > self.max_batch:
            raise MpinnError(f"batch of {batch} exceeds the plan's {self.max_batch}")

    def _views(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        self._check_batch(batch)
        send = self.send_buffer[: self.send_counts.sum() * batch].reshape(-1, batch)
        recv = self.recv_buffer[: self.n_inputs * batch].reshape(-1, batch)
        return send, recv

    def _start(self, send: np.ndarray, send_counts: np.ndarray, send_displs: np.ndarray,
               recv: np.ndarray, recv_counts: np.ndarray, recv_displs: np.ndarray,
               batch: int) -> None:
        if self.comm.size == 1:  # one rank (a replica group of one): nothing to move
            return
        started = time.perf_counter()
        self._request = self._post(send, send_counts, send_displs, recv, recv_counts, recv_displs,
                                   batch)
        self._waited(started, "post")
        self._count(send_counts, recv_counts, batch)

    def _post(self, send: np.ndarray, send_counts: np.ndarray, send_displs: np.ndarray,
              recv: np.ndarray, recv_counts: np.ndarray, recv_displs: np.ndarray,
              batch: int) -> MPI.Request:
        """The nonblocking collective that moves one exchange (rows times ``batch`` values)."""
        return self.comm.Ialltoallv(
            [send, (send_counts * batch, send_displs * batch), self.mpi_type],
            [recv, (recv_counts * batch, recv_displs * batch), self.mpi_type])

    def _count(self, send_counts: np.ndarray, recv_counts: np.ndarray, batch: int) -> None:
        itemsize = self.dtype.itemsize
        self.bytes_sent += int(send_counts.sum()) * batch * itemsize
        self.bytes_received += int(recv_counts.sum()) * batch * itemsize

    def _wait(self) -> None:
        if self.comm.size == 1:
            return
        started = time.perf_counter()
        assert self._request is not None, "finish without start"
        self._request.Wait()
        self._request = None
        self._waited(started, "wait")

    @property
    def in_flight(self) -> bool:
        """An exchange (or a part of one) is posted and not yet waited for."""
        return self._request is not None or bool(self._parts)

    def progress(self) -> None:
        """Let MPI move the exchange in flight (a ``Test``): Open MPI's TCP transport moves
        bytes only inside MPI calls, so a long GEMM between post and wait would hold them.
        One ``Test`` drives every transfer of the process, the parts' too."""
        request = self._request or next(iter(self._parts.values()), None)
        if request is not None:
            started = time.perf_counter()
            request.Test()
            self._waited(started, "test")

    # ---- one exchange in parts of the batch's columns (Engine: the output layer across
    # nodes, whose exchange has no GEMM of its own to hide behind). Each part has its own
    # stretch of the buffers, (rows, width) from row offset rows * start, so several are in
    # flight at once; every rank posts and waits for the parts in the same order.

    def _part_views(self, columns: slice) -> tuple[np.ndarray, np.ndarray]:
        if type(self) is not ExchangePlan:
            raise MpinnError(f"an exchange in parts of the batch needs the alltoallv kind, "
                             f"not {self.kind}")
        self._check_batch(columns.stop)
        width = columns.stop - columns.start
        send = self.send_buffer[self.n_send * columns.start: self.n_send * columns.stop]
        recv = self.recv_buffer[self.n_inputs * columns.start: self.n_inputs * columns.stop]
        return send.reshape(self.n_send, width), recv.reshape(self.n_inputs, width)

    def _post_part(self, columns: slice, send: np.ndarray, send_counts: np.ndarray,
                   send_displs: np.ndarray, recv: np.ndarray, recv_counts: np.ndarray,
                   recv_displs: np.ndarray) -> None:
        width = columns.stop - columns.start
        if self.comm.size == 1:
            return
        started = time.perf_counter()
        self._parts[columns.start] = self.comm.Ialltoallv(
            [send, (send_counts * width, send_displs * width), self.mpi_type],
            [recv, (recv_counts * width, recv_displs * width), self.mpi_type])
        # when, and its track beside the others in flight (traced runs)
        self._part_posted[columns.start] = (started, len(self._parts))
        self._waited(started, "post")
        self._posted = None  # the part's own span is traced by _wait_part
        self._count(send_counts, recv_counts, width)

    def _wait_part(self, columns: slice) -> None:
        request = self._parts.pop(columns.start, None)
        if request is None:
            return
        started = time.perf_counter()
        request.Wait()
        self._waited(started, "wait")
        if self.tracer.enabled:
            posted, track = self._part_posted.pop(columns.start)
            self.tracer.add(f"layer {self.layer} {self._direction} part", "exchange",
                            posted, time.perf_counter(), EXCHANGE_TRACK + track)

    def start_forward_part(self, local: np.ndarray, columns: slice) -> np.ndarray:
        """``start_forward`` of the batch columns ``columns``: ``local`` is (n_local, width),
        my activations of those columns. Returns that part's receive block (n_inputs, width),
        complete after ``finish_part(columns)``."""
        self._direction = "forward"
        send, recv = self._part_views(columns)
        self._pack(local, send, recv)
        self._post_part(columns, send, self.mpi_send_counts, self.send_displs,
                        recv, self.mpi_recv_counts, self.recv_displs)
        return recv

    def finish_part(self, columns: slice) -> np.ndarray:
        """Wait for the forward part ``columns`` posted by ``start_forward_part``; returns its
        receive block (n_inputs, width)."""
        self._wait_part(columns)
        return self._part_views(columns)[1]

    def start_backward_part(self, partial: np.ndarray, columns: slice) -> None:
        """``start_backward`` of the batch columns ``columns``: ``partial`` is their partial
        sums, (n_inputs, width) C-contiguous, its remote rows final."""
        self._direction = "backward"
        send, _ = self._part_views(columns)
        self._post_part(columns, partial, self.mpi_recv_counts, self.recv_displs,
                        send, self.mpi_send_counts, self.send_displs)

    def finish_backward_part(self, partial: np.ndarray, columns: slice) -> np.ndarray:
        """Wait for the part ``columns``, then add up the partial sums of the neurons I own,
        in ``finish_backward``'s order: (n_local, width), valid until that part's next use."""
        self._wait_part(columns)
        summed = self.sum_buffer[self.n_local * columns.start: self.n_local * columns.stop]
        return self._sum(partial, self._part_views(columns)[0],
                         summed.reshape(self.n_local, columns.stop - columns.start))

    def start_forward(self, local: np.ndarray) -> np.ndarray:
        """Pack and post the exchange of ``local`` (n_local, batch), my layer-(l-1) activations.

        Returns the receive buffer (n_inputs, batch): its first ``n_own_inputs`` rows, my own
        inputs, are ready at once; the rest after ``finish_forward``.
        """
        self._direction = "forward"
        batch = self._batch = local.shape[1]
        send, recv = self._views(batch)
        self._pack(local, send, recv)
        self._start(send, self.mpi_send_counts, self.send_displs,
                    recv, self.mpi_recv_counts, self.recv_displs, batch)
        return recv

    def finish_forward(self) -> None:
        """Wait until the remote rows of the receive buffer have arrived."""
        self._wait()

    def recv_view(self) -> np.ndarray:
        """The receive buffer of the last ``start_forward``, (n_inputs, batch)."""
        return self._views(self._batch)[1]

    def forward(self, local: np.ndarray) -> np.ndarray:
        """Gather the inputs of my rows, (n_inputs, batch) in receive order, from ``local``.

        The result is a view of the plan's receive buffer, valid until the next ``forward``.
        """
        recv = self.start_forward(local)
        self.finish_forward()
        return recv

    def start_backward(self, partial: np.ndarray) -> None:
        """Post the return of the partial sums ``partial`` (n_inputs, batch) to their owners.

        Only the remote rows (``n_own_inputs`` onwards) must be final when this is called;
        my own rows are read by ``finish_backward``.
        """
        self._direction = "backward"
        batch = self._batch = partial.shape[1]
        send, _ = self._views(batch)
        self._start(partial, self.mpi_recv_counts, self.recv_displs,
                    send, self.mpi_send_counts, self.send_displs, batch)

    def finish_backward(self, partial: np.ndarray) -> np.ndarray:
        """Wait, then add up the partial sums of the neurons I own: (n_local, batch), a view
        of the plan's buffer, valid until the next ``finish_backward``."""
        self._wait()
        summed = self.sum_buffer[: self.n_local * self._batch].reshape(self.n_local, self._batch)
        return self._sum(partial, self._views(self._batch)[0], summed)

    def _pack(self, local: np.ndarray, send: np.ndarray, recv: np.ndarray) -> None:
        """What each other rank reads of ``local`` into ``send``; my own inputs straight to
        the head of ``recv`` (a plain copy when the rows read all of them in order, the
        common case)."""
        started = time.perf_counter()
        for part in self.remote_send:
            if part.stop > part.start:
                np.take(local, self.send_index[part], axis=0, out=send[part])
        if self.own_contiguous:
            recv[self.self_recv] = local[: self.n_own_inputs]
        elif self.n_own_inputs:
            np.take(local, self.own_index, axis=0, out=recv[self.self_recv])
        self._packed(started)

    def _sum(self, partial: np.ndarray, received: np.ndarray, summed: np.ndarray) -> np.ndarray:
        """Into ``summed``, each owned neuron's partial sums: the ones ``received`` from the
        other ranks and my own (``partial``'s head), in a fixed order."""
        started = time.perf_counter()
        received[self.self_send] = partial[self.self_recv]
        acc = self.accumulate
        csr_matmul(acc.indptr, acc.indices, acc.data, acc.shape[1], received, summed)
        self._packed(started)
        return summed

    def backward(self, partial: np.ndarray) -> np.ndarray:
        """Add up, at their owners, the partial sums ``partial`` (n_inputs, batch) of my rows.

        Returns the summed gradient of the neurons of layer l-1 I own, (n_local, batch).
        """
        self.start_backward(partial)
        return self.finish_backward(partial)

class GatherPlan(ExchangePlan):
    """Kind ``allgather``: forward one Iallgatherv of every rank's whole block, backward the
    Alltoallv's (bitwise its results: the forward only moves values)."""

    kind = "allgather"
    reduce_scatter = False

    @classmethod
    def build(cls, base: ExchangePlan, dense: bool, job: Job) -> ExchangePlan:
        return cls(base) if dense else base

    def __init__(self, base: ExchangePlan) -> None:
        """The gather's layout of ``base``'s counts; only for a layer every rank reads whole
        (``reads_whole_layer`` on every rank, agreed by ``make_plans``).

        The gather puts each owner's block where the receive order wants it; my own block,
        which I copy to the head myself so it is ready before the gather ends, is also
        delivered by the gather, into a spare tail that nobody reads (MPI may write a
        receive buffer until the request completes, so the head cannot be the target). The
        reduce-scatter wants its input in rank order: the partial sums are copied there,
        my own block zero, and added at the owner after the wait (they are computed while
        the remote sums travel).
        """
        self.__dict__.update(vars(base))
        size, rank = self.comm.size, self.comm.rank
        reduce_scatter = self.reduce_scatter
        # reductions need MPI's predefined type (from_numpy_dtype gives a duplicate)
        self.sum_type = {4: MPI.FLOAT, 8: MPI.DOUBLE}[self.dtype.itemsize]
        self.layer_displs = displacements(self.table_counts)
        self.gather_displs = self.recv_displs.copy()
        self.gather_displs[rank] = self.n_inputs  # my copy of my own block: the spare tail
        after = int(self.table_counts[rank + 1:].sum())
        # partial sums (receive order) -> rank order: ranks after me, then ranks before me
        self.after_me = (slice(self.n_own_inputs, self.n_own_inputs + after),
                         slice(int(self.layer_displs[rank]) + self.n_own_inputs, self.n_inputs))
        self.before_me = (slice(self.n_own_inputs + after, self.n_inputs),
                          slice(0, int(self.layer_displs[rank])))
        self.own_rank_rows = slice(int(self.layer_displs[rank]),
                                   int(self.layer_displs[rank]) + self.n_own_inputs)
        assert self.own_contiguous and size > 1
        # the reduce-scatter's rank-ordered partial sums; else a micro-batch's own columns
        self.send_rows = max(self.n_send, self.n_inputs if reduce_scatter else self.n_local)
        self.recv_rows = self.n_inputs + self.n_own_inputs
        self._allocate()

    def start_forward(self, local: np.ndarray) -> np.ndarray:
        """One Iallgatherv of my whole layer (see ``ExchangePlan.start_forward``)."""
        self._direction = "forward"
        started = time.perf_counter()
        batch = self._batch = local.shape[1]
        self._check_batch(batch)
        whole = self.recv_buffer[: self.recv_rows * batch]
        recv = whole[: self.n_inputs * batch].reshape(-1, batch)
        recv[self.self_recv] = local
        if not local.flags.c_contiguous:  # a micro-batch's columns: MPI wants one block
            source = self.send_buffer[: local.size].reshape(local.shape)
            source[...] = local
            local = source
        self._packed(started)
        started = time.perf_counter()
        self._request = self.comm.Iallgatherv(
            [local, self.mpi_type],
            [whole, (self.table_counts * batch, self.gather_displs * batch), self.mpi_type])
        self._waited(started, "post")
        self._count(self.mpi_send_counts, self.mpi_recv_counts, batch)
        return recv


class ReduceScatterPlan(GatherPlan):
    """Kind ``collective``: the gather forward, one Ireduce_scatter backward."""

    kind = "collective"
    reduce_scatter = True

    def start_backward(self, partial: np.ndarray) -> None:
        """One Ireduce_scatter of the partial sums, in rank order."""
        self._direction = "backward"
        started = time.perf_counter()
        batch = self._batch = partial.shape[1]
        self._check_batch(batch)
        ordered = self.send_buffer[: self.n_inputs * batch].reshape(-1, batch)
        for source, target in (self.after_me, self.before_me):
            ordered[target] = partial[source]
        ordered[self.own_rank_rows] = 0  # mine are added after the wait, not sent
        summed = self.sum_buffer[: self.n_local * batch]
        self._packed(started)
        started = time.perf_counter()
        self._request = self.comm.Ireduce_scatter(
            [self.send_buffer[: self.n_inputs * batch], self.sum_type],
            [summed, self.sum_type], self.table_counts * batch, op=MPI.SUM)
        self._waited(started, "post")
        self._count(self.mpi_recv_counts, self.mpi_send_counts, batch)

    def finish_backward(self, partial: np.ndarray) -> np.ndarray:
        """Wait, then add my own partial sums to what the reduce-scatter summed for me."""
        self._wait()
        started = time.perf_counter()
        summed = self.sum_buffer[: self.n_local * self._batch].reshape(self.n_local, self._batch)
        summed += partial[self.self_recv]
        self._packed(started)
        return summed


class NeighborPlan(ExchangePlan):
    """Kind ``neighbor``: the Alltoallv's buffers over a graph communicator of the ranks I
    exchange with (``Ineighbor_alltoallv``), without the empty entries of the others."""

    kind = "neighbor"

    @classmethod
    def build(cls, base: ExchangePlan, dense: bool, job: Job) -> ExchangePlan:
        """Over the graph of the ranks that exchange with me: one graph communicator per
        distinct pattern of the job, shared by the layers that have it."""
        comm = job.comm
        talks = (base.mpi_send_counts > 0) | (base.mpi_recv_counts > 0)
        neighbors = np.flatnonzero(talks).astype(np.int64)
        # the whole pattern as the key, so every rank finds (or misses) the same graph
        pattern = np.zeros((comm.size, comm.size), dtype=np.uint8)
        pattern[comm.rank, neighbors] = 1
        allreduce(comm, pattern, MAX)
        key = pattern.tobytes()
        if key not in job.graphs:
            job.graphs[key] = comm.Create_dist_graph_adjacent(
                neighbors.tolist(), neighbors.tolist(), reorder=False)
        return cls(base, job.graphs[key], neighbors)

    def __init__(self, base: ExchangePlan, graph: MPI.Distgraphcomm,
                 neighbors: np.ndarray) -> None:
        """``graph``'s sources and destinations are both ``neighbors`` (the other ranks I send
        to or receive from, ascending)."""
        self.__dict__.update(vars(base))
        self.graph = graph
        self.neighbors = neighbors

    def _post(self, send: np.ndarray, send_counts: np.ndarray, send_displs: np.ndarray,
              recv: np.ndarray, recv_counts: np.ndarray, recv_displs: np.ndarray,
              batch: int) -> MPI.Request:
        nb = self.neighbors
        return self.graph.Ineighbor_alltoallv(
            [send, (send_counts[nb] * batch, send_displs[nb] * batch), self.mpi_type],
            [recv, (recv_counts[nb] * batch, recv_displs[nb] * batch), self.mpi_type])

