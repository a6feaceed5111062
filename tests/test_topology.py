"""Which ranks share a node: what the launchers tell each rank, read without MPI."""

from __future__ import annotations

import pytest

from mpinn import _ranks_on_this_node, _slurm_tasks_on_node


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
