"""Node-aware mincut on the simulated cluster: a sparse network whose parts talk in pairs,
trained on 2 nodes x 2 ranks placed by block (ranks 0, 1 on node 1) and cyclically (ranks
0, 2 on node 1, ``mpirun --map-by node``), with mincut made without the nodes (stored by
one process) and in the job (placed on the job's nodes by ``distributor.onto_nodes``).

The network: ``--layers`` CSR layers of ``--width`` neurons in four hidden groups, each
neuron reading ``--fan-in`` inputs, ``--partner-reads`` of them from its partner group
(group g xor 1), as a model with two loosely coupled halves (``tests.helpers.
grouped_network``, the network the tests place). METIS finds the groups; its
recursive bisection numbers partners 2k and 2k + 1, which block placement keeps on one
node and cyclic placement splits. For each link and placement it prints samples/s of the
last of ``--epochs`` training epochs and the values per sample crossing between nodes
(forward, from the partition; backward the same). Not a test: nothing asserted.

    python benchmarks/node_placement.py --links 1gbit,10gbit
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from mpi4py import MPI

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_mlp import ROOT, run  # noqa: E402

sys.path.insert(0, str(ROOT))

from mpinn.comm import topology
from mpinn.io import create, hdf5, schema
from mpinn.partition import strategies  # noqa: E402
from mpinn.partition.metadata import MetadataTable  # noqa: E402
from mpinn.partition.traffic import rank_traffic  # noqa: E402
from tests.helpers import grouped_network  # noqa: E402 - the network the tests place

CLUSTER = Path("/run/mpinn-cluster")
PLACEMENTS = {"block": np.array([0, 0, 1, 1]), "cyclic": np.array([0, 1, 0, 1])}


def between(model: str, owner: np.ndarray, node: np.ndarray) -> int:
    """Values per sample sent forward between nodes, from the partition report."""
    with hdf5.opened(model, "r", MPI.COMM_SELF) as f:
        spec = schema.read_spec(f)
        table = MetadataTable.build(spec.sizes, owner, node.size)
        matrix = rank_traffic(spec, table, schema.wiring_reader(f, spec)).forward_matrix
    return topology.split_by_node(matrix, node)[0] // spec.dtype.itemsize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--fan-in", type=int, default=64)
    parser.add_argument("--partner-reads", type=int, default=16)
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--links", default="1gbit,10gbit")
    args = parser.parse_args()
    width, n = args.width, args.layers
    sizes = [width] * (n + 1)
    layers = grouped_network(sizes, groups=4, fan_in=args.fan_in, seed=1,
                             partner_reads=args.partner_reads)
    for w in layers:  # uniform(-1, 1) / sqrt(fan-in): activations keep their scale
        w.data *= 2 / np.sqrt(args.fan_in)
    wiring = strategies.Wiring([np.diff(w.indptr) for w in layers],
                                lambda i: (layers[i - 1].indptr.astype(np.int64),
                                           layers[i - 1].indices.astype(np.int64)))
    plain = strategies.partition(sizes, 4, "mincut", {}, wiring)
    aware = {name: strategies.partition(sizes, 4, "mincut", {}, wiring, node)
             for name, node in PLACEMENTS.items()}
    with tempfile.TemporaryDirectory(prefix="mpinn-placement-") as tmp:
        model, data = f"{tmp}/pairs.h5", f"{tmp}/data.h5"
        create.write_model(model, sizes, [create.LayerArrays("relu" if i < n - 1 else "identity", w,
                                                       np.zeros(width)) for i, w in
                                       enumerate(layers)], "float32")
        run([sys.executable, "-m", "mpinn", "data", "regression", data, "--samples",
             str(args.samples), "--features", str(width), "--outputs", str(width), "--quiet"], 1)
        run([sys.executable, "-m", "mpinn", "partition", model, "--ranks", "4", "--strategy",
             "mincut", "--name", "plain"], 1)  # one process: the nodes are not known
        print(f"paired sparse network {n} x {width}, fan-in {args.fan_in} ({args.partner_reads} "
              f"from the partner group), batch {args.batch_size}, {args.samples} samples; "
              f"2 nodes x 2 ranks; samples/s of epoch {args.epochs}")
        print(f"  {'link':<8} {'placement':<9} {'mincut':<22} {'values/sample between nodes':>28} "
              f"{'samples/s':>10}")
        for link in args.links.split(","):
            up = subprocess.run(["bash", str(ROOT / "scripts/cluster-up.sh"), "2", link],
                                capture_output=True, text=True)
            if up.returncode != 0:
                raise SystemExit(f"no cluster: {up.stderr.strip()}")
            try:
                for placement, node in PLACEMENTS.items():
                    for name, flags, owner in (
                            ("without the nodes", ["--partition", "plain"], plain),
                            ("in the job (node-aware)", ["--strategy", "mincut"], aware[placement])):
                        fresh = f"{tmp}/run.h5"
                        Path(fresh).write_bytes(Path(model).read_bytes())
                        out = run([str(CLUSTER / "mpirun"), "--host", "10.77.0.1:2,10.77.0.2:2",
                                   "-n", "4", "--map-by", "node" if placement == "cyclic" else "slot",
                                   sys.executable, "-m", "mpinn", "train", fresh, "--data", data,
                                   "--epochs", str(args.epochs), "--batch-size",
                                   str(args.batch_size), "--lr", "0.001", *flags], 1)
                        rate = re.findall(r"samples/s ([\d,]+)", out)[-1]
                        print(f"  {link:<8} {placement:<9} {name:<22} "
                              f"{between(model, owner, node):>28,} {rate:>10}", flush=True)
            finally:
                subprocess.run(["bash", str(ROOT / "scripts/cluster-down.sh")], capture_output=True)


if __name__ == "__main__":
    main()
