"""Opening a model with ``--replicas R``: every group reading its rows from the file against
group 0 reading and broadcasting them to the other groups (not a test: nothing is asserted).

One ``mpirun`` opens the same model file ``--repeat`` times with each way, alternating, and
prints the slowest rank's time to open it (``DistributedModel``: spec, partition, the
shard's read or broadcast, the plans) per way, best and median, and for the broadcast its
floor: a whole copy of the model out of group 0's node over the link (``--link-gbit``).
``--cluster`` runs across the nodes of scripts/cluster-up.sh (``$MPINN_CLUSTER_DIR/mpirun``,
``--npernode`` ranks per node, so with R x Q and Q ranks per node each group is one node);
bring the cluster up (and down) around it yourself. After the first open the file is read
through the page cache both ways, as a file on a shared filesystem read recently is.

    python benchmarks/replica_load.py --ranks 4 --replicas 2 --sizes 784,4096,4096,4096,10
    python benchmarks/replica_load.py --ranks 4 --replicas 2 --cluster --npernode 2 --link-gbit 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cluster import CLUSTER  # noqa: E402
from train_mlp import run, run_json  # noqa: E402

WAYS = ("read", "bcast")


def worker(args: argparse.Namespace) -> None:
    """Open the model ``repeat`` times each way, alternating; rank 0 prints the times."""
    from mpi4py import MPI

    from mpinn.model import DistributedModel
    from mpinn.partition.choice import PartitionChoice

    comm = MPI.COMM_WORLD
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    for _ in range(args.repeat):
        for way in WAYS:
            comm.Barrier()
            started = time.perf_counter()
            with DistributedModel(args.model, comm, PartitionChoice(), args.batch, training=False,
                                  replicas=args.replicas, replica_load=way):
                seconds = comm.allreduce(time.perf_counter() - started, op=MPI.MAX)
            times[way].append(seconds)
    if comm.rank == 0:
        print(json.dumps(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="784,4096,4096,4096,10")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--cluster", action="store_true",
                        help="across the nodes of scripts/cluster-up.sh (already up)")
    parser.add_argument("--npernode", type=int, default=2)
    parser.add_argument("--link-gbit", type=float, default=0.0,
                        help="the link between nodes, for the broadcast's ceiling")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    sizes = [int(n) for n in args.sizes.split(",")]
    itemsize = 4 if args.dtype == "float32" else 8
    nbytes = sum(a * b + b for a, b in zip(sizes, sizes[1:], strict=False)) * itemsize
    me = [sys.executable, str(Path(__file__).resolve())]
    with tempfile.TemporaryDirectory(prefix="mpinn-load-", dir="/tmp") as tmp:
        model = f"{tmp}/model.h5"
        run([sys.executable, "-m", "mpinn", "init", model, "--sizes", args.sizes, "--dtype",
             args.dtype], 1)
        if args.cluster:
            launch = [str(CLUSTER / "mpirun"), "-n", str(args.ranks), "--npernode",
                      str(args.npernode)]
        else:
            launch = ["mpirun", "--oversubscribe", "-n", str(args.ranks)]
        times = run_json([*launch, *me, "--worker", "--model", model, "--replicas",
                          str(args.replicas), "--batch", str(args.batch), "--repeat",
                          str(args.repeat)], 1)
    where = (f"{args.ranks // args.npernode} nodes x {args.npernode} ranks" if args.cluster
             else f"one host, {args.ranks} ranks")
    print(f"model {args.sizes} {args.dtype}, {nbytes / 2**20:.0f} MiB; {where}; R = "
          f"{args.replicas} x Q = {args.ranks // args.replicas}; open time, slowest rank, "
          f"{args.repeat} opens each way, alternating")
    for way in WAYS:
        best, median = min(times[way]), statistics.median(times[way])
        ceiling = ""
        if way == "bcast" and args.link_gbit:  # every other group receives a whole copy
            ceiling = (f"  (floor: group 0's copy, {nbytes / 2**20:.0f} MiB, out of its node "
                       f"over {args.link_gbit:g} Gbit/s: {nbytes * 8 / args.link_gbit / 1e9:.2f} s "
                       "per other group, after group 0's read)")
        print(f"  {way:<6} best {best:7.3f} s  median {median:7.3f} s{ceiling}")


if __name__ == "__main__":
    main()
