"""Dense MLP training throughput of mpinn next to its ceilings (not a test: nothing is asserted).

One invocation runs, on the same layer sizes, batch and step count:
  * the machine's float32/float64 GEMM peak with 1 and P threads (the ceiling),
  * mpinn under ``mpirun -n P`` with one BLAS thread per rank, through the real ``train``
    path (exchange plans, step guard, optimizer), with its time split per step,
  * PyTorch (CPU) in one process with P threads (``--peer torch``; needs torch),
  * PyTorch's own parallel training under ``torchrun``, P processes x 1 thread, gloo on
    127.0.0.1: DistributedDataParallel (``ddp``) and DTensor tensor parallelism (``tp``),
  * a plain single-process numpy loop with P BLAS threads, the no-MPI baseline.
Every run goes once per round, ``--pairs`` rounds, alternating; the table gives medians.

    python benchmarks/train_mlp.py --ranks 2 --sizes 784,4096,4096,4096,10 --batch 256 --steps 8
    python benchmarks/train_mlp.py --ranks 2 --sizes 64,256,256,10 --batch 64 --steps 200

FLOPs per sample and step count the forward GEMM (2 n_in n_out per layer), the weight
gradient (2 n_in n_out) and the input gradient (2 n_in n_out, not for the first layer).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLAS_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
PEERS = ("torch", "ddp", "tp", "numpy", "none")  # --peer's names (peer_runs makes each run)


def flops_per_sample(sizes: list[int]) -> int:
    pairs = list(zip(sizes[:-1], sizes[1:], strict=True))
    return sum(6 * a * b for a, b in pairs) - 2 * pairs[0][0] * pairs[0][1]


def child_env(threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in BLAS_VARS and k != "MPINN_AUTO_THREADS"}
    env.update({k: str(threads) for k in BLAS_VARS})
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONPATH=path,
               GLOO_SOCKET_IFNAME="lo")  # torchrun peers: gloo on the loopback only
    if threads > 1:  # a threaded child's MPI singleton must not inherit a per-core binding,
        env["OMPI_MCA_hwloc_base_binding_policy"] = "none"  # which puts its threads on one core
    return env


def run(cmd: list[str], threads: int, timeout: float = 1800) -> str:
    """Run a child with ``threads`` BLAS threads; its stdout, or exit showing its output."""
    out = subprocess.run(cmd, capture_output=True, text=True, env=child_env(threads),
                         timeout=timeout, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed:\n{out.stdout}\n{out.stderr}")
    return out.stdout


def run_json(cmd: list[str], threads: int, timeout: float = 1800) -> dict:
    """The JSON object a worker prints last."""
    return json.loads(run(cmd, threads, timeout).strip().splitlines()[-1])


# ------------------------------------------------------------------ workers (child processes)


def worker_gemm(args: argparse.Namespace) -> None:
    """GEMM GFLOP/s of this process; under mpirun, all ranks at once, summed on rank 0."""
    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    n, k, m = 4096, 4096, args.batch
    a = np.random.default_rng(0).random((n, k), dtype=args.dtype)  # not float64, then a copy
    b = np.random.default_rng(1).random((k, m), dtype=args.dtype)
    a @ b
    comm.Barrier()
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.gemm_seconds:
        a @ b
        reps += 1
    rates = comm.gather(2 * n * k * m * reps / (time.perf_counter() - start) / 1e9)
    if comm.rank == 0:  # one line: the ranks' lines could interleave in mpirun's output
        print(json.dumps({"gflops": sum(rates), "per_rank": rates}))


def worker_mpinn(args: argparse.Namespace) -> None:
    import numpy as np
    from mpi4py import MPI

    from mpinn.config import TrainConfig
    from mpinn.io.datafile import load
    from mpinn.model import DistributedModel
    from mpinn.partition.choice import PartitionChoice
    from mpinn.train import train

    comm = MPI.COMM_WORLD
    params = ({"layer_ranks": [int(r) for r in args.layer_ranks.split(",")]}
              if args.layer_ranks else {})
    choice = PartitionChoice(None, args.strategy, params)
    with DistributedModel(args.model, comm, choice, args.batch,
                          replicas=int(args.replicas)) as model:
        data = load(args.data, model.table, model.spec.dtype, comm, model.group)
        # one warm-up epoch: first-touch of buffers and BLAS start-up are not measured
        train(model, data, TrainConfig(epochs=1, batch_size=args.batch, lr=1e-3, shuffle=False,
                                       micro_batches=args.micro_batches))
        engine, plans = model.engine, model.engine.plans
        engine.seconds_compute = model.seconds_io = 0.0
        if engine.reducer is not None:
            engine.reducer.seconds_wait = 0.0
        for plan in plans:
            plan.seconds_pack = plan.seconds_wait = 0.0
            plan.bytes_sent = plan.bytes_received = 0
        comm.Barrier()
        start = time.perf_counter()
        result = train(model, data, TrainConfig(epochs=1, batch_size=args.batch, lr=1e-3,
                                                shuffle=False, micro_batches=args.micro_batches))
        total = time.perf_counter() - start
        steps = data.n_samples // args.batch
        parts = {"compute": engine.seconds_compute,
                 "pack": sum(p.seconds_pack for p in plans),
                 "comm_wait": sum(p.seconds_wait for p in plans)  # and the gradient allreduce
                 + (engine.reducer.seconds_wait if engine.reducer is not None else 0.0),
                 "optimizer": result.seconds_optimizer,
                 "io": model.seconds_io}
        parts["python_other"] = total - sum(parts.values())
        parts = {k: v / steps for k, v in parts.items()}
        sent = sum(p.bytes_sent for p in plans) / steps
        if engine.reducer is not None:  # the gradient allreduce over the replicas, per step
            sent += engine.reducer.bytes_per_step
        rss = _peak_rss()
    everything = comm.gather({"parts": parts, "sent": sent, "rss": rss,
                              "train_seconds": total - model.seconds_io}, root=0)
    if comm.rank == 0:
        slowest = max(everything, key=lambda e: e["train_seconds"])
        print(json.dumps({"samples_per_second": data.n_samples / slowest["train_seconds"],
                          "io_seconds": max(e["parts"]["io"] for e in everything) * steps,
                          "ranks": everything}))
    del np


def worker_torch(args: argparse.Namespace) -> None:
    import torch
    torch.set_num_threads(args.threads)
    sizes = [int(n) for n in args.sizes.split(",")]
    dtype = getattr(torch, args.dtype)
    net = _torch_net(sizes, dtype)
    x = torch.rand(args.batch, sizes[0], dtype=dtype)
    y = torch.randint(0, sizes[-1], (args.batch,))
    step = _torch_step(net, x, y)
    step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    print(json.dumps({"samples_per_second": args.steps * args.batch / (time.perf_counter() - start),
                      "version": torch.__version__}))


def _torch_net(sizes: list[int], dtype: object) -> object:
    """The benchmark's MLP as a torch ``Sequential``: Linear layers with ReLU between them."""
    import torch
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(torch.nn.Linear(a, b, dtype=dtype))
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def _torch_step(net: object, x: object, y: object) -> Callable[[], None]:
    """One step of every PyTorch run: SGD (lr 1e-3) on the cross-entropy of ``net(x)``."""
    import torch
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=False)
        loss_fn(net(x), y).backward()
        opt.step()

    return step


def worker_torch_dist(args: argparse.Namespace) -> None:
    """PyTorch's own parallel training, one process per ``torchrun`` worker, 1 thread each.

    ``ddp``: DistributedDataParallel, every process a whole copy of the model and 1/P of
    the global batch, gradients allreduced by gloo. ``tp``: tensor parallelism with
    DTensor, the Linear layers alternating ``ColwiseParallel`` (rows split, outputs stay
    sharded) and ``RowwiseParallel`` (columns split, outputs summed), so one allreduce per
    pair of layers, every process the whole batch; an odd last layer is column-split with
    its outputs gathered. Same global batch, dtype and SGD as the other runs.
    """
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    sizes = [int(n) for n in args.sizes.split(",")]
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    net = _torch_net(sizes, dtype)
    x = torch.rand(args.batch, sizes[0], dtype=dtype)
    y = torch.randint(0, sizes[-1], (args.batch,))
    if args.torch_mode == "ddp":
        lo, hi = rank * args.batch // world, (rank + 1) * args.batch // world
        x, y = x[lo:hi], y[lo:hi]  # the global batch split as DistributedSampler would
        net = torch.nn.parallel.DistributedDataParallel(net)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate
        from torch.distributed.tensor import parallel as tp
        mesh = init_device_mesh("cpu", (world,))
        linear = [str(i) for i, m in enumerate(net) if isinstance(m, torch.nn.Linear)]
        plan: dict[str, object] = {}
        for j, name in enumerate(linear):
            if j % 2:
                plan[name] = tp.RowwiseParallel()
            elif j == len(linear) - 1:
                plan[name] = tp.ColwiseParallel(output_layouts=Replicate())
            else:
                plan[name] = tp.ColwiseParallel()
        net = tp.parallelize_module(net, mesh, plan)
    step = _torch_step(net, x, y)
    step()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    dist.barrier()
    elapsed = time.perf_counter() - start
    if rank == 0:
        print(json.dumps({"samples_per_second": args.steps * args.batch / elapsed,
                          "version": torch.__version__}), flush=True)
    dist.destroy_process_group()


def torchrun(script: list[str], processes: int) -> list[str]:
    """``torchrun`` on one node running ``script`` (a path and its arguments) with this
    interpreter; ``--standalone`` has its agent take a free port when it starts (a port
    picked here could be taken by then: the peers run after mpinn), gloo on the loopback."""
    launcher = str(Path(sys.executable).with_name("torchrun"))
    return [launcher, "--standalone", "--nnodes", "1", "--nproc-per-node", str(processes), *script]


def failure_reason(output: str) -> str:
    """The line of a failed child's output that says why: a worker's exception or C++
    ``terminate``, else torchrun's root cause (a signal or an exit code), else the last line.
    torchrun's own traceback (``raise ChildFailedError``) says only that a worker failed."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for n, line in enumerate(lines):
        if line.startswith("terminate called"):  # and what() said, on the next line
            return " ".join(lines[n:n + 2])
        if re.match(r"[\w.]+(Error|Exception)\b", line) and "ChildFailedError" not in line:
            return line
    for key in ("traceback : Signal", "exitcode  :"):
        found = [line for line in lines if line.startswith(key)]
        if found:
            return found[0]
    return lines[-1] if lines else "no output"


def worker_numpy(args: argparse.Namespace) -> None:
    import numpy as np
    sizes = [int(n) for n in args.sizes.split(",")]
    rng = np.random.default_rng(0)
    ws = [rng.uniform(-0.05, 0.05, (b, a)).astype(args.dtype)
          for a, b in zip(sizes, sizes[1:], strict=False)]
    bs = [np.zeros(b, args.dtype) for b in sizes[1:]]
    x = rng.random((args.batch, sizes[0])).astype(args.dtype)
    y = rng.integers(0, sizes[-1], args.batch)

    def step() -> None:
        acts = [x]
        for i, (w, b) in enumerate(zip(ws, bs, strict=True)):
            z = acts[-1] @ w.T + b
            acts.append(np.maximum(z, 0) if i < len(ws) - 1 else z)
        z = acts[-1]
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        p[np.arange(len(y)), y] -= 1
        dz = p / len(y)
        for i in range(len(ws) - 1, -1, -1):
            gw, gb = dz.T @ acts[i], dz.sum(0)
            if i:
                dz = (dz @ ws[i]) * (acts[i] > 0)
            ws[i] -= 1e-3 * gw
            bs[i] -= 1e-3 * gb

    step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    print(json.dumps({"samples_per_second": args.steps * args.batch / (time.perf_counter() - start)}))


def peer_runs(args: argparse.Namespace, me: list[str],
              common: list[str]) -> list[tuple[str, list[str], int]]:
    """(name, command, BLAS threads) of each peer ``--peer`` names, in the order given."""
    p, runs = args.ranks, []
    for peer in (name for name in args.peer.split(",") if name != "none"):
        if peer == "torch":
            runs.append((f"PyTorch, 1 process, {p} threads",
                         [*me, "--worker", "torch", "--threads", str(p), *common], p))
        elif peer in ("ddp", "tp"):
            title = "DDP (gloo)" if peer == "ddp" else "TP (DTensor, gloo)"
            runs.append((f"PyTorch {title}, torchrun {p}x1",
                         torchrun([me[-1], "--worker", "torch_dist", "--torch-mode", peer, *common],
                                  p), 1))
        else:  # numpy: main() refused any other name
            runs.append((f"numpy loop, 1 process, {p} threads", [*me, "--worker", "numpy", *common], p))
    return runs


def run_peer(name: str, cmd: list[str], threads: int) -> dict:
    """``run_json`` of a peer, once more if it fails for a reason other than a missing
    module (a worker of torchrun can die in gloo on a loaded machine), saying so."""
    try:
        return run_json(cmd, threads)
    except SystemExit as exc:
        why = failure_reason(str(exc))
        if "No module named" in why:
            raise
        print(f"({name} failed, tried once more: {why})", flush=True)
        return run_json(cmd, threads)


def measure_pairs(runs: list[tuple[str, list[str], int]],
                  pairs: int) -> tuple[list[dict[str, float]], dict]:
    """Samples/s of every run, all of them once per round, ``pairs`` rounds: the runs of a
    round share the machine's state of the moment (other load, clocks), so their ratios
    are fairer than runs taken minutes apart. Also the first run's (mpinn's) last output.

    A peer that fails (torch missing, a gloo that cannot start) is dropped with a note
    saying why (see ``run_peer``); mpinn failing ends the benchmark.
    """
    rounds: list[dict[str, float]] = []
    first: dict = {}
    failed: set[str] = set()
    for _ in range(pairs):
        one: dict[str, float] = {}
        for i, (name, cmd, threads) in enumerate(runs):
            if name in failed:
                continue
            if i == 0:
                out = first = run_json(cmd, threads)
            else:
                try:
                    out = run_peer(name, cmd, threads)
                except SystemExit as exc:
                    print(f"({name} skipped: {failure_reason(str(exc))})", flush=True)
                    failed.add(name)
                    continue
            one[name] = out["samples_per_second"]
        rounds.append(one)
    return rounds, first


def print_pairs(rounds: list[dict[str, float]], flops: int, peak: float) -> None:
    """Per run: the median samples/s over the rounds, its range, and mpinn (the first run)
    over it as the median of the per-round ratios."""
    names = list(rounds[0])
    mine = names[0]
    print(f"\nmedian of {len(rounds)} rounds, each run once per round")
    print(f"{'run':<44} {'samples/s':>10} {'range':>15} {'GFLOP/s':>9} {'% of peak':>9} "
          f"{'mpinn/this':>10}")
    for name in names:
        values = [r[name] for r in rounds if name in r]
        sps = statistics.median(values)
        spread = f"{min(values):.0f}-{max(values):.0f}"
        ratio = statistics.median(r[mine] / r[name] for r in rounds if name in r)
        gflops = sps * flops / 1e9
        print(f"{name:<44} {sps:>10.1f} {spread:>15} {gflops:>9.1f} {100 * gflops / peak:>8.0f}% "
              f"{ratio:>9.2f}x")


def worker_plan(args: argparse.Namespace) -> None:
    """The cost model's prediction for each of this run's layouts (one per R of
    ``--replicas``), from one probe of these ranks, and its own choice."""
    import numpy as np
    from mpi4py import MPI

    from mpinn.partition import costmodel
    comm = MPI.COMM_WORLD
    sizes = [int(n) for n in args.sizes.split(",")]
    itemsize = np.dtype(args.dtype).itemsize
    seconds = costmodel.probe_seconds()  # MPINN_PROBE_SECONDS, as partition --plan takes it
    machine = costmodel.probe(comm, sizes, args.batch, args.dtype, seconds)
    strategy = args.strategy if args.strategy in ("balanced", "layers") else "balanced"
    _, table = costmodel.choose(sizes, args.batch, comm.size, machine, itemsize)
    # as --replicas auto does: layouts whose modelled step is short are timed too
    timing = seconds * costmodel.TIME_SHARE  # as partition --plan times them
    table = costmodel.time_small(comm, sizes, args.batch, args.dtype, table, timing)
    chosen = table[0]
    plans = []
    for r in (int(r) for r in args.replicas.split(",")):
        lay = costmodel.Layout(r, comm.size // r, strategy,
                            args.micro_batches if strategy == "layers" else 1)
        p = next((t for t in table if t.layout == lay), None) or costmodel.time_small(
            comm, sizes, args.batch, args.dtype,
            [costmodel.predict(sizes, args.batch, itemsize, lay, machine)], timing)[0]
        plans.append({"layout": str(lay), "step": p.step, "modelled": p.modelled,
                      "timed": p.timed is not None, "compute": p.compute,
                      "exchange": p.exchange, "allreduce": p.allreduce})
    if comm.rank == 0:
        print(json.dumps({"plans": plans, "chosen": str(chosen.layout),
                          "chosen_step": chosen.step}))


def print_prediction(plan: dict, measured_sps: list[float], batch: int) -> None:
    """The cost model's step time next to the measured one (median of the rounds), one
    line per layout run, and the layout the model would choose."""
    print("\ncost model (mpinn/partition/costmodel.py, probed on these ranks), per layout run:")
    for one, sps in zip(plan["plans"], measured_sps, strict=True):
        measured = batch / sps
        off = 100 * (one["step"] - measured) / measured
        how = (f"timed; modelled {1e3 * one['modelled']:.2f}" if one["timed"] else
               f"compute {1e3 * one['compute']:.1f}, exchange {1e3 * one['exchange']:.1f}, "
               f"allreduce {1e3 * one['allreduce']:.1f}")
        print(f"  {one['layout']:<22} predicted {1e3 * one['step']:.2f} ms per step ({how}); "
              f"measured {1e3 * measured:.2f} ms: {off:+.0f}%")
    print(f"  its choice for these ranks: {plan['chosen']}, predicted "
          f"{1e3 * plan['chosen_step']:.2f} ms")


def _peak_rss() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ------------------------------------------------------------------ driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="784,4096,4096,4096,10")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--gemm-seconds", type=float, default=4.0,
                        help="how long each GEMM-peak measurement runs (default 4)")
    parser.add_argument("--strategy", default="balanced")
    parser.add_argument("--layer-ranks", default="", help="owner of each layer (strategy layers)")
    parser.add_argument("--micro-batches", type=int, default=1)
    parser.add_argument("--replicas", default="1",
                        help="R copies of the model over R groups of P/R ranks (mpinn --replicas); "
                        "a comma list (1,2) runs mpinn once per R in every round, the first R "
                        "giving the per-step table")
    parser.add_argument("--peer", default="torch,ddp,tp,numpy",
                        help="comma list of peers run beside mpinn: torch (1 process, P threads), "
                        "ddp and tp (torchrun P processes x 1 thread), numpy; or none")
    parser.add_argument("--pairs", type=int, default=3,
                        help="rounds of every run; figures are medians over them")
    parser.add_argument("--json", metavar="PATH",
                        help="also append the figures to PATH (docs/perf/train_mlp.json)")
    parser.add_argument("--torch-mode", choices=["ddp", "tp"], help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=["gemm", "mpinn", "torch", "torch_dist", "numpy", "plan"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        {"gemm": worker_gemm, "mpinn": worker_mpinn, "torch": worker_torch,
         "torch_dist": worker_torch_dist, "numpy": worker_numpy, "plan": worker_plan}[args.worker](args)
        return

    unknown = set(args.peer.split(",")) - set(PEERS)
    if unknown:  # before the GEMM peaks and mpinn's run, not after them
        parser.error(f"--peer: unknown peer(s) {', '.join(sorted(unknown))} "
                     f"({', '.join(PEERS[:-1])} or {PEERS[-1]})")
    sizes = [int(n) for n in args.sizes.split(",")]
    p = args.ranks
    replica_counts = [int(r) for r in args.replicas.split(",")]
    me = [sys.executable, str(Path(__file__).resolve())]
    common = ["--sizes", args.sizes, "--batch", str(args.batch), "--steps", str(args.steps),
              "--dtype", args.dtype, "--gemm-seconds", str(args.gemm_seconds)]
    flops = flops_per_sample(sizes)
    params = sum(a * b + b for a, b in zip(sizes, sizes[1:], strict=False))
    print(f"dense MLP {args.sizes}, {params / 1e6:.1f} M parameters, {args.dtype}, batch "
          f"{args.batch}, {args.steps} steps, P = {p}, strategy {args.strategy}; "
          f"{flops / 1e6:.1f} MFLOP per sample and step", flush=True)

    peak1 = run_json([*me, "--worker", "gemm", *common], 1)["gflops"]
    threaded = run_json([*me, "--worker", "gemm", *common], p)["gflops"]
    # P single-threaded processes at once: the ceiling of P ranks with one BLAS thread each
    gemm_ranks = run_json(["mpirun", "--oversubscribe", "-n", str(p), *me, "--worker", "gemm",
                           *common], 1)
    concurrent, per_rank = gemm_ranks["gflops"], gemm_ranks["per_rank"]
    peak_p = max(threaded, concurrent)
    print(f"GEMM peak ({args.dtype}, 4096x4096 @ 4096x{args.batch}): {peak1:.1f} GFLOP/s on 1 "
          f"thread; {threaded:.1f} GFLOP/s with {p} threads in one process; {concurrent:.1f} "
          f"GFLOP/s with {p} single-threaded processes at once. Ceiling: {peak_p:.1f} GFLOP/s",
          flush=True)
    if p > 1:  # a core slower than the others slows every rank that waits on its exchange
        slow = min(range(p), key=per_rank.__getitem__)
        print(f"  per process at once: {min(per_rank):.1f} (rank {slow}) / "
              f"{statistics.median(per_rank):.1f} / {max(per_rank):.1f} GFLOP/s, min / median / "
              "max", flush=True)

    with tempfile.TemporaryDirectory(prefix="mpinn-bench-") as tmp:
        model, data = f"{tmp}/model.h5", f"{tmp}/data.h5"
        env_cmd = [sys.executable, "-m", "mpinn"]
        for cmd in ([*env_cmd, "init", model, "--sizes", args.sizes, "--dtype", args.dtype],
                    [*env_cmd, "data", "classification", data, "--samples",
                     str(args.batch * args.steps), "--features", str(sizes[0]), "--outputs",
                     str(sizes[-1]), "--dtype", args.dtype]):
            run(cmd, p)
        mpinn_runs = []
        for r in replica_counts:
            mpinn_cmd = ["mpirun", "--oversubscribe", "-n", str(p), *me, "--worker", "mpinn",
                         "--model", model, "--data", data, "--strategy", args.strategy,
                         "--layer-ranks", args.layer_ranks, "--micro-batches",
                         str(args.micro_batches), "--replicas", str(r), *common]
            layout = f", R = {r} x Q = {p // r}" if r > 1 or len(replica_counts) > 1 else ""
            mpinn_runs.append((f"mpinn, mpirun -n {p}{layout}, 1 thread/rank", mpinn_cmd, 1))
        runs = [*mpinn_runs, *peer_runs(args, me, common)]
        rounds, mp = measure_pairs(runs, args.pairs)
    print_pairs(rounds, flops, peak_p)
    plan = run_json(["mpirun", "--oversubscribe", "-n", str(p), *me, "--worker", "plan",
                     "--strategy", args.strategy, "--micro-batches", str(args.micro_batches),
                     "--replicas", args.replicas, *common], 1)
    print(f"{'ceiling: GEMM peak, ' + str(p) + ' threads':<44} {peak_p * 1e9 / flops:>10.1f} "
          f"{'':>15} {peak_p:>9.1f} {100:>8.0f}%")

    print("\nmpinn time per step, per rank (ms):")
    keys = ["compute", "pack", "comm_wait", "optimizer", "python_other"]
    print(f"  {'rank':>4} " + " ".join(f"{k:>12}" for k in keys) + f" {'sent MB':>8} {'peak RSS MB':>11}")
    for r, entry in enumerate(mp["ranks"]):
        print(f"  {r:>4} " + " ".join(f"{1e3 * entry['parts'][k]:>12.1f}" for k in keys)
              + f" {entry['sent'] / 1e6:>8.1f} {entry['rss'] / 2**20:>11.0f}")
    print(f"  checkpoint write (I/O), once per run: {mp['io_seconds']:.2f} s; "
          f"model {params * (4 if args.dtype == 'float32' else 8) / 2**20:.0f} MiB")
    measured = [statistics.median(r[name] for r in rounds) for name, _, _ in mpinn_runs]
    print_prediction(plan, measured, args.batch)
    if args.json:
        record_run(args, rounds, peak_p, flops, plan, measured)


def record_run(args: argparse.Namespace, rounds: list[dict[str, float]], peak: float,
               flops: int, plan: dict, measured: list[float]) -> None:
    """``--json``: the medians of the rounds, the GEMM ceiling and the cost model's
    predictions (docs/perf/train-mlp.md and cost-model.md draw them)."""
    from perf_record import append_run
    results = [{"name": name, "value": statistics.median(r[name] for r in rounds if name in r),
                "role": "mpinn" if name.startswith("mpinn") else "peer"} for name in rounds[0]]
    results.append({"name": f"GEMM peak, {args.ranks} ranks", "value": peak * 1e9 / flops,
                    "role": "ceiling"})
    predicted = [{"layout": one["layout"], "predicted_ms": 1e3 * one["step"],
                  "measured_ms": 1e3 * args.batch / sps}
                 for one, sps in zip(plan["plans"], measured, strict=True)]
    append_run(args.json, "train_mlp", {
        "title": f"{args.sizes}, batch {args.batch}, {args.ranks} ranks", "unit": "samples/s",
        "gemm_peak_gflops": peak, "results": results, "predicted": predicted})


if __name__ == "__main__":
    main()
