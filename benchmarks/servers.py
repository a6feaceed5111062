"""One server against K servers on ordinary links, beside PyTorch's tensor parallelism and DDP
on the same nodes and links (issue 26).

The servers are network namespaces made by scripts/cluster-up.sh (root), one core's worth of
work each (one rank, one BLAS thread: ``OMP_NUM_THREADS=1``), joined by veth pairs through a
bridge and limited both ways by ``tc tbf`` at each rate of ``--links``. For each link it
runs, in one invocation:

* mpinn on K servers (``mpirun --npernode 1`` across the nodes): the figure is epoch 2's
  samples/s of ``train --log-json`` (``--samples`` random samples, ``--no-shuffle``), and
  ``train --trace`` gives each rank's step split into compute, pack and wait;
* PyTorch tensor parallelism (DTensor ColwiseParallel / RowwiseParallel alternating) and
  DDP, gloo, one ``torch.distributed.run`` per node inside its namespace with
  ``GLOO_SOCKET_IFNAME`` set to the node's interface (gloo binds 127.0.0.1 otherwise);

and once, without a network: one server (``mpirun -n 1``) and its GEMM peak, the ceiling of
K servers being K times it. ``--sparse`` adds a sparse model trained across the servers
(RadiX-Net, ``--sparse-neurons`` x ``--sparse-layers``, ``--strategy mincut``).
Not a test: nothing asserted. Needs root and ``pip install torch`` for the peers.

    python benchmarks/servers.py --servers 2 --links 1gbit,10gbit,unlimited
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_mlp import ROOT, child_env, flops_per_sample, run_json  # noqa: E402

CLUSTER = Path(os.environ.get("MPINN_CLUSTER_DIR", "/run/mpinn-cluster"))
ME = Path(__file__).resolve()
TRAIN_MLP = ME.with_name("train_mlp.py")
SPLIT = ("compute", "pack", "wait", "optimizer", "data")


def sh(cmd: list[str], timeout: float = 1800, env: dict | None = None) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                         env=env if env is not None else child_env(1))
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:8])} ... failed ({out.returncode}):\n{out.stdout}\n"
                         f"{out.stderr[-4000:]}")
    return out.stdout


def cluster(servers: int, rate: str) -> None:
    sh(["bash", str(ROOT / "scripts/cluster-up.sh"), str(servers), rate],
       env={**child_env(1), "SLOTS": "1"})


def step_split(trace: Path, steps: int) -> list[dict[str, float]]:
    """Per rank, the mean of the last ``steps`` steps: the step and its compute, pack, wait,
    optimizer and data milliseconds (``train --trace``)."""
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e["ph"] == "X"]
    out = []
    for rank in sorted({e["pid"] for e in events}):
        mine = [e for e in events if e["pid"] == rank and e["tid"] == 0]
        last = sorted((e for e in mine if e["name"] == "step"), key=lambda e: e["ts"])[-steps:]
        lo, hi = last[0]["ts"], last[-1]["ts"] + last[-1]["dur"]
        totals: collections.Counter[str] = collections.Counter()
        for e in mine:
            if lo <= e["ts"] <= hi and e["cat"] in SPLIT:
                totals[e["cat"]] += e["dur"]
        split = {k: totals[k] / len(last) / 1e3 for k in SPLIT}
        split["step"] = sum(e["dur"] for e in last) / len(last) / 1e3
        out.append(split)
    return out


def mpinn_train(launch: list[str], model: str, data: str, args: argparse.Namespace,
                work: Path, tag: str, extra: list[str] = ()) -> tuple[float, list[dict]]:
    """Epoch 2's samples/s of ``train`` under ``launch``, and each rank's step split."""
    log, trace = work / f"{tag}.jsonl", work / f"{tag}.json"
    for path in (log, trace):
        path.unlink(missing_ok=True)
    sh([*launch, sys.executable, "-m", "mpinn", "train", model, "--data", data, "--epochs", "2",
        "--batch-size", str(args.batch), "--lr", "0.01", "--no-shuffle", "--log-json", str(log),
        "--trace", str(trace), "--quiet", *extra])
    records = [json.loads(line) for line in log.read_text().splitlines()]
    steps = -(-args.samples // args.batch)
    return records[-1]["samples_per_second"], step_split(trace, steps)


def torch_peer(mode: str, servers: int, args: argparse.Namespace) -> float:
    """PyTorch ``mode`` (tp or ddp) on the ``servers`` nodes: one torchrun per node, in its
    namespace, gloo on the node's interface; samples/s from rank 0."""
    port = 29500 + int(time.time()) % 1000
    common = ["--worker", "torch_dist", "--torch-mode", mode, "--sizes", args.sizes,
              "--batch", str(args.batch), "--steps", str(args.torch_steps), "--dtype", "float32"]
    procs = []
    for i in range(servers):
        env = {**child_env(1), "GLOO_SOCKET_IFNAME": f"mpnn{i + 1}"}
        cmd = ["ip", "netns", "exec", f"mpn{i + 1}", sys.executable, "-m",
               "torch.distributed.run", "--nnodes", str(servers), "--node-rank", str(i),
               "--nproc-per-node", "1", "--master-addr", "10.77.0.1", "--master-port", str(port),
               str(TRAIN_MLP), *common]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=env, cwd=ROOT))
    outs = [p.communicate(timeout=1800) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        if p.returncode != 0:
            raise SystemExit(f"torch {mode} failed:\n{out}\n{err[-4000:]}")
    line = next(ln for ln in outs[0][0].splitlines()[::-1] if ln.startswith("{"))
    return json.loads(line)["samples_per_second"]


def split_text(splits: list[dict]) -> str:
    return "; ".join(f"r{r}: {s['step']:.0f} ms = compute {s['compute']:.0f} + pack "
                     f"{s['pack']:.0f} + wait {s['wait']:.0f}" for r, s in enumerate(splits))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="784,4096,4096,4096,10")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--samples", type=int, default=2560)
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--links", default="1gbit,10gbit,unlimited")
    parser.add_argument("--peers", default="tp,ddp", help="PyTorch peers: tp, ddp, or none")
    parser.add_argument("--torch-steps", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each; the best is kept")
    parser.add_argument("--json", metavar="PATH",
                        help="also append the dense model's figures to PATH "
                        "(docs/perf/servers.json)")
    parser.add_argument("--exchange", default="auto", help="mpinn train --exchange")
    parser.add_argument("--sparse", action="store_true",
                        help="also a RadiX-Net model trained across the servers with mincut")
    parser.add_argument("--sparse-neurons", type=int, default=4096)
    parser.add_argument("--sparse-layers", type=int, default=12)
    args = parser.parse_args()
    sizes = [int(n) for n in args.sizes.split(",")]
    k = args.servers
    peers = [p for p in args.peers.split(",") if p and p != "none"]

    with tempfile.TemporaryDirectory(prefix="mpinn-servers-") as tmp:
        work = Path(tmp)
        model, data = str(work / "m.h5"), str(work / "d.h5")
        sh([sys.executable, "-m", "mpinn", "init", model, "--sizes", args.sizes, "--seed", "1",
            "--quiet"])
        sh([sys.executable, "-m", "mpinn", "data", "classification", data, "--samples",
            str(args.samples), "--features", str(sizes[0]), "--outputs", str(sizes[-1]),
            "--quiet"])
        common = ["--sizes", args.sizes, "--batch", str(args.batch), "--steps", "8",
                  "--dtype", "float32"]
        peak = run_json([sys.executable, str(TRAIN_MLP), "--worker", "gemm", *common], 1)["gflops"]
        flops = flops_per_sample(sizes)
        ceiling = peak * 1e9 / flops
        print(f"dense MLP {args.sizes}, float32, batch {args.batch}, {args.samples} samples, "
              f"SGD; one server: 1 core (1 rank, 1 BLAS thread). GEMM peak {peak:.1f} GFLOP/s "
              f"a core: ceiling {ceiling:.0f} samples/s a server, {k * ceiling:.0f} on {k}",
              flush=True)
        one = max((mpinn_train(["mpirun", "-n", "1", "--bind-to", "core"], model, data, args,
                               work, "one") for _ in range(args.repeat)), key=lambda r: r[0])
        print(f"\n| run | samples/s | x one server | step split per rank (ms) |\n|---|---|---|---|\n"
              f"| 1 server | {one[0]:.0f} | 1.00 | {split_text(one[1])} |", flush=True)
        rows: dict[str, dict[str, float]] = {}
        for rate in args.links.split(","):
            cluster(k, rate)
            launch = [str(CLUSTER / "mpirun"), "-n", str(k), "--npernode", "1", "-x",
                      "OMP_NUM_THREADS", "-x", "OPENBLAS_NUM_THREADS", "-x", "PYTHONPATH"]
            best = max((mpinn_train(launch, model, data, args, work, f"k-{rate}",
                                    ["--exchange", args.exchange]) for _ in range(args.repeat)),
                       key=lambda r: r[0])
            rows[rate] = {"mpinn": best[0]}
            print(f"| {k} servers, {rate} | {best[0]:.0f} | {best[0] / one[0]:.2f} | "
                  f"{split_text(best[1])} |", flush=True)
            for peer in peers:
                sps = max(torch_peer(peer, k, args) for _ in range(args.repeat))
                rows[rate][peer] = sps
                name = "tensor parallel" if peer == "tp" else "DDP"
                print(f"| PyTorch {name}, {k} servers, {rate} | {sps:.0f} | "
                      f"{sps / one[0]:.2f} | mpinn {best[0] / sps:.2f}x |", flush=True)
        if args.sparse:
            sparse(args, work, k)
        bash_down = ["bash", str(ROOT / "scripts/cluster-down.sh")]
        subprocess.run(bash_down, capture_output=True, cwd=ROOT)
    print("\nmpinn / one server, by link: " + ", ".join(
        f"{rate} {r['mpinn'] / one[0]:.2f}x" for rate, r in rows.items()), flush=True)
    if args.json:
        from perf_record import append_run
        names = {"mpinn": f"mpinn, {k} servers", "tp": "PyTorch tensor parallel",
                 "ddp": "PyTorch DDP"}
        results = [{"name": "mpinn, 1 server", "servers": 1, "link": None, "value": one[0],
                    "role": "mpinn"},
                   {"name": "GEMM ceiling, 1 server", "servers": 1, "link": None,
                    "value": ceiling, "role": "ceiling"}]
        results += [{"name": names[who], "servers": k, "link": rate, "value": sps,
                     "role": "mpinn" if who == "mpinn" else "peer"}
                    for rate, row in rows.items() for who, sps in row.items()]
        append_run(args.json, "servers", {
            "title": f"{args.sizes}, float32, batch {args.batch}, SGD, one core a server",
            "unit": "samples/s", "results": results})


def sparse(args: argparse.Namespace, work: Path, k: int) -> None:
    """A RadiX-Net model (``bench sparse-dnn``'s generator: ``--sparse-neurons`` N a layer,
    ``--sparse-layers``, 32 inputs a neuron) trained with mincut to regression targets
    (``mpinn data regression``, N features and N targets) on one server and on ``k``
    servers at each link: epoch 2's samples/s."""
    n, layers = args.sparse_neurons, args.sparse_layers
    made = work / "sparse"
    sh([sys.executable, "-m", "mpinn", "bench", "sparse-dnn", "--neurons", str(n), "--layers",
        str(layers), "--samples", "64", "--dir", str(made), "--json"], timeout=3600)
    model = next(str(p) for p in made.glob("*.h5") if "-inputs" not in p.name)
    data = str(work / "sparse-data.h5")
    sh([sys.executable, "-m", "mpinn", "data", "regression", data, "--samples",
        str(args.samples), "--features", str(n), "--outputs", str(n), "--quiet"])
    one = mpinn_train(["mpirun", "-n", "1"], model, data, args, work, "sparse-one",
                      ["--strategy", "mincut"])
    print(f"\n| RadiX-Net {n} x {layers}, mincut | samples/s | x one server | step split per rank "
          f"(ms) |\n|---|---|---|---|\n| 1 server | {one[0]:.0f} | 1.00 | {split_text(one[1])} |",
          flush=True)
    for rate in args.links.split(","):
        cluster(k, rate)
        launch = [str(CLUSTER / "mpirun"), "-n", str(k), "--npernode", "1", "-x",
                  "OMP_NUM_THREADS", "-x", "OPENBLAS_NUM_THREADS", "-x", "PYTHONPATH"]
        res = mpinn_train(launch, model, data, args, work, f"sparse-{rate}",
                          ["--strategy", "mincut"])
        print(f"| {k} servers, {rate} | {res[0]:.0f} | {res[0] / one[0]:.2f} | "
              f"{split_text(res[1])} |", flush=True)


if __name__ == "__main__":
    main()
