"""Which ranks share a node, and which bytes cross between nodes.

What the launchers tell each rank is read without MPI; the MPI tests run on one host in
``make test-mpi`` and on two nodes in tests/system/test_cluster.py.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import scipy.sparse as sp
from mpi4py import MPI

from mpinn import _ranks_on_this_node, _slurm_tasks_on_node
from mpinn.comm import topology
from mpinn.errors import MpinnError
from mpinn.io import schema
from mpinn.model import DistributedModel
from mpinn.partition.traffic import rank_traffic
from tests.mpi.test_engine import CASES, choice, make_files
from tests.reference import Reference


@pytest.mark.parametrize("counts, node, expected", [
    ("4", "0", "4"), ("2(x3),1", "0", "2"), ("2(x3),1", "2", "2"), ("2(x3),1", "3", "1"),
    ("3,1", "1", "1"), ("1,2(x2)", "2", "2"), ("2(x2)", "5", ""),
])
def test_slurm_per_node_counts_are_expanded_for_this_node(counts, node, expected):
    assert _slurm_tasks_on_node(counts, node) == expected


@pytest.mark.parametrize("env, expected", [
    ({"OMPI_COMM_WORLD_LOCAL_SIZE": "3", "SLURM_NTASKS_PER_NODE": "8"}, 3),  # mpirun knows best
    ({"MPI_LOCALNRANKS": "2"}, 2),                                           # MPICH's mpiexec
    # srun with uneven nodes: the job-wide option does not say this node's share
    ({"SLURM_STEP_TASKS_PER_NODE": "2,1", "SLURM_NODEID": "0"}, 2),
    ({"SLURM_STEP_TASKS_PER_NODE": "2,1", "SLURM_NODEID": "1", "SLURM_NTASKS_PER_NODE": "2"}, 1),
    ({"SLURM_NTASKS_PER_NODE": "4"}, 4),
    ({"SLURM_STEP_TASKS_PER_NODE": "x(y", "SLURM_NODEID": "0"}, 1),          # unreadable: 1
    ({}, 1),
])
def test_ranks_on_this_node_come_from_the_launcher(env, expected):
    assert _ranks_on_this_node(env) == expected


def test_bytes_are_split_into_between_and_inside_nodes():
    matrix = np.arange(16, dtype=np.int64).reshape(4, 4)  # the diagonal is never sent
    between, inside = topology.split_by_node(matrix, topology.block_nodes(4, 2))
    assert between == 2 + 3 + 6 + 7 + 8 + 9 + 12 + 13
    assert inside == 1 + 4 + 11 + 14
    assert topology.split_by_node(matrix, topology.block_nodes(4, 4)) == (0, matrix.sum() - 30)
    assert topology.describe_nodes(np.array([0, 0, 0, 1])) == "2 nodes: 3+1 ranks"
    with pytest.raises(MpinnError, match="--ranks-per-node must be at least 1"):
        topology.block_nodes(4, 0)


@pytest.mark.mpi
def test_ranks_share_a_node_exactly_when_they_share_a_host():
    comm = MPI.COMM_WORLD
    node = topology.job_nodes(comm)
    hosts = comm.allgather(MPI.Get_processor_name())
    assert node[0] == 0 and set(node) == set(range(len(set(hosts))))
    for a in range(comm.size):
        for b in range(comm.size):
            assert (node[a] == node[b]) == (hosts[a] == hosts[b])


@pytest.mark.mpi
@pytest.mark.parametrize("case", ["softmax", "sparse", "mixed"])
@pytest.mark.parametrize("strategy", ["balanced", "mincut"])
def test_bytes_between_nodes_are_what_the_plans_send_to_other_nodes(strategy, case, mpi_tmp_path):
    """The node split of the partition report against the exchange plans' own counts, per
    destination: forward activations, and partial sums back from layer 2 on."""
    comm = MPI.COMM_WORLD
    node = topology.job_nodes(comm)
    c = CASES[case]
    model_path, _, _, _ = make_files(mpi_tmp_path, c, "float32", comm)
    with DistributedModel(model_path, comm, choice(strategy, c["sizes"], comm.size), 8) as model:
        with h5py.File(model_path, "r") as f:
            report = rank_traffic(model.spec, model.table, schema.wiring_reader(f, model.spec))
        elsewhere = node != node[comm.rank]
        beside = ~elsewhere
        beside[comm.rank] = False
        sent = np.zeros(2, dtype=np.int64)
        for plan in model.engine.plans:
            back = plan.layer > 1
            for i, where in enumerate((elsewhere, beside)):
                sent[i] += plan.send_counts[where].sum() + back * plan.recv_counts[where].sum()
        owners = [model.table.layer_owner(i) for i in range(len(c["sizes"]))]
    sent *= model.spec.dtype.itemsize
    mine = report.forward_matrix[comm.rank] + report.backward_matrix[comm.rank]
    assert sent.tolist() == [mine[elsewhere].sum(), mine[beside].sum()]
    # and both against the wiring itself: a rank reads, of layer l-1, the columns its rows of
    # layer l name (a dense layer: all of them); what d reads of mine crosses to d forward,
    # and from layer 2 on the partial sums of what I read of d's go back to d
    weights = Reference.from_file(model_path).weights

    def read_by(rank: int, layer: int) -> np.ndarray:
        rows = np.flatnonzero(owners[layer] == rank)
        w = weights[layer - 1]
        if not rows.size:
            return np.zeros(0, dtype=np.int64)
        return np.unique(w[rows].indices) if sp.issparse(w) else np.arange(w.shape[1])

    expected_rank = np.zeros(comm.size, dtype=np.int64)  # values I send to each rank
    for layer in range(1, len(weights) + 1):
        below = owners[layer - 1]
        for d in range(comm.size):
            if d != comm.rank:
                expected_rank[d] += np.count_nonzero(below[read_by(d, layer)] == comm.rank)
                if layer > 1:
                    expected_rank[d] += np.count_nonzero(below[read_by(comm.rank, layer)] == d)
    expected_rank *= model.spec.dtype.itemsize
    assert sent.tolist() == [expected_rank[elsewhere].sum(), expected_rank[beside].sum()]
    expected = [topology.split_by_node(m, node) for m in (report.forward_matrix,
                                                          report.backward_matrix)]
    assert tuple(comm.allreduce(sent)) == tuple(map(sum, zip(*expected, strict=True)))
    comm.Barrier()
