"""Who sends what to whom, from the metadata table alone (pure: no MPI).

The receive order of a rank's gathered inputs, and the values each rank
sends and receives per layer: the exchange plans build on it, and
``mpinn inspect`` / ``partition --compare`` report it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mpinn.errors import MpinnError
from mpinn.io import schema
from mpinn.partition.metadata import MetadataTable


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

LayerEdges = Callable[[int], tuple[np.ndarray, np.ndarray] | None]


@dataclass(frozen=True)
class RankTraffic:
    """Per-rank figures of one partition; bytes are per sample."""

    neurons: np.ndarray
    parameters: np.ndarray
    local_inputs: np.ndarray
    remote_inputs: np.ndarray
    forward_send: np.ndarray
    forward_recv: np.ndarray
    backward_send: np.ndarray
    backward_recv: np.ndarray
    layer_nnz: np.ndarray  # (layers, ranks): stored weights of each rank's rows
    local_edges: int = 0   # connections whose input lives on the reading rank
    edges: int = 0
    forward_matrix: np.ndarray | None = None  # (ranks, ranks) bytes per sample, sender -> receiver
    backward_matrix: np.ndarray | None = None  # the same for the partial sums sent back

    @property
    def imbalance(self) -> float:
        """Compute imbalance: the engine waits for the slowest rank at every layer, so this
        is sum over layers of max-rank nnz over sum of mean-rank nnz (1.0 = perfect)."""
        mean = self.layer_nnz.mean(axis=1).sum()
        return float(self.layer_nnz.max(axis=1).sum() / mean) if mean else 1.0

    @property
    def local_fraction(self) -> float:
        return self.local_edges / self.edges if self.edges else 1.0


def sparse_traffic(table: MetadataTable, layer: int, indptr: np.ndarray,
                   indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """For a CSR layer: inputs sent from rank s to rank d per sample, the stored weights per
    rank and the connections that stay on one rank.

    A rank receives each remote input its rows name once, however many rows name it: the
    (remote input, reading rank) pairs, the rule ExchangePlan follows.
    """
    p = table.nranks
    reader = table.layer_owner(layer)[np.repeat(np.arange(indptr.size - 1), np.diff(indptr))]
    source = table.layer_owner(layer - 1)
    pairs = np.unique(indices * p + reader)
    traffic = np.zeros((p, p), dtype=np.int64)
    np.add.at(traffic, (source[pairs // p], pairs % p), 1)
    local_edges = int(np.count_nonzero(source[indices] == reader))
    return traffic, np.bincount(reader, minlength=p), local_edges


def rank_traffic(spec: schema.ModelSpec, table: MetadataTable,
                 layer_edges: LayerEdges | None = None) -> RankTraffic:
    """Neurons, parameters, inputs read and bytes moved by each rank for one sample.

    CSR layers need ``layer_edges`` (layer -> (indptr, indices)), read a layer at a time.
    """
    p = table.nranks
    item = spec.dtype.itemsize
    neurons = sum(table.counts(layer) for layer in range(len(table.sizes)))
    parameters = np.zeros(p, dtype=np.int64)
    local = np.zeros(p, dtype=np.int64)
    fwd_send = np.zeros(p, dtype=np.int64)
    fwd_recv = np.zeros(p, dtype=np.int64)
    bwd_send = np.zeros(p, dtype=np.int64)
    bwd_recv = np.zeros(p, dtype=np.int64)
    remote = np.zeros(p, dtype=np.int64)
    layer_nnz = np.zeros((len(spec.layers), p), dtype=np.int64)
    local_edges = edges = 0
    matrix = np.zeros((p, p), dtype=np.int64)
    back = np.zeros((p, p), dtype=np.int64)
    for ly in spec.layers:
        rows = table.counts(ly.index)
        own_prev = table.counts(ly.index - 1)
        if ly.sparse:
            if layer_edges is None or (wiring := layer_edges(ly.index)) is None:
                raise MpinnError(f"layer {ly.index} is sparse: its traffic needs its wiring")
            traffic, nnz, on_rank = sparse_traffic(table, ly.index, *wiring)
            local += np.diag(traffic)  # inputs a rank's rows name that it owns itself
            np.fill_diagonal(traffic, 0)
            remote += traffic.sum(axis=0)
        else:
            reads = rows > 0
            nnz = rows * ly.n_in
            on_rank = int((rows * own_prev).sum())
            local += np.where(reads, own_prev, 0)
            remote += np.where(reads, ly.n_in - own_prev, 0)
            traffic = dense_traffic(table, ly.index)
        layer_nnz[ly.index - 1] = nnz
        parameters += nnz + rows
        local_edges += on_rank
        edges += ly.nnz
        matrix += traffic * item
        fwd_send += traffic.sum(axis=1) * item
        fwd_recv += traffic.sum(axis=0) * item
        if ly.index > 1:  # input features get no gradient, so layer 1 sends nothing back
            bwd_send += traffic.sum(axis=0) * item
            bwd_recv += traffic.sum(axis=1) * item
            back += traffic.T * item
    return RankTraffic(neurons, parameters, local, remote, fwd_send, fwd_recv, bwd_send, bwd_recv,
                       layer_nnz, local_edges, edges, matrix, back)
