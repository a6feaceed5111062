"""Timing probes of this job's links (all-to-all, gradient allreduce), for the
cost model and the benchmarks."""

from __future__ import annotations

import time

import numpy as np
from mpi4py import MPI

from mpinn.comm.collectives import MAX, allreduce
from mpinn.comm.replicas import GradientReducer, ReplicaGroups, gradient_buffers


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
