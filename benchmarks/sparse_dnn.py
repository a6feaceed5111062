"""Sparse DNN Graph Challenge inference: mpinn at 1 and P ranks next to single-process scipy.

Generates the RadiX-Net network (N neurons, L layers, 32 connections per neuron, weights
1/16, bias by N, relu_cap 32) and image-like binary inputs, then runs, on the same files:

  * the plain scipy.sparse loop in one process (Y = clip(W @ Y + b, 0, 32), every layer and
    every sample), over all samples at once and in batches of ``--batch-size`` (as mpinn
    runs them: a batch's activations stay in cache): the baseline mpinn must beat;
  * the same loop dropping samples whose activations are all zero (the challenge's own
    reference keeps activations sparse, which amounts to this), for context;
  * ``mpirun -n P python -m mpinn bench sparse-dnn`` with the balanced and mincut
    partitions (mincut stored beforehand, so its METIS time is not in the figure), and
    with ``--drop-dead``, the work of the dead-sample loop above.

Edges per second = samples x stored weights over all layers / seconds. The ceiling next
to each mpinn figure is P times the single-process loop (perfect scaling). Best of
``--repeat`` runs. Not a test: nothing is asserted.

    python benchmarks/sparse_dnn.py --neurons 1024 --layers 120 --samples 2000 --ranks 1,2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_mlp import ROOT, run, run_json  # noqa: E402


def best_seconds(action, repeat: int) -> float:  # noqa: ANN001 - a callable
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--neurons", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=120)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=250,
                        help="samples per mpinn pass (activations of a batch stay in cache)")
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", metavar="PATH",
                        help="also append the figures to PATH (docs/perf/sparse_dnn.json)")
    args = parser.parse_args()

    import os
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    sys.path.insert(0, str(ROOT))
    from mpinn.tools import graphchallenge, sparse_dnn

    n, layers, samples = args.neurons, args.layers, args.samples
    with tempfile.TemporaryDirectory(prefix="mpinn-sparse-") as tmp:
        model, data = f"{tmp}/model.h5", f"{tmp}/inputs.h5"
        graphchallenge.make_challenge(model, data, n, layers, samples)
        weights = list(graphchallenge.model_layers(model))
        import h5py
        with h5py.File(data, "r") as f:
            y0 = f["X"][...]
            truth = f["categories"][...]
        edges = sum(w.nnz for w in weights)
        work = samples * edges
        bias = sparse_dnn.challenge_bias(n)
        whole = best_seconds(lambda: graphchallenge.plain_inference(iter(weights), bias, y0), args.repeat)
        chunks = [y0[i:i + args.batch_size] for i in range(0, samples, args.batch_size)]
        batched = best_seconds(lambda: [graphchallenge.plain_inference(iter(weights), bias, c)
                                        for c in chunks],
                               args.repeat)
        plain = min(whole, batched)
        pruned = best_seconds(lambda: sparse_dnn.infer(iter(weights), bias, y0), args.repeat)
        print(f"Sparse DNN N={n} L={layers}: {samples} samples, {edges:,} edges, "
              f"{truth.size} categories; G edges/s, best of {args.repeat}")
        print(f"  scipy.sparse plain loop, 1 process, all samples at once  {work / whole / 1e9:7.3f}")
        print(f"  scipy.sparse plain loop, 1 process, batches of {args.batch_size:<5}    "
              f"{work / batched / 1e9:7.3f}")
        print(f"  scipy.sparse, dead samples dropped, 1 process            {work / pruned / 1e9:7.3f}")
        results = [{"name": "scipy.sparse plain loop, 1 process, all samples at once",
                    "value": work / whole / 1e9, "role": "peer", "ranks": 1},
                   {"name": f"scipy.sparse plain loop, 1 process, batches of {args.batch_size}",
                    "value": work / batched / 1e9, "role": "peer", "ranks": 1},
                   {"name": "scipy.sparse, dead samples dropped, 1 process",
                    "value": work / pruned / 1e9, "role": "peer", "ranks": 1}]
        ranks = [int(p) for p in args.ranks.split(",")]
        for p in ranks:
            if p > 1:
                run([sys.executable, "-m", "mpinn", "--quiet", "partition", model, "--ranks",
                     str(p), "--strategy", "mincut", "--name", f"mincut{p}"], 1)
            for label, flags in (("balanced", []), ("mincut", ["--partition", f"mincut{p}"]),
                                 ("mincut, dead samples dropped",
                                  ["--partition", f"mincut{p}", "--drop-dead"])):
                if p == 1 and label.startswith("mincut"):
                    flags = [f for f in flags if f == "--drop-dead"]
                    if not flags:
                        continue
                    label = "dead samples dropped"
                runs = [run_json(["mpirun", "--oversubscribe", "-n", str(p), sys.executable, "-m",
                                  "mpinn", "bench", "sparse-dnn", "--model", model, "--data", data,
                                  "--batch-size", str(args.batch_size), "--json", *flags], 1)
                        for _ in range(args.repeat)]
                best = max(runs, key=lambda r: r["edges_per_second"])
                rate = best["edges_per_second"] / 1e9
                ok = "categories match" if all(r["correct"] for r in runs) else "CATEGORIES WRONG"
                print(f"  mpinn, mpirun -n {p}, {label:<35}{rate:7.3f}   "
                      f"{rate * plain * 1e9 / work:4.2f}x the best plain loop (ceiling {p}x = "
                      f"{p * work / plain / 1e9:.2f}); compute {best['compute']:.2f} s, pack "
                      f"{best['pack']:.2f} s, wait {best['wait']:.2f} s; {ok}", flush=True)
                results.append({"name": f"mpinn, mpirun -n {p}, {label}", "value": rate,
                                "role": "mpinn", "ranks": p, "strategy": label})
            results.append({"name": f"ceiling: {p} x the best plain loop",
                            "value": p * work / plain / 1e9, "role": "ceiling", "ranks": p})
    if args.json:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from perf_record import append_run
        append_run(args.json, "sparse_dnn", {
            "title": f"N = {n}, L = {layers}, {samples} samples", "unit": "G edges/s",
            "results": results})


if __name__ == "__main__":
    main()
