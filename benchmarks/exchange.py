"""Each kind of exchange side by side: Alltoallv, the collective pair, the neighbourhood
Alltoallv, and what ``auto`` picks, on one host and across simulated nodes (not a test).

Two workloads, each timed inside one ``mpirun`` with every kind's engine built up front and
the kinds taking turns round by round (their order rotating), so that load from other
processes falls on all of them alike:
  * dense: training steps (forward, loss, backward; no optimizer) of an MLP, e.g.
    784-1024-1024-1024-10 at batch 256: the forward of each layer is an allgather, its
    backward a reduce-scatter under ``collective``;
  * sparse: Sparse DNN inference (RadiX-Net, ``bench sparse-dnn``'s network), whose layers
    are CSR and never take the collective pair.
For every setup it prints the best and the median seconds per round of each kind, the
share of that spent waiting for messages, and the speed-up over Alltoallv (best / best).
Setups: ``host:P`` (P ranks on one host, shared memory) and ``nodes:RATE`` (2 nodes x 2
ranks of scripts/cluster-up.sh, links at RATE; needs root). The ceiling of a kind is the
same bytes moved: every kind sends exactly the bytes of the partition report, except
the node kinds, which send each value to a remote node once; ``x-node/s`` is the values per
sample that cross between nodes (all ranks and layers, forward; backward the same).

    python benchmarks/exchange.py --setups host:2,host:4,nodes:1gbit,nodes:10gbit
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_mlp import ROOT, run, run_json  # noqa: E402

CLUSTER = Path(os.environ.get("MPINN_CLUSTER_DIR", "/run/mpinn-cluster"))
KINDS = ("alltoallv", "collective", "neighbor", "node", "node-forward", "auto")


# ------------------------------------------------------------------ worker (under mpirun)


def worker(args: argparse.Namespace) -> None:
    import numpy as np
    from mpi4py import MPI

    from mpinn.comm.collectives import MAX, allreduce
    from mpinn.comm.topology import job_nodes
    from mpinn.io import hdf5
    from mpinn.io.datafile import load
    from mpinn.model import DistributedModel
    from mpinn.partition.choice import PartitionChoice
    from mpinn.tools import graphchallenge

    comm = MPI.COMM_WORLD
    kinds = args.kinds.split(",")
    training = args.workload == "dense"
    choice = PartitionChoice(args.partition, args.strategy, {})  # a stored one: METIS once
    models = {k: DistributedModel(args.model, comm, choice, args.batch, training=training,
                                  exchange=k) for k in kinds}
    data = load(args.data, models[kinds[0]].table, models[kinds[0]].spec.dtype, comm)
    truth = None
    if not training:
        with hdf5.opened(args.data, "r", MPI.COMM_SELF) as f:
            truth = graphchallenge._truth(f, args.data)
    n = data.n_samples if not training else args.batch * args.steps
    features = np.empty((data.features.shape[0], args.batch), dtype=data.features.dtype)

    def one_round(model: DistributedModel) -> tuple[float, float, bool]:
        engine = model.engine
        waited = sum(p.seconds_wait for p in engine.plans)
        alive = np.zeros(data.n_samples, dtype=np.int64)
        comm.Barrier()
        started = time.perf_counter()
        for first in range(0, n, args.batch):
            index = np.arange(first, first + args.batch) % data.n_samples
            if not training:
                index = index[index >= first]
            x, labels, targets = data.batch(index, features[:, : index.size])
            outputs = engine.forward(x)
            if training:
                engine.loss_and_grad(outputs, labels, targets)
                engine.backward()
            elif outputs.shape[0]:
                alive[index] = outputs.any(axis=0)
        seconds = allreduce(comm, np.array([time.perf_counter() - started]), MAX)[0]
        wait = allreduce(comm, np.array([sum(p.seconds_wait for p in engine.plans) - waited]),
                         MAX)[0]
        right = True
        if not training:
            allreduce(comm, alive, MAX)
            right = bool(np.array_equal(np.flatnonzero(alive), truth))
        return float(seconds), float(wait), right

    for k in kinds:  # warm-up: first touch of buffers, BLAS start-up
        one_round(models[k])
    times: dict[str, list[tuple[float, float, bool]]] = {k: [] for k in kinds}
    for r in range(args.rounds):
        for k in kinds[r % len(kinds):] + kinds[: r % len(kinds)]:
            times[k].append(one_round(models[k]))
    plan_kinds = {k: sorted({p.kind for p in models[k].engine.plans}) for k in kinds}
    node = job_nodes(comm)  # values per sample crossing between nodes, all ranks and layers
    between = {k: comm.allreduce(sum(p.values_between_nodes(node) for p in models[k].engine.plans))
               for k in kinds}
    for model in models.values():
        model.close()
    if comm.rank == 0:
        edges = sum(ly.nnz for ly in models[kinds[0]].spec.layers)
        print(json.dumps({"samples": n, "edges": edges, "kinds": plan_kinds, "times": times,
                          "between": between}))


# ------------------------------------------------------------------ driver


def mpinn_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "mpinn", *args]


def launcher(setup: str) -> tuple[list[str], str | None]:
    """The mpirun command line of a setup, and the link rate to bring the cluster up at."""
    where, what = setup.split(":")
    if where == "host":
        return ["mpirun", "--oversubscribe", "-n", what], None
    hosts = "10.77.0.1:2,10.77.0.2:2"
    return [str(CLUSTER / "mpirun"), "--host", hosts, "-n", "4"], what


def measure(launch: list[str], workload: str, model: str, data: str, strategy: str,
            args: argparse.Namespace) -> dict:
    """Every kind of one workload and strategy, in one mpirun; a partition that needs METIS
    is computed once and stored in the model file first (its name: STRATEGY-P)."""
    stored = []
    if strategy not in ("balanced", "count", "percentage", "layers"):
        ranks = launch[launch.index("-n") + 1]
        name = f"{strategy}-{ranks}"
        run(mpinn_cmd("partition", model, "--ranks", ranks, "--strategy", strategy, "--name",
                      name, "--force"), 1)
        stored = ["--partition", name]
    return run_json([*launch, sys.executable, __file__, "--worker", "--workload", workload,
                     "--model", model, "--data", data, "--strategy", strategy, *stored,
                     "--kinds", args.kinds, "--batch", str(args.batch if workload == "dense"
                                                           else args.sparse_batch),
                     "--steps", str(args.steps), "--rounds", str(args.rounds)], 1)


def report(setup: str, workload: str, strategy: str, result: dict) -> None:
    times = result["times"]
    best = {k: min(s for s, _, _ in v) for k, v in times.items()}
    base = best.get("alltoallv")
    for k, v in times.items():
        seconds = sorted(s for s, _, _ in v)
        median = seconds[len(seconds) // 2]
        wait = min(v)[1]
        rate = (f"{result['samples'] * result['edges'] / best[k] / 1e9:7.3f} G edges/s"
                if workload == "sparse" else
                f"{result['samples'] / best[k]:9.0f} samples/s")
        ok = "" if all(r for _, _, r in v) else "  WRONG categories"
        print(f"  {setup:<13} {workload:<6} {strategy:<9} {k:<12} {best[k]:8.3f} {median:8.3f} "
              f"{wait / best[k]:6.0%} {rate}  x{base / best[k] if base else float('nan'):5.2f}"
              f"  {result['between'][k]:>10}  {'+'.join(result['kinds'][k])}{ok}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workload", default="dense", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="balanced", help=argparse.SUPPRESS)
    parser.add_argument("--partition", help=argparse.SUPPRESS)
    parser.add_argument("--setups", default="host:2,host:4,nodes:1gbit,nodes:10gbit")
    parser.add_argument("--workloads", default="dense,sparse")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--sizes", default="784,1024,1024,1024,10", help="the dense MLP")
    parser.add_argument("--batch", type=int, default=256, help="the dense MLP's batch")
    parser.add_argument("--steps", type=int, default=4, help="dense training steps per round")
    parser.add_argument("--neurons", type=int, default=1024, help="the Sparse DNN's width")
    parser.add_argument("--layers", type=int, default=120)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--sparse-batch", type=int, default=250)
    parser.add_argument("--sparse-strategies", default="balanced,mincut")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of each kind")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    workloads = args.workloads.split(",")
    with tempfile.TemporaryDirectory(prefix="mpinn-exchange-") as tmp:
        files = {}
        if "dense" in workloads:
            model, data = f"{tmp}/mlp.h5", f"{tmp}/mlp-data.h5"
            sizes = [int(s) for s in args.sizes.split(",")]
            run(mpinn_cmd("init", model, "--sizes", args.sizes, "--seed", "1"), 1)
            run(mpinn_cmd("data", "classification", data, "--samples", str(args.batch * 4),
                          "--features", str(sizes[0]), "--outputs", str(sizes[-1])), 1)
            files["dense"] = (model, data, ["balanced"])
        if "sparse" in workloads:
            run(mpinn_cmd("bench", "sparse-dnn", "--neurons", str(args.neurons), "--layers",
                          str(args.layers), "--samples", str(args.samples), "--dir", tmp,
                          "--json"), 1)
            model = next(str(f) for f in Path(tmp).glob("radixnet-*.h5") if "inputs" not in f.name)
            data = next(str(f) for f in Path(tmp).glob("radixnet-*inputs*.h5"))
            files["sparse"] = (model, data, args.sparse_strategies.split(","))
        print(f"dense MLP {args.sizes}, batch {args.batch}, {args.steps} training steps a round; "
              f"Sparse DNN N={args.neurons} L={args.layers}, {args.samples} samples; "
              f"best and median of {args.rounds} rounds, kinds in turn")
        print(f"  {'setup':<13} {'work':<6} {'strategy':<9} {'exchange':<12} {'best s':>8} "
              f"{'median':>8} {'wait':>6} {'rate':>19}  {'vs a2av':>6}  {'x-node/s':>10}  layers ran")
        for setup in args.setups.split(","):
            launch, rate = launcher(setup)
            if rate is not None:
                up = subprocess.run(["bash", str(ROOT / "scripts/cluster-up.sh"), "2", rate],
                                    capture_output=True, text=True)
                if up.returncode != 0:
                    print(f"  {setup}: no cluster: {up.stderr.strip()}")
                    continue
            try:
                for workload in workloads:
                    model, data, strategies = files[workload]
                    for strategy in strategies:
                        result = measure(launch, workload, model, data, strategy, args)
                        report(setup, workload, strategy, result)
            finally:
                if rate is not None:
                    subprocess.run(["bash", str(ROOT / "scripts/cluster-down.sh")],
                                   capture_output=True)


if __name__ == "__main__":
    main()
