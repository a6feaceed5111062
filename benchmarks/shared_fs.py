"""Load, checkpoint and training-step times of one model on two nodes, the model on the nodes'
GlusterFS volume (``/shared``) against this machine's own disk (issue 28).

The nodes are scripts/cluster-up.sh's network namespaces (``--shared-fs gluster``: a storage
node serves the volume, every node mounts it through its own FUSE client, the coherent
settings of docs/filesystems.md), one rank per node, linked at ``--rate``. For each place the
same job runs across the nodes and rank 0 reports, each time the slowest rank's:

* load: ``DistributedModel`` opened and every rank's rows read (parallel HDF5 over MPI-IO);
* step: one training step, an epoch of ``--steps`` batches of ``--batch`` over their count
  (plain SGD; after an untimed first epoch);
* checkpoint: ``save`` (the new file written collectively, synced, checked, renamed, reopened).

The ceiling printed beside load and checkpoint is the model's bytes over the node's link
(every node reads or writes its half through it). Not a test: nothing asserted. Needs root.

    python benchmarks/shared_fs.py --sizes 784,4096,4096,4096,10 --rate 1gbit --repeat 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_mlp import ROOT, run, run_json  # noqa: E402

CLUSTER = Path(os.environ.get("MPINN_CLUSTER_DIR", "/run/mpinn-cluster"))
SHARED = Path("/shared")
RATES = {"gbit": 1e9, "mbit": 1e6, "kbit": 1e3}


def ranks(model: str, data: str, batch: int, steps: int) -> None:
    """One rank's part (run by mpirun across the nodes): rank 0 prints the figures as JSON."""
    from mpi4py import MPI

    from mpinn.config import TrainConfig
    from mpinn.io import datafile
    from mpinn.model import DistributedModel
    from mpinn.partition.choice import PartitionChoice
    from mpinn.train import train

    comm = MPI.COMM_WORLD

    def slowest(started: float) -> float:
        return comm.allreduce(time.perf_counter() - started, op=MPI.MAX)

    comm.Barrier()
    started = time.perf_counter()
    net = DistributedModel(model, comm, PartitionChoice(), batch)
    load = slowest(started)
    local = datafile.load(data, net.table, net.spec.dtype, comm, net.group)
    config = TrainConfig(epochs=1, batch_size=batch, lr=1e-4, shuffle=False)
    train(net, local, config)  # the first epoch allocates the engine's buffers: not timed
    comm.Barrier()
    started = time.perf_counter()
    train(net, local, config)
    step = slowest(started) / steps
    comm.Barrier()
    started = time.perf_counter()
    net.save()
    save = slowest(started)
    net.close()
    if comm.rank == 0:
        print(json.dumps({"load": load, "step": step, "checkpoint": save}))


def across(nodes: int, *args: str) -> dict[str, float]:
    """This script's rank part on ``nodes`` nodes, one rank and one BLAS thread each."""
    return run_json([str(CLUSTER / "mpirun"), "-n", str(nodes), "--npernode", "1",
                     sys.executable, __file__, "--ranks", *args], threads=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="784,4096,4096,4096,10")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--rate", default="1gbit", help="each node's link (tc rate), or unlimited")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=2, help="runs per place; the best is shown")
    parser.add_argument("--keep-cluster", action="store_true", help="leave the nodes up")
    parser.add_argument("--ranks", nargs=4, metavar=("MODEL", "DATA", "BATCH", "STEPS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ranks:
        model, data, batch, steps = args.ranks
        ranks(model, data, int(batch), int(steps))
        return
    up = subprocess.run(["bash", str(ROOT / "scripts/cluster-up.sh"), str(args.nodes), args.rate,
                         "--shared-fs", "gluster"], capture_output=True, text=True)
    if up.returncode:
        sys.exit(f"shared_fs: {up.stderr.strip()}")
    sizes = [int(s) for s in args.sizes.split(",")]
    nbytes = 4 * sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:], strict=True))
    places = {"/shared (GlusterFS)": Path(tempfile.mkdtemp(dir=SHARED)),
              "local disk": Path(tempfile.mkdtemp())}
    try:
        for where in places.values():
            run([sys.executable, "-m", "mpinn", "data", "classification", str(where / "data.h5"),
                 "--samples", str(args.batch * args.steps), "--features", str(sizes[0]),
                 "--outputs", str(sizes[-1]), "--seed", "1"], threads=1)
            run([sys.executable, "-m", "mpinn", "init", str(where / "model.h5"), "--sizes",
                 args.sizes, "--seed", "1"], threads=1)
        figures = {name: [] for name in places}
        for _ in range(args.repeat):
            for name, where in places.items():
                figures[name].append(across(args.nodes, str(where / "model.h5"),
                                            str(where / "data.h5"), str(args.batch),
                                            str(args.steps)))
    finally:
        for where in places.values():
            shutil.rmtree(where, ignore_errors=True)
        if not args.keep_cluster:
            subprocess.run(["bash", str(ROOT / "scripts/cluster-down.sh")])
    link = next((float(args.rate[: -len(u)]) * f for u, f in RATES.items()
                 if args.rate.endswith(u)), None)
    per_node = nbytes / args.nodes
    print(f"model {args.sizes}: {nbytes / 2**20:.0f} MiB float32, {args.nodes} nodes x 1 rank, "
          f"links {args.rate}, batch {args.batch}; best of {args.repeat}")
    ceiling = f"{per_node * 8 / link:.2f}" if link else "-"
    print(f"{'model on':<22}{'load s':>8}{'checkpoint s':>14}{'step s':>8}"
          f"   ceiling (its half over the link) {ceiling} s")
    for name, runs in figures.items():
        best = {key: min(run[key] for run in runs) for key in runs[0]}
        print(f"{name:<22}{best['load']:>8.2f}{best['checkpoint']:>14.2f}{best['step']:>8.3f}")
    print("runs:", json.dumps(figures))


if __name__ == "__main__":
    main()
