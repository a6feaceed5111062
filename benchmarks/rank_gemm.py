"""Each rank's GEMM rate at once, at the shapes a rank of a balanced Q-way dense layer computes.

A step waits on its slowest rank: where the ranks compute equal rows at unequal speed, the
spread comes from the cores or from the code. This times, on every rank at the same time,
the three GEMMs of one hidden layer's step as mpinn's engine shapes them (forward
``W_mine @ X``, input gradient ``W_mineᵀ @ dZ``, weight step ``W_mine -= lr dZ Xᵀ``), and the
square 4096 x 4096 @ 4096 x batch GEMM that train_mlp calls the peak, and prints each rank's
rate, repeated, so the ranks that are slow in plain BLAS show as slow in every round.

    mpirun -n 16 python benchmarks/rank_gemm.py [--width 4096] [--batch 256] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mpinn import kernels  # noqa: E402


def rate(work, flops: float, seconds: float) -> float:
    """GFLOP/s of ``work`` repeated for ``seconds``, after one call to warm up."""
    work()
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        work()
        reps += 1
    return flops * reps / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    n, b = args.width, args.batch
    rows = n // comm.size
    rng = np.random.default_rng(comm.rank)
    w = rng.random((rows, n), dtype=np.float32)
    x = rng.random((n, b), dtype=np.float32)
    dz = rng.random((rows, b), dtype=np.float32)
    big = rng.random((n, n), dtype=np.float32)

    def layer() -> None:
        w @ x
        w.T @ dz
        kernels.dense_sgd_update(dz, x, w, 1e-9)

    tests = {f"layer rows {rows}": (layer, 3 * 2.0 * rows * n * b),
             f"{n}x{n} @ {n}x{b}": (lambda: big @ x, 2.0 * n * n * b)}
    if comm.rank == 0:
        print(f"{comm.size} ranks at once, float32, GFLOP/s per rank, {args.rounds} rounds")
    for name, (work, flops) in tests.items():
        for r in range(args.rounds):
            comm.Barrier()
            rates = comm.gather(rate(work, flops, args.seconds))
            if comm.rank == 0:
                slow = sorted(range(comm.size), key=rates.__getitem__)[:3]
                print(f"{name:>24} round {r}: min {min(rates):6.1f} median "
                      f"{statistics.median(rates):6.1f} max {max(rates):6.1f} sum "
                      f"{sum(rates):7.1f}; slowest ranks {slow}: "
                      + " ".join(f"{v:.0f}" for v in rates), flush=True)


if __name__ == "__main__":
    main()
