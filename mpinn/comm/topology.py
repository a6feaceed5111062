"""Which node each rank runs on, and how much of a partition's traffic crosses between nodes.

Ranks on one node exchange through shared memory; ranks on different nodes through the
network, at a fraction of that bandwidth. The node of every rank is asked of MPI once per
job (``MPI_Comm_split_type(COMM_TYPE_SHARED)``: the ranks that can share memory), or laid
out as the launchers place ranks by default (consecutive blocks) for a job not running yet.
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

from mpinn.errors import MpinnError


def job_nodes(comm: MPI.Comm) -> np.ndarray:
    """The node index of every rank of ``comm``, nodes numbered by their lowest rank
    (collective, a setup-time query: call it once and keep the result)."""
    shared = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.rank)
    try:
        leader = shared.allreduce(comm.rank, op=MPI.MIN)
    finally:
        shared.Free()
    _, node = np.unique(np.array(comm.allgather(leader)), return_inverse=True)
    return node.astype(np.int64)


def block_nodes(nranks: int, ranks_per_node: int) -> np.ndarray:
    """Ranks 0..k-1 on node 0, k..2k-1 on node 1, ...: mpirun's and srun's default placement."""
    if ranks_per_node < 1:
        raise MpinnError(f"--ranks-per-node must be at least 1, got {ranks_per_node}")
    return np.arange(nranks, dtype=np.int64) // ranks_per_node


def split_by_node(matrix: np.ndarray, node: np.ndarray) -> tuple[int, int]:
    """Bytes of a (sender, receiver) matrix that cross between nodes, and those that stay
    inside one (a rank's bytes to itself are never sent and count in neither)."""
    between = node[:, None] != node[None, :]
    inside = ~between
    np.fill_diagonal(inside, False)
    return int(matrix[between].sum()), int(matrix[inside].sum())


def describe_nodes(node: np.ndarray) -> str:
    """``2 nodes: 2+2 ranks`` (ranks per node, in node order)."""
    counts = np.bincount(node)
    return f"{counts.size} node{'s' if counts.size != 1 else ''}: " \
           f"{'+'.join(str(c) for c in counts)} ranks"
