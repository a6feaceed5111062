"""The two-level exchange across nodes (kinds ``node`` and ``node-forward``): each value
crosses between a pair of nodes once, to a proxy rank there that forwards it inside its
node; backward, ``node`` also sums the partial sums inside the reading node first.

Halves the bytes between nodes of a layer every rank reads whole, which pays on a slow link
(docs/scaling.md, "Two-level exchange across nodes"); ``make_plans`` builds it from an
Alltoallv plan's counts where the job spans nodes.
"""

from __future__ import annotations

import time

import numpy as np
from mpi4py import MPI

from mpinn.comm.collectives import displacements
from mpinn.comm.plans import ExchangePlan, Job
from mpinn.errors import MpinnError
from mpinn.kernels import csr_matmul


class NodePlan(ExchangePlan):
    """Kind ``node``: two levels forward, and backward the partial sums summed inside the
    reading node before they cross (equal to the Alltoallv's within rounding)."""

    kind = "node"
    sum_inside = True

    @classmethod
    def build(cls, base: ExchangePlan, dense: bool, job: Job) -> ExchangePlan:
        """Only where the job spans nodes; the node communicator is made once per job."""
        if job.node.max() == 0:
            return base
        return cls(base, job.node, job.nodes_comm())

    def __init__(self, base: ExchangePlan, node: np.ndarray, node_comm: MPI.Comm) -> None:
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
        ``sum_inside`` (``NodeForwardPlan``) backward is the Alltoallv's: the partial sums
        of a remote node cross once per reading rank, and the results are bitwise the
        Alltoallv's (summing inside the node first changes the order of the additions).

        Relay rows: [0, R1) phase 1's arrivals by source rank; [R1, R1 + S2) phase 2's send
        (backward: its receive); then R2 rows of phase 2's arrivals by proxy; then R1 rows
        for backward's sums per relayed value.
        """
        self.__dict__.update(vars(base))
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
        self.across_send_displs = displacements(self.across_send_counts)
        across_ids = np.concatenate(across)
        self.across_send_index = self.table.local_index(layer - 1, across_ids)
        self.across_self = slice(self.across_send_displs[rank],
                                 self.across_send_displs[rank] + self.across_send_counts[rank])
        self.across_mpi_send_counts = self.across_send_counts.copy()
        self.across_mpi_send_counts[rank] = 0
        self.across_recv_counts = np.zeros(size, dtype=np.int64)
        comm.Alltoall(self.across_mpi_send_counts, self.across_recv_counts)
        self.across_recv_displs = displacements(self.across_recv_counts)
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
        self.inside_recv_displs = displacements(self.inside_recv_counts)
        self.inside_send_counts = np.zeros(node_comm.size, dtype=np.int64)
        node_comm.Alltoall(self.inside_recv_counts, self.inside_send_counts)
        self.inside_send_displs = displacements(self.inside_send_counts)
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
        sum_inside = self.sum_inside
        self.relay_rows = 2 * r1 + s2 + r2 if sum_inside else r1 + s2 + r2
        n_across = int(self.across_send_counts.sum())
        self.send_rows = max(self.send_rows, n_across)  # phase 1's send; backward's receive
        if not sum_inside:
            self._allocate()
            return
        # backward at the proxy: per relayed value, its own partial then its node's, in order
        import scipy.sparse as sp  # here, not at import: most processes build no plan

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

    def _relay(self, rows: slice, batch: int) -> np.ndarray:
        return self.relay_buffer[rows.start * batch: rows.stop * batch].reshape(-1, batch)

    def _across_send(self, batch: int) -> np.ndarray:
        rows = int(self.across_send_counts.sum())
        return self.send_buffer[: rows * batch].reshape(rows, batch)

    def values_between_nodes(self, node: np.ndarray) -> int:
        return int(self.across_send_counts[node != node[self.comm.rank]].sum())

    def start_forward(self, local: np.ndarray) -> np.ndarray:
        """Phase 1: pack for my node's readers and the other nodes' proxies, and post."""
        self._direction = "forward"
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

    def finish_forward(self) -> None:
        """Wait for phase 1; phase 2: proxies forward inside their node, then the relay goes
        to receive order."""
        self._wait()
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

    def start_backward(self, partial: np.ndarray) -> None:
        """Backward phase 2 reversed (to the proxies, summed there), then phase 1 reversed
        posted (one partial per value and node pair, to the owners). Kind ``node-forward``
        sends the partial sums back as the Alltoallv does."""
        if not self.sum_inside:
            super().start_backward(partial)
            return
        self._direction = "backward"
        batch = self._batch = partial.shape[1]
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

    def finish_backward(self, partial: np.ndarray) -> np.ndarray:
        """Wait for phase 1 reversed, then sum per owned neuron (like the Alltoallv's)."""
        if not self.sum_inside:
            return super().finish_backward(partial)
        self._wait()
        send = self._across_send(self._batch)
        started = time.perf_counter()
        send[self.across_self] = partial[self.self_recv]
        summed = self.sum_buffer[: self.n_local * self._batch].reshape(self.n_local, self._batch)
        acc = self.across_accumulate
        csr_matmul(acc.indptr, acc.indices, acc.data, acc.shape[1], send, summed)
        self._packed(started)
        return summed


class NodeForwardPlan(NodePlan):
    """Kind ``node-forward``: ``node``'s forward, the Alltoallv's backward (bitwise its
    results)."""

    kind = "node-forward"
    sum_inside = False
