"""The exchange plans of a model: one plan per layer, of the kind ``--exchange`` asks for.

``PLANS`` maps each kind to its class; ``make_plans`` builds the Alltoallv plan of every
layer (the counts and the receive order every kind shares), then each kind's class from it,
every rank alike. A new kind is a class with ``build`` and a line in ``PLANS``
(docs/architecture.md).
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

from mpinn.comm.collectives import MIN, allreduce
from mpinn.comm.node import NodeForwardPlan, NodePlan
from mpinn.comm.plans import ExchangePlan, GatherPlan, Job, NeighborPlan, ReduceScatterPlan
from mpinn.comm.topology import job_nodes
from mpinn.config import EXCHANGES
from mpinn.errors import MpinnError
from mpinn.partition.metadata import MetadataTable

PLANS: dict[str, type[ExchangePlan]] = {
    "alltoallv": ExchangePlan, "allgather": GatherPlan, "collective": ReduceScatterPlan,
    "neighbor": NeighborPlan, "node": NodePlan, "node-forward": NodeForwardPlan}
if EXCHANGES[1:] != tuple(PLANS):
    raise ImportError("config.EXCHANGES and comm.exchange.PLANS name different kinds")
NODE_KINDS = ("node", "node-forward")

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
    job = Job(comm, node)
    return [PLANS[auto_kind(bool(dense), comm.size) if exchange == "auto" else exchange]
            .build(plan, bool(dense), job) for plan, dense in zip(plans, whole, strict=True)]


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



"""Gradients summed over the replicas per allreduce, at least (``GradientReducer``)."""
