"""``Network.fit`` on in-memory arrays next to ``mpinn train`` on a data file (not a test).

Run under mpirun; both train the same model on the same samples, alternating, and each
epoch's time comes from its own samples/s. The figure to read: fit's seconds per epoch
next to its ceiling, train's (the command line's path: ``data.load`` + ``train.train``),
and the one-time cost of getting the data in (reading the file vs copying the columns).

    mpirun -n 2 python benchmarks/fit_arrays.py --sizes 256,1024,1024,10 --samples 20000
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mpi4py import MPI  # noqa: E402

import mpinn  # noqa: E402
from mpinn import train
from mpinn.config import TrainConfig
from mpinn.io import datafile  # noqa: E402
from mpinn.io.datafile import from_arrays, load, synthetic_classification  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="256,1024,1024,10")
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the files go (default: a temp dir)")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    sizes = [int(s) for s in args.sizes.split(",")]
    where = comm.bcast(args.dir or tempfile.mkdtemp(prefix="mpinn-fit-") if comm.rank == 0
                       else None)
    x, y = synthetic_classification(args.samples, sizes[0], sizes[-1], seed=0)
    data = os.path.join(where, "data.h5")
    if comm.rank == 0:
        datafile.write_data(data, x, y)
    comm.Barrier()
    options = dict(epochs=args.epochs, batch_size=args.batch, lr=0.01, seed=1)
    per_epoch: dict[str, list[float]] = {"train on a file": [], "fit on arrays": []}
    intake: dict[str, list[float]] = {"train on a file": [], "fit on arrays": []}
    for repeat in range(args.repeats):
        for name in per_epoch:
            path = os.path.join(where, f"model{repeat}-{name[:3]}.h5")
            mpinn.Network.create(path, sizes, seed=2, force=True)
            with mpinn.Network.open(path) as net:
                model = net.model
                comm.Barrier()
                started = time.perf_counter()
                if name == "train on a file":
                    local = load(data, model.table, model.spec.dtype, comm)
                    intake[name].append(time.perf_counter() - started)
                    result = train.train(model, local, TrainConfig(optimizer="sgd", **options))
                    rates = [s.samples_per_second for s in result.history]
                else:
                    local = from_arrays(x, y, model.table, model.spec.dtype, comm)
                    intake[name].append(time.perf_counter() - started)
                    history = net.fit(x, y, optimizer="sgd", **options)
                    rates = history["samples_per_second"]
            per_epoch[name] += [args.samples / r for r in rates]
    if comm.rank == 0:
        print(f"{comm.size} ranks, sizes {args.sizes}, {args.samples} samples, batch {args.batch}, "
              f"{args.epochs} epochs x {args.repeats} repeats (rank 0's timings, median)")
        ceiling = statistics.median(per_epoch["train on a file"])
        for name, times in per_epoch.items():
            print(f"  {name:16s} {statistics.median(times):8.3f} s/epoch  "
                  f"(data in: {statistics.median(intake[name]):.3f} s once)")
        ratio = statistics.median(per_epoch["fit on arrays"]) / ceiling
        print(f"  fit / train per epoch: {ratio:.3f} (ceiling: 1.0, the file path's own time)")


if __name__ == "__main__":
    main()
