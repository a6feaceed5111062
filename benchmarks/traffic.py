"""Bytes exchanged per training step: the closed-form volume of docs/scaling.md next to what
the exchange plans actually move, for every strategy at P = 2, 3, 4 (not a test).

    python benchmarks/traffic.py --sizes 784,1024,1024,1024,10 --batch 256
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from train_mlp import child_env  # noqa: E402

from mpinn.partition import strategies  # noqa: E402

STRATEGIES = {
    "balanced": lambda sizes, p: {},
    "percentage": lambda sizes, p: {"percentages": [100 / p] * p},
    "layers": lambda sizes, p: {"layer_ranks": [i % p for i in range(len(sizes))]},
}


def formula(sizes: list[int], owner: np.ndarray, p: int, batch: int, item: int) -> int:
    """V = B s sum_l sum_{d in R_l} (n_{l-1} - o_d(l-1)) * (2 if l >= 2 else 1)

    R_l: ranks owning a neuron of layer l; o_d(l-1): neurons of layer l-1 that rank d owns.
    """
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    total = 0
    for layer in range(1, len(sizes)):
        rows = np.bincount(owner[offsets[layer]:offsets[layer + 1]], minlength=p)
        own_prev = np.bincount(owner[offsets[layer - 1]:offsets[layer]], minlength=p)
        forward = sum(sizes[layer - 1] - own_prev[d] for d in range(p) if rows[d])
        total += forward * (2 if layer >= 2 else 1)
    return total * batch * item


def worker(args: argparse.Namespace) -> None:
    from mpi4py import MPI

    from mpinn.io.datafile import load
    from mpinn.model import DistributedModel
    from mpinn.partition.choice import PartitionChoice

    comm = MPI.COMM_WORLD
    sizes = [int(n) for n in args.sizes.split(",")]
    moved = {}
    for name, params in STRATEGIES.items():
        with DistributedModel(args.model, comm, PartitionChoice(None, name, params(sizes, comm.size)),
                              args.batch) as model:
            data = load(args.data, model.table, model.spec.dtype, comm)
            x, labels, _ = data.batch(np.arange(args.batch))
            model.engine.loss_and_grad(model.engine.forward(x), labels, None)
            model.engine.backward()
            sent = sum(plan.bytes_sent for plan in model.engine.plans)
        moved[name] = comm.allreduce(sent)
    if comm.rank == 0:
        print(json.dumps(moved))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="784,1024,1024,1024,10")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    sizes = [int(n) for n in args.sizes.split(",")]
    env = child_env(threads=1)
    print(f"dense MLP {args.sizes}, batch {args.batch}, float32: bytes exchanged per training "
          "step, all ranks together (forward + backward)")
    print(f"{'P':>2} {'strategy':<11} {'formula MB':>11} {'engine MB':>10} {'equal':>6}")
    with tempfile.TemporaryDirectory(prefix="mpinn-traffic-") as tmp:
        model, data = f"{tmp}/m.h5", f"{tmp}/d.h5"
        for cmd in (["init", model, "--sizes", args.sizes],
                    ["data", "classification", data, "--samples", str(args.batch), "--features",
                     str(sizes[0]), "--outputs", str(sizes[-1])]):
            subprocess.run([sys.executable, "-m", "mpinn", *cmd], check=True, env=env,
                           capture_output=True)
        for p in (2, 3, 4):
            out = subprocess.run(["mpirun", "--oversubscribe", "-n", str(p), sys.executable, __file__,
                                  "--worker", "--model", model, "--data", data, "--sizes", args.sizes,
                                  "--batch", str(args.batch)],
                                 check=True, env=env, capture_output=True, text=True)
            moved = json.loads(out.stdout.strip().splitlines()[-1])
            for name, params in STRATEGIES.items():
                owner = strategies.partition(sizes, p, name, params(sizes, p))
                expect = formula(sizes, owner, p, args.batch, 4)
                print(f"{p:>2} {name:<11} {expect / 1e6:>11.2f} {moved[name] / 1e6:>10.2f} "
                      f"{'yes' if expect == moved[name] else 'NO':>6}")


if __name__ == "__main__":
    main()
