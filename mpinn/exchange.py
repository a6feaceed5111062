"""All MPI communication of mpinn: per-layer exchange plans and the few small reductions.

An ``ExchangePlan`` is built once per layer from the metadata table. ``forward`` moves the
activations of layer l-1 from their owners to every rank whose rows read them, with one
Alltoallv of numpy buffers; ``backward`` sends the partial sums ``W^T dz`` the other way
and adds them up at the owners. Buffers are allocated once, for the largest batch.

Four kinds of exchange carry the same bytes (``make_plans`` picks one per layer, every
rank alike): ``alltoallv``, one Ialltoallv over the whole communicator; ``collective``, for
a layer every rank reads whole (a dense layer, or a sparse one whose rows on every rank
name all of the layer below), forward one Iallgatherv and backward one Ireduce_scatter;
``allgather``, the same Iallgatherv forward and the Alltoallv backward (bitwise the
Alltoallv's results: the forward only moves values, the backward sums in the same order);
``neighbor``, one Ineighbor_alltoallv over a graph communicator of the ranks that actually
exchange (``Dist_graph_create_adjacent``, built once per pattern). Two more move fewer
bytes between nodes: each value crosses between a pair of nodes once, to one proxy rank
there, which forwards it inside its node (``use_node``); ``node`` also sums the partial
sums inside the reading node before they cross back (equal within rounding),
``node-forward`` sends them back as the Alltoallv does (bitwise its results).

A rank's gathered inputs are laid out in *receive order*: grouped by owning rank, ascending
index within each owner. The receive buffer is then directly the GEMM operand, and the
shard stores its weight columns in the same order, so nothing is unpacked on the hot path.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import numpy as np
import scipy.sparse as sp
from mpi4py import MPI
from mpi4py.util.dtlib import from_numpy_dtype

from mpinn.errors import MpinnError
from mpinn.kernels import csr_matmul
from mpinn.metadata import MetadataTable
from mpinn.topology import job_nodes
from mpinn.trace import EXCHANGE as EXCHANGE_TRACK
from mpinn.trace import NULL, NullTracer

T = TypeVar("T")

EXCHANGES = ("auto", "alltoallv", "allgather", "collective", "neighbor", "node", "node-forward")
NODE_KINDS = ("node", "node-forward")


def receive_order(needed: np.ndarray, owner: np.ndarray, rank: int, size: int) -> np.ndarray:
    """``needed`` input indices in receive-buffer layout: my own inputs first, then those of
    ranks rank+1, rank+2, ... (wrapping), ascending index within each owner.

    Own inputs first makes the local block a leading run of columns, the remote block the
    rest, as PETSc's diagonal and off-diagonal blocks: the local block is computed while
    the remote inputs are still in flight.
    """
    needed = np.asarray(needed, dtype=np.int64)
    return needed[np.lexsort((needed, (owner[needed] - rank) % size))]


def dense_traffic(table: MetadataTable, layer: int) -> np.ndarray:
    """Neurons of layer ``layer - 1`` sent from rank s to rank d per sample, for a dense layer.

    Every rank that owns a row of ``layer`` reads all of layer ``layer - 1``; a rank's own
    inputs do not travel. Pure: used by ``inspect`` and checked against the real plans.
    """
    own_prev = table.counts(layer - 1)
    readers = (table.counts(layer) > 0).astype(np.int64)
    traffic = np.outer(own_prev, readers)
    np.fill_diagonal(traffic, 0)
    return traffic


class ExchangePlan:
    """Alltoallv plan that feeds the rows of one layer with the activations they read."""

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
        self.kind = "alltoallv"  # make_plans may switch it: use_collective, use_neighbor, use_node
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
        self.recv_displs[rotation] = _displacements(self.recv_counts[rotation])
        self.send_displs = _displacements(self.send_counts)
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
        self.accumulate = sp.csr_matrix(
            (np.ones(n_send, dtype=self.dtype), (self.send_index, np.arange(n_send))),
            shape=(self.n_local, n_send))
        self.sum_buffer = np.empty(0 if shared else self.n_local * max_batch, dtype=self.dtype)
        # rows of the send and receive buffers (the collective kind needs more of both)
        self.send_rows, self.recv_rows = n_send, self.n_inputs
        self.relay_rows = 0  # the node kind's staging buffer (use_node)
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

    def use_collective(self, reduce_scatter: bool = True) -> None:
        """Forward as one Iallgatherv, backward as one Ireduce_scatter (or, without
        ``reduce_scatter``, as the Alltoallv: kind ``allgather``); only for a layer every
        rank reads whole (``reads_whole_layer`` on every rank, agreed by ``make_plans``).

        The gather puts each owner's block where the receive order wants it; my own block,
        which I copy to the head myself so it is ready before the gather ends, is also
        delivered by the gather, into a spare tail that nobody reads (MPI may write a
        receive buffer until the request completes, so the head cannot be the target). The
        reduce-scatter wants its input in rank order: the partial sums are copied there,
        my own block zero, and added at the owner after the wait (they are computed while
        the remote sums travel).
        """
        size, rank = self.comm.size, self.comm.rank
        self.kind = "collective" if reduce_scatter else "allgather"
        # reductions need MPI's predefined type (from_numpy_dtype gives a duplicate)
        self.sum_type = {4: MPI.FLOAT, 8: MPI.DOUBLE}[self.dtype.itemsize]
        self.layer_displs = _displacements(self.table_counts)
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

    def use_neighbor(self, graph: MPI.Distgraphcomm, neighbors: np.ndarray) -> None:
        """Exchange over ``graph``, whose sources and destinations are both ``neighbors``
        (the other ranks I send to or receive from, ascending): the same buffers as the
        Alltoallv, without the empty entries for ranks that exchange nothing with me."""
        self.kind = "neighbor"
        self.graph = graph
        self.neighbors = neighbors

    def values_between_nodes(self, node: np.ndarray) -> int:
        """Values per sample this rank sends forward to ranks on other nodes (``node``: the
        node of every rank): what crosses the network for this layer, from the plan's counts."""
        counts = self.across_send_counts if self.kind in NODE_KINDS else self.mpi_send_counts
        return int(counts[node != node[self.comm.rank]].sum())

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

    def use_node(self, node: np.ndarray, node_comm: MPI.Comm, sum_inside: bool = True) -> None:
        """Two-level exchange (collective over ``comm``, then over ``node_comm``, the ranks of
        my node in rank order): each value crosses between a pair of nodes once.

        Forward, phase 1 (one Ialltoallv over ``comm``): I send a rank of my own node what it
        reads of mine, as the Alltoallv does, and each other node N the union of what its
        ranks read of mine, to one proxy on N (the rank of N whose node-local index is mine
        modulo N's rank count, which spreads the proxies over N's ranks). Phase 2 (one
        Alltoallv over ``node_comm``, in ``finish_forward``): proxies forward what each rank
        of their node reads. Everything lands in the *relay* buffer; one take puts it in
        receive order, so the engine sees the Alltoallv's layout. Backward runs the phases
        in reverse: partial sums go to the proxy, which adds its node's sums per value
        (its own first, then its node's ranks in rank order: a fixed order), and one partial
        per value and node crosses to the owner, which sums them like the Alltoallv. Without
        ``sum_inside`` (kind ``node-forward``) backward is the Alltoallv's: the partial sums
        of a remote node cross once per reading rank, and the results are bitwise the
        Alltoallv's (summing inside the node first changes the order of the additions).

        Relay rows: [0, R1) phase 1's arrivals by source rank; [R1, R1 + S2) phase 2's send
        (backward: its receive); then R2 rows of phase 2's arrivals by proxy; then R1 rows
        for backward's sums per relayed value.
        """
        comm, rank, size = self.comm, self.comm.rank, self.comm.size
        layer = self.layer
        mine = node[rank]
        members = [np.flatnonzero(node == n) for n in range(int(node.max()) + 1)]
        index_in_node = np.empty(size, dtype=np.int64)
        for ranks in members:
            index_in_node[ranks] = np.arange(ranks.size)

        def proxy(owner: int, on: int) -> int:
            ranks = members[on]
            return int(ranks[index_in_node[owner] % ranks.size])

        # phase 1, as owner: readers on my node get their requests, a proxy its node's union
        across = [np.zeros(0, dtype=np.int64)] * size
        for dest in members[mine]:
            across[dest] = self._requested_by(int(dest))  # mine too: backward sums it
        for other, ranks in enumerate(members):
            if other != mine and ranks.size:
                across[proxy(rank, other)] = self._requested_by_any(ranks)
        self.across_send_counts = np.array([a.size for a in across], dtype=np.int64)
        self.across_send_displs = _displacements(self.across_send_counts)
        across_ids = np.concatenate(across)
        self.across_send_index = self.table.local_index(layer - 1, across_ids)
        self.across_self = slice(self.across_send_displs[rank],
                                 self.across_send_displs[rank] + self.across_send_counts[rank])
        self.across_mpi_send_counts = self.across_send_counts.copy()
        self.across_mpi_send_counts[rank] = 0
        self.across_recv_counts = np.zeros(size, dtype=np.int64)
        comm.Alltoall(self.across_mpi_send_counts, self.across_recv_counts)
        self.across_recv_displs = _displacements(self.across_recv_counts)
        relayed = np.empty(int(self.across_recv_counts.sum()), dtype=np.int64)
        comm.Alltoallv([across_ids, (self.across_mpi_send_counts, self.across_send_displs),
                        MPI.INT64_T],
                       [relayed, (self.across_recv_counts, self.across_recv_displs), MPI.INT64_T])
        r1 = relayed.size

        def relay_rows_of(owner: int, ids: np.ndarray) -> np.ndarray:
            """Rows of phase 1's arrivals holding ``ids`` (neurons of ``owner``)."""
            start = self.across_recv_displs[owner]
            segment = relayed[start: start + self.across_recv_counts[owner]]
            at = np.searchsorted(segment, ids)
            if np.any(at >= segment.size) or np.any(segment[np.minimum(at, segment.size - 1)]
                                                   != ids):
                raise MpinnError(f"layer {layer}: node exchange plan: rank {owner} did not "
                                 f"relay what rank {rank} expects (ranks disagree on the nodes)")
            return start + at

        # phase 2, as reader: ask each proxy of my node for what I read of the owners it relays
        my_ids = [self.inputs[self.recv_displs[s]: self.recv_displs[s] + self.recv_counts[s]]
                  for s in range(size)]
        asks: list[list[np.ndarray]] = [[] for _ in range(node_comm.size)]
        for owner in range(size):
            if node[owner] != mine and self.recv_counts[owner]:
                via = proxy(owner, mine)
                if via != rank:
                    asks[index_in_node[via]].append(my_ids[owner])
        self.inside_recv_counts = np.array([sum(a.size for a in ask) for ask in asks],
                                           dtype=np.int64)
        self.inside_recv_displs = _displacements(self.inside_recv_counts)
        self.inside_send_counts = np.zeros(node_comm.size, dtype=np.int64)
        node_comm.Alltoall(self.inside_recv_counts, self.inside_send_counts)
        self.inside_send_displs = _displacements(self.inside_send_counts)
        asked = np.empty(int(self.inside_send_counts.sum()), dtype=np.int64)
        node_comm.Alltoallv([np.concatenate([np.zeros(0, np.int64)] + [a for ask in asks
                                                                       for a in ask]),
                             (self.inside_recv_counts, self.inside_recv_displs), MPI.INT64_T],
                            [asked, (self.inside_send_counts, self.inside_send_displs),
                             MPI.INT64_T])
        owners = self.table.owner_of(layer - 1, asked) if asked.size else asked
        self.inside_send_index = np.empty(asked.size, dtype=np.int64)
        for owner in np.unique(owners):
            at = owners == owner
            self.inside_send_index[at] = relay_rows_of(int(owner), asked[at])
        s2, r2 = asked.size, int(self.inside_recv_counts.sum())
        self.inside_sent = slice(r1, r1 + s2)
        self.inside_arrived = slice(r1 + s2, r1 + s2 + r2)
        self.relay_sums = slice(r1 + s2 + r2, 2 * r1 + s2 + r2)

        # where each remote input of mine is in the relay buffer, in receive order
        self.final_index = np.empty(self.n_inputs - self.n_own_inputs, dtype=np.int64)
        asked_so_far = np.zeros(node_comm.size, dtype=np.int64)
        for owner in range(size):
            count = self.recv_counts[owner]
            if owner == rank or not count:
                continue
            at = slice(self.recv_displs[owner] - self.n_own_inputs,
                       self.recv_displs[owner] - self.n_own_inputs + count)
            via = proxy(owner, mine) if node[owner] != mine else rank
            if via == rank:  # from the owner itself, or relayed to me
                self.final_index[at] = relay_rows_of(owner, my_ids[owner])
            else:
                p = index_in_node[via]
                start = self.inside_arrived.start + self.inside_recv_displs[p] + asked_so_far[p]
                self.final_index[at] = np.arange(start, start + count)
                asked_so_far[p] += count
        self.node_comm = node_comm
        self.kind = "node" if sum_inside else "node-forward"
        self.relay_rows = 2 * r1 + s2 + r2 if sum_inside else r1 + s2 + r2
        n_across = int(self.across_send_counts.sum())
        self.send_rows = max(self.send_rows, n_across)  # phase 1's send; backward's receive
        if not sum_inside:
            self._allocate()
            return
        # backward at the proxy: per relayed value, its own partial then its node's, in order
        columns = np.concatenate([np.arange(r1), r1 + np.arange(s2)])
        rows = np.concatenate([np.arange(r1), self.inside_send_index])
        self.relay_sum = sp.csr_matrix((np.ones(rows.size, dtype=self.dtype), (rows, columns)),
                                       shape=(r1, r1 + s2))
        self.relay_sum.sort_indices()
        self.across_accumulate = sp.csr_matrix(
            (np.ones(n_across, dtype=self.dtype), (self.across_send_index, np.arange(n_across))),
            shape=(self.n_local, n_across))
        self.across_accumulate.sort_indices()
        self._allocate()

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
        if self.kind == "neighbor":
            nb = self.neighbors
            self._request = self.graph.Ineighbor_alltoallv(
                [send, (send_counts[nb] * batch, send_displs[nb] * batch), self.mpi_type],
                [recv, (recv_counts[nb] * batch, recv_displs[nb] * batch), self.mpi_type])
        else:
            self._request = self.comm.Ialltoallv(
                [send, (send_counts * batch, send_displs * batch), self.mpi_type],
                [recv, (recv_counts * batch, recv_displs * batch), self.mpi_type])
        self._waited(started, "post")
        self._count(send_counts, recv_counts, batch)

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
        if self.kind != "alltoallv":
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
        started = time.perf_counter()
        send, recv = self._part_views(columns)
        for part in self.remote_send:
            if part.stop > part.start:
                np.take(local, self.send_index[part], axis=0, out=send[part])
        if self.own_contiguous:
            recv[self.self_recv] = local[: self.n_own_inputs]
        elif self.n_own_inputs:
            np.take(local, self.own_index, axis=0, out=recv[self.self_recv])
        self._packed(started)
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
        started = time.perf_counter()
        send, _ = self._part_views(columns)
        send[self.self_send] = partial[self.self_recv]
        summed = self.sum_buffer[self.n_local * columns.start: self.n_local * columns.stop]
        summed = summed.reshape(self.n_local, columns.stop - columns.start)
        acc = self.accumulate
        csr_matmul(acc.indptr, acc.indices, acc.data, acc.shape[1], send, summed)
        self._packed(started)
        return summed

    def start_forward(self, local: np.ndarray) -> np.ndarray:
        """Pack and post the exchange of ``local`` (n_local, batch), my layer-(l-1) activations.

        Returns the receive buffer (n_inputs, batch): its first ``n_own_inputs`` rows, my own
        inputs, are ready at once; the rest after ``finish_forward``.
        """
        self._direction = "forward"
        if self.kind in ("collective", "allgather"):
            return self._start_gather(local)
        if self.kind in NODE_KINDS:
            return self._start_node_forward(local)
        started = time.perf_counter()
        batch = self._batch = local.shape[1]
        send, recv = self._views(batch)
        for part in self.remote_send:
            if part.stop > part.start:
                np.take(local, self.send_index[part], axis=0, out=send[part])
        # my own inputs go straight to the head of the receive buffer (a plain copy when
        # the rows read all of them in order, the common case)
        if self.own_contiguous:
            recv[self.self_recv] = local[: self.n_own_inputs]
        elif self.n_own_inputs:
            np.take(local, self.own_index, axis=0, out=recv[self.self_recv])
        self._packed(started)
        self._start(send, self.mpi_send_counts, self.send_displs,
                    recv, self.mpi_recv_counts, self.recv_displs, batch)
        return recv

    def _start_gather(self, local: np.ndarray) -> np.ndarray:
        """``start_forward`` of the collective kind: one Iallgatherv of my whole layer."""
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

    def finish_forward(self) -> None:
        """Wait until the remote rows of the receive buffer have arrived."""
        self._wait()
        if self.kind in NODE_KINDS:
            self._finish_node_forward()

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
        if self.kind == "collective":
            self._start_reduce(partial)
            return
        if self.kind == "node":
            self._start_node_backward(partial)
            return
        send, _ = self._views(batch)
        self._start(partial, self.mpi_recv_counts, self.recv_displs,
                    send, self.mpi_send_counts, self.send_displs, batch)

    def finish_backward(self, partial: np.ndarray) -> np.ndarray:
        """Wait, then add up the partial sums of the neurons I own: (n_local, batch), a view
        of the plan's buffer, valid until the next ``finish_backward``."""
        self._wait()
        started = time.perf_counter()
        if self.kind == "collective":
            summed = self.sum_buffer[: self.n_local * self._batch].reshape(self.n_local, self._batch)
            summed += partial[self.self_recv]
            self._packed(started)
            return summed
        if self.kind == "node":
            return self._finish_node_backward(partial)
        send, _ = self._views(self._batch)
        send[self.self_send] = partial[self.self_recv]
        summed = self.sum_buffer[: self.n_local * self._batch].reshape(self.n_local, self._batch)
        acc = self.accumulate
        csr_matmul(acc.indptr, acc.indices, acc.data, acc.shape[1], send, summed)
        self._packed(started)
        return summed

    def _start_reduce(self, partial: np.ndarray) -> None:
        """``start_backward`` of the collective kind: one Ireduce_scatter, in rank order."""
        started = time.perf_counter()
        batch = self._batch
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

    def backward(self, partial: np.ndarray) -> np.ndarray:
        """Add up, at their owners, the partial sums ``partial`` (n_inputs, batch) of my rows.

        Returns the summed gradient of the neurons of layer l-1 I own, (n_local, batch).
        """
        self.start_backward(partial)
        return self.finish_backward(partial)

    # ------------------------------------------------------------ the node kind (use_node)

    def _relay(self, rows: slice, batch: int) -> np.ndarray:
        return self.relay_buffer[rows.start * batch: rows.stop * batch].reshape(-1, batch)

    def _across_send(self, batch: int) -> np.ndarray:
        rows = int(self.across_send_counts.sum())
        return self.send_buffer[: rows * batch].reshape(rows, batch)

    def _start_node_forward(self, local: np.ndarray) -> np.ndarray:
        """Phase 1 of ``use_node``: pack for my node's readers and the other nodes' proxies."""
        started = time.perf_counter()
        batch = self._batch = local.shape[1]
        self._check_batch(batch)
        send = self._across_send(batch)
        np.take(local, self.across_send_index, axis=0, out=send)
        recv = self.recv_buffer[: self.n_inputs * batch].reshape(-1, batch)
        recv[self.self_recv] = send[self.across_self]
        arrived = self._relay(slice(0, self.inside_sent.start), batch)
        self._packed(started)
        self._start(send, self.across_mpi_send_counts, self.across_send_displs,
                    arrived, self.across_recv_counts, self.across_recv_displs, batch)
        return recv

    def _finish_node_forward(self) -> None:
        """Phase 2: proxies forward inside their node, then the relay goes to receive order."""
        batch = self._batch
        started = time.perf_counter()
        relay = self.relay_buffer[: self.relay_rows * batch].reshape(-1, batch)
        sent = self._relay(self.inside_sent, batch)
        np.take(relay, self.inside_send_index, axis=0, out=sent)
        self._packed(started)
        self._inside(sent, self.inside_send_counts, self.inside_send_displs,
                     self._relay(self.inside_arrived, batch), self.inside_recv_counts,
                     self.inside_recv_displs, batch)
        started = time.perf_counter()
        recv = self.recv_buffer[: self.n_inputs * batch].reshape(-1, batch)
        np.take(relay, self.final_index, axis=0, out=recv[self.n_own_inputs:])
        self._packed(started)

    def _inside(self, send: np.ndarray, send_counts: np.ndarray, send_displs: np.ndarray,
                recv: np.ndarray, recv_counts: np.ndarray, recv_displs: np.ndarray,
                batch: int) -> None:
        """Phase 2's blocking Alltoallv over my node's ranks (shared memory)."""
        started = time.perf_counter()
        self.node_comm.Alltoallv(
            [send, (send_counts * batch, send_displs * batch), self.mpi_type],
            [recv, (recv_counts * batch, recv_displs * batch), self.mpi_type])
        self._waited(started, "node alltoallv")
        self._count(send_counts, recv_counts, batch)

    def _start_node_backward(self, partial: np.ndarray) -> None:
        """Backward phase 2 reversed (to the proxies, summed there), then phase 1 reversed
        posted (one partial per value and node pair, to the owners)."""
        batch = self._batch
        self._check_batch(batch)
        started = time.perf_counter()
        relay = self.relay_buffer[: self.relay_rows * batch].reshape(-1, batch)
        relay[: self.inside_sent.start] = 0  # relayed values I do not read get no partial
        relay[self.final_index] = partial[self.n_own_inputs:]
        self._packed(started)
        self._inside(self._relay(self.inside_arrived, batch), self.inside_recv_counts,
                     self.inside_recv_displs, self._relay(self.inside_sent, batch),
                     self.inside_send_counts, self.inside_send_displs, batch)
        started = time.perf_counter()
        sums = self._relay(self.relay_sums, batch)
        acc = self.relay_sum
        csr_matmul(acc.indptr, acc.indices, acc.data, acc.shape[1],
                   relay[: self.inside_arrived.start], sums)
        self._packed(started)
        self._start(sums, self.across_recv_counts, self.across_recv_displs,
                    self._across_send(batch), self.across_mpi_send_counts,
                    self.across_send_displs, batch)

    def _finish_node_backward(self, partial: np.ndarray) -> np.ndarray:
        """Wait for phase 1 reversed, then sum per owned neuron (like the Alltoallv's)."""
        send = self._across_send(self._batch)
        started = time.perf_counter()
        send[self.across_self] = partial[self.self_recv]
        summed = self.sum_buffer[: self.n_local * self._batch].reshape(self.n_local, self._batch)
        acc = self.across_accumulate
        csr_matmul(acc.indptr, acc.indices, acc.data, acc.shape[1], send, summed)
        self._packed(started)
        return summed


def make_plans(comm: MPI.Comm, table: MetadataTable, layers: list[tuple[int, np.ndarray]],
               max_batch: int, dtype: np.dtype, shared: bool = False,
               exchange: str = "auto", nodes: np.ndarray | None = None) -> list[ExchangePlan]:
    """One ``ExchangePlan`` per (layer, inputs) pair, each of the kind ``exchange`` asks for
    (collective; every rank decides alike).

    ``collective`` and ``allgather`` apply only to a layer every rank reads whole and
    ``neighbor`` only with more than one rank, ``node`` only with more than one node; a
    layer where the kind asked for does not apply uses ``alltoallv``. ``auto`` follows
    ``auto_kind``. ``nodes``: the node of every rank of ``comm`` (default: asked of MPI,
    ``topology.job_nodes``; tests pass ``topology.block_nodes`` to fake nodes on one host).
    Graph communicators are built once per distinct pattern of who exchanges with whom and
    shared by the layers that have it; the node kind's communicator once per call.
    """
    check_exchange(exchange)
    if nodes is not None:
        nodes = check_nodes(nodes, comm.size)
    plans = [ExchangePlan(comm, table, layer, inputs, max_batch, dtype, shared)
             for layer, inputs in layers]
    if comm.size == 1 or exchange == "alltoallv" or not plans:
        return plans
    whole = np.array([int(p.reads_whole_layer()) for p in plans], dtype=np.int64)
    allreduce(comm, whole, MIN)
    node = nodes if nodes is not None else (
        job_nodes(comm) if exchange in NODE_KINDS else np.zeros(comm.size, np.int64))
    node_comm: MPI.Comm | None = None
    graphs: dict[bytes, MPI.Distgraphcomm] = {}
    for plan, dense in zip(plans, whole, strict=True):
        kind = auto_kind(bool(dense), comm.size) if exchange == "auto" else exchange
        if kind in NODE_KINDS and node.max() > 0:
            if node_comm is None:
                node_comm = comm.Split(int(node[comm.rank]), comm.rank)
            plan.use_node(node, node_comm, sum_inside=kind == "node")
        elif kind in ("collective", "allgather") and dense:
            plan.use_collective(reduce_scatter=kind == "collective")
        elif kind == "neighbor":
            talks = (plan.mpi_send_counts > 0) | (plan.mpi_recv_counts > 0)
            neighbors = np.flatnonzero(talks).astype(np.int64)
            # the whole pattern as the key, so every rank finds (or misses) the same graph
            pattern = np.zeros((comm.size, comm.size), dtype=np.uint8)
            pattern[comm.rank, neighbors] = 1
            allreduce(comm, pattern, MAX)
            key = pattern.tobytes()
            if key not in graphs:
                graphs[key] = comm.Create_dist_graph_adjacent(
                    neighbors.tolist(), neighbors.tolist(), reorder=False)
            plan.use_neighbor(graphs[key], neighbors)
    return plans


def free_plans(plans: list[ExchangePlan]) -> None:
    """Free the communicators ``make_plans`` built for ``plans`` (graph and node
    communicators, each shared by several plans, freed once). Collective over the plans'
    communicator; the plans cannot exchange afterwards."""
    built = {id(c): c for p in plans for c in (p.graph, p.node_comm) if c is not None}
    for comm in built.values():
        comm.Free()
    for p in plans:
        p.graph = p.node_comm = None


def check_nodes(nodes: np.ndarray, size: int) -> np.ndarray:
    """``nodes`` as the node of each of ``size`` ranks, numbered 0, 1, ... without gaps."""
    node = np.asarray(nodes, dtype=np.int64)
    if node.shape != (size,) or node.min() < 0:
        raise MpinnError(f"the node map must give a node number for each of the {size} ranks, "
                         f"got {nodes!r}")
    return np.unique(node, return_inverse=True)[1].astype(np.int64).reshape(size)


def check_exchange(kind: str) -> None:
    """Refuse an exchange kind that is not one of ``EXCHANGES``."""
    if kind not in EXCHANGES:
        raise MpinnError(f"--exchange must be one of {', '.join(EXCHANGES)}, got {kind!r}")


def auto_kind(dense: bool, size: int) -> str:
    """The exchange ``auto`` picks for a layer: for a layer every rank reads whole and more
    than two ranks, the allgather forward and the Alltoallv backward, else the Alltoallv.

    Measured (docs/scaling.md, 'Exchange kinds'): the Iallgatherv forward beat the
    Ialltoallv at 4 ranks and lost to it at 2 (where it is one message each way and
    the gather's extra copy of my own block counts); Open MPI's nonblocking
    reduce-scatter (libnbc: a binomial reduce to rank 0, then a scatter) moves more bytes
    than the Alltoallv and through one rank, so the backward stays on the Alltoallv.
    Results are bitwise those of the Alltoallv. The node kinds are never picked: they
    halve the bytes between nodes of a layer read whole and win on a slow link (1.5x on
    the Sparse DNN at 1 Gbit/s) but not on a fast one, whose speed the plan does not know
    (docs/scaling.md, 'Two-level exchange across nodes').
    """
    return "allgather" if dense and size > 2 else "alltoallv"


def _displacements(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)


# ---------------------------------------------------------------- small collectives


def allreduce(comm: MPI.Comm, values: np.ndarray, op: MPI.Op) -> np.ndarray:
    """Reduce a small numpy array over all ranks, in place (one rank: nothing to do, a
    replica group of one calls this a few times per step)."""
    if comm.size > 1:
        comm.Allreduce(MPI.IN_PLACE, values, op=op)
    return values


MAX, MIN, SUM = MPI.MAX, MPI.MIN, MPI.SUM


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
                    [gathered, (counts, _displacements(counts)), from_numpy_dtype(local.dtype)])
    whole = np.empty_like(gathered)
    whole[np.argsort(owner, kind="stable")] = gathered  # rank by rank, ascending within each
    return whole


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
                print(f"mpinn: error: {message} (rank {status.Get_source()}); aborting all ranks",
                      file=sys.stderr, flush=True)
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
        print(f"mpinn: error: {message} (rank {self.comm.rank}); aborting all ranks",
              file=sys.stderr, flush=True)
        self.before_abort()
        self.comm.Abort(code)


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
                               [gathered, (counts, _displacements(counts)), mpi_type])
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
"""Gradients summed over the replicas per allreduce, at least (``GradientReducer``)."""


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


def time_gradient_allreduce(comm: MPI.Comm, replicas: int, layer_values: list[int],
                            dtype: np.dtype, repeat: int = 3) -> float:
    """Seconds of one step's gradient sum over ``replicas`` groups of ``comm``, as training
    does it: the ranks owning the same rows (rank modulo the group size) run a
    ``GradientReducer`` over layers of ``layer_values`` values, posted last layer first, then
    wait (``replicas`` > 1). The best of ``repeat``, the slowest rank's (for the cost model's probe).
    Collective over ``comm``."""
    groups = ReplicaGroups(comm, replicas)
    try:
        flat, layers = gradient_buffers(layer_values, dtype)
        reducer = GradientReducer(groups.across, flat, layers)
        best = np.inf
        for attempt in range(repeat + 1):
            comm.Barrier()
            started = time.perf_counter()
            for layer in range(len(layers) - 1, -1, -1):
                reducer.post(layer)
            reducer.wait()
            if attempt:  # the first one warms up
                best = min(best, time.perf_counter() - started)
    finally:
        groups.free()
    worst = np.array([best])
    return float(allreduce(comm, worst, MAX)[0])


def time_alltoall(comm: MPI.Comm, nbytes: int, seconds: float) -> float:
    """Seconds of one Alltoall with ``nbytes`` per rank pair on ``comm``: the best of as many
    runs as fit in about ``seconds``, the slowest rank's (for the cost model's probe)."""
    size = comm.Get_size()
    send = np.ones(size * nbytes, dtype=np.uint8)
    recv = np.empty_like(send)
    comm.Alltoall(send, recv)
    best, start, runs = np.inf, time.perf_counter(), np.zeros(1)
    while True:  # every rank runs as many as rank 0 decides, so none waits on a missing one
        runs[0] = time.perf_counter() - start < seconds
        comm.Bcast(runs, root=0)
        if not runs[0]:
            break
        comm.Barrier()
        started = time.perf_counter()
        comm.Alltoall(send, recv)
        best = min(best, time.perf_counter() - started)
    worst = np.array([best])
    return float(allreduce(comm, worst, MAX)[0])
