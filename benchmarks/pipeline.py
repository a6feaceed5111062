"""Speed-up of the micro-batch pipeline for the ``layers`` strategy (not a test).

Each rank owns whole layers; unpipelined, they take turns. The pipeline (``--micro-batches
M``) lets the owner of layer l work on micro-batch k while the owner of layer l+1 works on
k-1. Runs the same model, data and batch with M = 1 and larger M at P = 2 and 4, each
configuration ``--repeat`` times, the values of M alternating within each round, and
reports the best run of each (its split per rank beside it).

    python benchmarks/pipeline.py --sizes 2048,2048,2048,2048,2048 --batch 1024 --repeat 3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_mlp import run, run_json  # noqa: E402

LAYER_RANKS = {2: "0,0,0,1,1", 3: "0,0,1,2,2", 4: "0,0,1,2,3"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="2048,2048,2048,2048,2048")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--ranks", default="2,4")
    parser.add_argument("--micro-batches", default="1,4,8,16")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each configuration; best kept")
    args = parser.parse_args()
    sizes = [int(n) for n in args.sizes.split(",")]
    me = [sys.executable, str(Path(__file__).resolve().parent / "train_mlp.py")]
    print(f"dense MLP {args.sizes}, float32, batch {args.batch}, strategy layers; samples/s, "
          f"best of {args.repeat} runs")
    with tempfile.TemporaryDirectory(prefix="mpinn-pipe-") as tmp:
        model, data = f"{tmp}/model.h5", f"{tmp}/data.h5"
        for cmd in (["init", model, "--sizes", args.sizes],
                    ["data", "classification", data, "--samples", str(args.batch * args.steps),
                     "--features", str(sizes[0]), "--outputs", str(sizes[-1])]):
            run([sys.executable, "-m", "mpinn", *cmd], 2)
        for p in (int(r) for r in args.ranks.split(",")):
            results: dict[int, float] = {}
            splits: dict[int, list[dict]] = {}
            for _ in range(args.repeat):  # rounds: load on the machine hits every M alike
                for m in (int(v) for v in args.micro_batches.split(",")):
                    out = run_json(["mpirun", "--oversubscribe", "-n", str(p), *me, "--worker",
                                    "mpinn", "--model", model, "--data", data, "--strategy",
                                    "layers", "--layer-ranks", LAYER_RANKS[p], "--micro-batches",
                                    str(m), "--sizes", args.sizes, "--batch", str(args.batch),
                                    "--steps", str(args.steps)], 1)
                    if out["samples_per_second"] > results.get(m, 0.0):
                        results[m], splits[m] = out["samples_per_second"], out["ranks"]
            base = results[min(results)]
            line = "  ".join(f"M={m}: {sps:7.1f} ({sps / base:.2f}x)" for m, sps in results.items())
            print(f"P={p} (layer ranks {LAYER_RANKS[p]}): {line}", flush=True)
            print_split(splits)


def print_split(splits: dict[int, list[dict]]) -> None:
    """Where each rank's step goes, per M: the pipeline's bubbles show up as waiting."""
    print("  ms per step, per rank: compute + pack | waiting for exchanges | all else "
          "(optimizer, loss, Python)")
    for m, ranks in splits.items():
        cells = []
        for entry in ranks:
            part = {k: 1e3 * v for k, v in entry["parts"].items()}
            other = part["optimizer"] + part["python_other"]
            cells.append(f"{part['compute'] + part['pack']:5.0f} |{part['comm_wait']:5.0f} |{other:4.0f}")
        print(f"    M={m:<3} " + "   ".join(f"r{r}: {c}" for r, c in enumerate(cells)), flush=True)


if __name__ == "__main__":
    main()
