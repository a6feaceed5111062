"""Wide and deep: time and per-rank memory of every stage against the connections.

For each (width, depth) of a grid, one MPI job of P ranks builds a sparse network of
``depth`` CSR layers of ``width`` neurons with ``--fan-in`` random inputs each, and times
each stage: init (every rank writes its blocks of rows), partition (owner array and
metadata table), load (the rank's rows), plans (the exchange plans of an inference
engine), one inference pass over ``--batch`` samples, and a checkpoint write. Each
stage's per-rank peak of traced allocations (numpy arrays included) is the largest over
the ranks; what a rank holds afterwards is split into rows, metadata, plans and buffers.

The last table fits log(time) and log(peak) against log(connections) per stage: a slope
of about 1 (or below, where a fixed cost still dominates) is the ceiling wanted; above
1.2 a stage costs more than the work it does.

    python benchmarks/scale.py --ranks 2
    python benchmarks/scale.py --ranks 16 --grid 65536x4,262144x4,1048576x4,1048576x16,65536x128
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
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_mlp import child_env  # noqa: E402

STAGES = ("init", "partition", "load", "plans", "inference", "checkpoint")
DEFAULT_GRID = "16384x4,65536x4,262144x4,1048576x4,16384x32,16384x128"
BUFFERS = ("send_buffer", "recv_buffer", "sum_buffer")


def array_bytes(obj: object, skip: tuple[str, ...] = ()) -> int:
    """Bytes of the numpy arrays (and scipy sparse matrices) an object's attributes hold."""
    total = 0
    for name, value in vars(obj).items():
        if name in skip:
            continue
        if isinstance(value, np.ndarray):
            total += value.nbytes
        elif hasattr(value, "indptr") and hasattr(value, "data"):  # scipy sparse
            total += value.data.nbytes + value.indices.nbytes + value.indptr.nbytes
    return total


def held_buffers(engine: object) -> int:
    """Work buffers of an engine and its plans, each shared buffer counted once."""
    seen: dict[int, int] = {}
    arrays = [getattr(p, name, None) for p in engine.plans for name in BUFFERS]
    for name in ("z", "a", "grad_z", "grad_inputs"):
        arrays += list(getattr(engine, name))
    for array in arrays:
        if isinstance(array, np.ndarray):
            seen[id(array)] = array.nbytes
    return sum(seen.values())


def worker(args: argparse.Namespace) -> None:
    from mpi4py import MPI

    from mpinn.engine.engine import Engine
    from mpinn.io import checkpoint as mpinn_checkpoint
    from mpinn.io import create, hdf5, schema
    from mpinn.partition.choice import owner_for_strategy
    from mpinn.partition.metadata import MetadataTable
    from mpinn.shard import Shard

    comm = MPI.COMM_WORLD
    sizes = [args.width] * (args.depth + 1)
    seconds, peaks = {}, {}
    tracemalloc.start()

    def stage(name: str, run):  # noqa: ANN001, ANN202 - a timed closure
        comm.Barrier()
        tracemalloc.reset_peak()
        held_before = tracemalloc.get_traced_memory()[0]
        started = time.perf_counter()
        result = run()
        comm.Barrier()
        seconds[name] = time.perf_counter() - started
        peaks[name] = tracemalloc.get_traced_memory()[1] - held_before
        return result

    stage("init", lambda: create.create_model(
        args.model, sizes, ["relu"] * args.depth, "float32", seed=1, comm=comm,
        storages=["csr"], sparse=create.SparseInit(fan_in=args.fan_in)))
    f = hdf5.open_file(args.model, "r", comm)
    spec = schema.read_spec(f)
    table = stage("partition", lambda: MetadataTable.build(
        sizes, owner_for_strategy(f, spec, comm.size, args.strategy, {}, comm), comm.size))
    shard = stage("load", lambda: Shard.load(f, spec, table, comm))
    f.close()
    engine = stage("plans", lambda: Engine(shard, comm, args.batch, training=False))
    rng = np.random.default_rng(comm.rank)
    x = (rng.random((table.rows(0, comm.rank).size, args.batch)) < 0.5).astype(np.float32)
    stage("inference", lambda: engine.forward(x))

    def checkpoint() -> None:
        with mpinn_checkpoint.Checkpoint(args.model, spec, {}, comm) as out:
            shard.save(out)
            schema.write_state_attrs(out, {"epoch": 0, "step": 0, "batch": 0})

    stage("checkpoint", checkpoint)
    held = {"rows": sum(array_bytes(layer) for layer in shard.layers),
            "metadata": table.nbytes,
            "plans": sum(array_bytes(p, BUFFERS) for p in engine.plans),
            "buffers": held_buffers(engine),
            "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    figures = comm.gather({"seconds": seconds, "peaks": peaks, "held": held}, root=0)
    if comm.rank == 0:
        print(json.dumps(figures))


def slope(x: list[float], y: list[float]) -> float:
    """Least-squares slope of log(y) against log(x)."""
    lx, ly = np.log(np.asarray(x)), np.log(np.maximum(np.asarray(y), 1e-9))
    return float(np.polyfit(lx, ly, 1)[0]) if np.ptp(lx) > 0 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--grid", default=DEFAULT_GRID, help="WIDTHxDEPTH,... (default %(default)s)")
    parser.add_argument("--fan-in", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--strategy", default="balanced")
    parser.add_argument("--json", help="append each grid point's figures to this file (JSON lines)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--width", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--depth", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    grid = [tuple(int(v) for v in item.split("x")) for item in args.grid.split(",")]
    env = child_env(threads=1)
    mib = 2**20
    print(f"scale: {args.ranks} ranks, fan-in {args.fan_in}, {args.strategy}, batch {args.batch}")
    print("\nseconds per stage (slowest rank)")
    print(f"{'width':>8} {'depth':>5} {'connections':>12} " + " ".join(f"{s:>10}" for s in STAGES),
          flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mpinn-scale-", dir=os.environ.get("TMPDIR", "/tmp")) as tmp:
        for width, depth in grid:
            model = f"{tmp}/w{width}d{depth}.h5"
            out = subprocess.run(
                ["mpirun", "--oversubscribe", "-n", str(args.ranks), sys.executable, __file__,
                 "--worker", "--width", str(width), "--depth", str(depth), "--model", model,
                 "--fan-in", str(args.fan_in), "--batch", str(args.batch),
                 "--strategy", args.strategy],
                env=env, capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"width {width} depth {depth} failed:\n{out.stderr[-3000:]}")
            ranks = json.loads(out.stdout.strip().splitlines()[-1])
            os.remove(model)
            row = {"width": width, "depth": depth, "connections": width * depth * args.fan_in,
                   "ranks": args.ranks,
                   "seconds": {s: max(r["seconds"][s] for r in ranks) for s in STAGES},
                   "peaks": {s: max(r["peaks"][s] for r in ranks) for s in STAGES},
                   "held": {k: max(r["held"][k] for r in ranks) for k in ranks[0]["held"]}}
            rows.append(row)
            print(f"{width:>8} {depth:>5} {row['connections']:>12,} "
                  + " ".join(f"{row['seconds'][s]:>10.2f}" for s in STAGES), flush=True)
            if args.json:
                with open(args.json, "a") as log:
                    log.write(json.dumps(row) + "\n")
    print("\nMiB per rank (largest rank): each stage's peak above what the rank held before it; "
          "then what it holds after the run, split (metadata in bytes), and its peak RSS")
    print(f"{'width':>8} {'depth':>5} " + " ".join(f"{s:>10}" for s in STAGES)
          + f" {'rows':>8} {'metadata B':>11} {'plans':>7} {'buffers':>8} {'RSS':>6}")
    for row in rows:
        held = row["held"]
        print(f"{row['width']:>8} {row['depth']:>5} "
              + " ".join(f"{row['peaks'][s] / mib:>10.1f}" for s in STAGES)
              + f" {held['rows'] / mib:>8.1f} {held['metadata']:>11,} "
              f"{held['plans'] / mib:>7.1f} {held['buffers'] / mib:>8.1f} {held['rss'] / mib:>6.0f}")
    connections = [r["connections"] for r in rows]
    print("\nlog-log slope against connections (ceiling: about 1; above 1.2 grows faster than "
          "the work)")
    print(f"  {'stage':<10} {'time':>6} {'peak':>6}")
    for s in STAGES:
        print(f"  {s:<10} {slope(connections, [r['seconds'][s] for r in rows]):>6.2f} "
              f"{slope(connections, [r['peaks'][s] for r in rows]):>6.2f}")
    for part in ("rows", "metadata", "plans", "buffers"):
        print(f"  {'held ' + part:<17} {slope(connections, [r['held'][part] for r in rows]):>6.2f}")
    worst = max(rows, key=lambda r: r["connections"])
    print(f"\nmetadata / rows at {worst['width']}x{worst['depth']}: "
          f"{worst['held']['metadata'] / max(worst['held']['rows'], 1):.2e} (ceiling 0.1)")


if __name__ == "__main__":
    main()
