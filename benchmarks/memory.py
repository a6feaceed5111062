"""Peak memory per rank next to model size / P: no rank ever holds the whole model.

Creates a dense model of at least 2 GB (float32) with ``mpirun -n P mpinn init`` (ranks write
blocks of rows in parallel), then loads it on P ranks and trains a few steps. Each rank
reports its peak RSS; the ideal is its share of the weights (and of the gradients and
optimizer state where the optimizer needs them) plus batch-sized buffers and the Python/MPI
runtime.

    python benchmarks/memory.py --ranks 4 --sizes 1024,16384,16384,16384,10
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_mlp import child_env  # noqa: E402


def worker(args: argparse.Namespace) -> None:
    from mpi4py import MPI

    from mpinn.config import TrainConfig
    from mpinn.io import hdf5
    from mpinn.io.datafile import load
    from mpinn.model import DistributedModel
    from mpinn.partition.choice import PartitionChoice
    from mpinn.train import train

    comm = MPI.COMM_WORLD
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    with DistributedModel(args.model, comm, PartitionChoice(), args.batch) as model:
        load_seconds = time.perf_counter() - start
        read = sum(hdf5.READ_STATS.values()) * model.spec.dtype.itemsize
        data = load(args.data, model.table, model.spec.dtype, comm)
        started = time.perf_counter()
        train(model, data, TrainConfig(epochs=1, batch_size=args.batch, lr=1e-4, shuffle=False))
        train_seconds = time.perf_counter() - started
        shard = model.shard.nbytes
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rows = comm.gather({"peak": peak, "runtime": baseline, "shard": shard, "read": read,
                        "load_s": load_seconds, "train_s": train_seconds}, root=0)
    if comm.rank == 0:
        print(json.dumps(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--sizes", default="1024,16384,16384,16384,10")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    env = child_env(threads=1)
    mpirun = ["mpirun", "--oversubscribe", "-n", str(args.ranks)]
    sizes = [int(n) for n in args.sizes.split(",")]
    params = sum(a * b + b for a, b in zip(sizes, sizes[1:], strict=False))
    model_bytes = params * 4
    with tempfile.TemporaryDirectory(prefix="mpinn-mem-", dir=os.environ.get("TMPDIR", "/tmp")) as tmp:
        model, data = f"{tmp}/model.h5", f"{tmp}/data.h5"
        started = time.perf_counter()
        subprocess.run([*mpirun, sys.executable, "-m", "mpinn", "init", model, "--sizes", args.sizes],
                       check=True, env=env, capture_output=True)
        init_seconds = time.perf_counter() - started
        subprocess.run([sys.executable, "-m", "mpinn", "data", "classification", data, "--samples",
                        str(args.batch * args.steps), "--features", str(sizes[0]),
                        "--outputs", str(sizes[-1])], check=True, env=env, capture_output=True)
        out = subprocess.run([*mpirun, sys.executable, __file__, "--worker", "--model", model,
                              "--data", data, "--batch", str(args.batch)],
                             check=True, env=env, capture_output=True, text=True)
        rows = json.loads(out.stdout.strip().splitlines()[-1])
    gib = 2**30
    print(f"dense model {args.sizes}: {params / 1e6:.0f} M parameters, {model_bytes / gib:.2f} GiB "
          f"(float32); init on {args.ranks} ranks in {init_seconds:.1f} s")
    print(f"model / P = {model_bytes / args.ranks / gib:.2f} GiB\n")
    print(f"{'rank':>4} {'rows held':>10} {'read from file':>15} {'peak RSS':>9} {'runtime RSS':>12} "
          f"{'peak/(model/P)':>15} {'load s':>7} {'train s':>8}")
    for r, row in enumerate(rows):
        print(f"{r:>4} {row['shard'] / gib:>9.2f}G {row['read'] / gib:>14.2f}G "
              f"{row['peak'] / gib:>8.2f}G {row['runtime'] / gib:>11.2f}G "
              f"{row['peak'] / (model_bytes / args.ranks):>15.2f} {row['load_s']:>7.1f} "
              f"{row['train_s']:>8.1f}")
    print("\npeak RSS = the rank's rows + batch buffers + the Python/MPI runtime (plain SGD, as "
          "here, steps inside the weight-gradient GEMMs and never touches the gradient buffers; "
          "momentum, Adam or replicas add their size again, and the optimizer state); column "
          "reorders at load and save work in place, a block of rows at a time. No rank ever "
          "holds the whole model.")


if __name__ == "__main__":
    main()
