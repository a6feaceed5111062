"""The performance pages' plots, drawn at build time from the benchmarks' JSON files.

Each ``*.json`` here is a file of dated runs as ``benchmarks/perf_record.py`` writes it
(``--json PATH`` of train_mlp.py, sparse_dnn.py, cluster.py and servers.py); the runs
before that option existed, and exchange.json (benchmarks/exchange.py has no ``--json``),
were transcribed from the dated tables of the README and docs/scaling.md. ``draw_all``
writes one PNG per page into ``_plots/``: every figure with the ceiling it is measured
against and the peers (PyTorch, scipy) beside it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MPINN, PEER, CEILING = "tab:blue", "tab:orange", "tab:red"
LINKS = ["one host", "unlimited", "10gbit", "1gbit"]
LINK_LABELS = {"one host": "one host\n(shared memory)", "unlimited": "no limit\n(≈3.7 Gbit/s)",
               "10gbit": "10 Gbit/s setting\n(≈3.7 effective)", "1gbit": "1 Gbit/s"}


def flops_per_sample(sizes: list[int]) -> int:
    """Forward and backward FLOPs of one sample of a dense MLP, as benchmarks/train_mlp.py
    counts them (the input layer needs no input gradient)."""
    pairs = list(zip(sizes[:-1], sizes[1:], strict=True))
    return sum(6 * a * b for a, b in pairs) - 2 * pairs[0][0] * pairs[0][1]


def ceiling_of(run: dict[str, Any]) -> float | None:
    """A run's ceiling in samples/s: its own ceiling row, else its GEMM peak over the FLOPs
    of a sample."""
    rows = [r["value"] for r in run["results"] if r["role"] == "ceiling"]
    if rows:
        return rows[0]
    if "gemm_peak_gflops" in run and "flops_per_sample_from" in run:
        sizes = [int(n) for n in run["flops_per_sample_from"].split(",")]
        return run["gemm_peak_gflops"] * 1e9 / flops_per_sample(sizes)
    return None


def _short(machine: str) -> str:
    return machine.split("(")[0].split(";")[0].strip()


def train_mlp(runs: list[dict[str, Any]], out: Path) -> None:
    """Samples/s of mpinn's layouts and of the peers, one panel per run that has a ceiling."""
    import matplotlib.pyplot as plt
    shown = [r for r in runs if r["results"] and ceiling_of(r) is not None]
    fig, axes = plt.subplots(len(shown), 1, figsize=(9, 2.6 * len(shown) + 0.6), squeeze=False)
    for ax, run in zip(axes[:, 0], shown, strict=True):
        rows = [r for r in run["results"] if r["role"] != "ceiling"]
        ceiling = ceiling_of(run)
        names = [r["name"] for r in rows][::-1]
        values = [r["value"] for r in rows][::-1]
        colours = [MPINN if r["role"] == "mpinn" else PEER for r in rows][::-1]
        ax.barh(names, values, color=colours)
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:,.0f} ({100 * v / ceiling:.0f}%)", va="center", fontsize=8)
        ax.axvline(ceiling, color=CEILING, linestyle="--")
        ax.text(ceiling, -0.45, f" GEMM peak\n {ceiling:,.0f}", color=CEILING, fontsize=8,
                va="bottom", ha="left")
        ax.set_xlim(0, ceiling * 1.25)
        ax.set_xlabel("samples/s (higher is better; % of the GEMM peak in brackets)")
        ax.set_title(f"{run['title']} — {run['date']}, {_short(run['machine'])}", fontsize=9)
        ax.tick_params(axis="y", labelsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in (MPINN, PEER)]
    handles.append(plt.Line2D([], [], color=CEILING, linestyle="--"))
    fig.legend(handles, ["mpinn", "peer (PyTorch, numpy)", "ceiling: GEMM peak"],
               loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(out, dpi=110)
    plt.close(fig)


def cost_model(runs: list[dict[str, Any]], out: Path) -> None:
    """The cost model's predicted step time of each layout against the measured one."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 6))
    low, high = 1e9, 0.0
    for run in runs:
        points = run.get("predicted", [])
        if not points:
            continue
        measured = [p["measured_ms"] for p in points]
        predicted = [p["predicted_ms"] for p in points]
        low, high = min(low, *measured, *predicted), max(high, *measured, *predicted)
        marker = "s" if any(p.get("timed") for p in points) else "o"
        ax.scatter(measured, predicted, marker=marker, s=40,
                   label=f"{run['date']}: {run['title']}")
        for p in points:
            ax.annotate(p["layout"].split()[0], (p["measured_ms"], p["predicted_ms"]),
                        fontsize=7, xytext=(4, -8), textcoords="offset points")
    line = [low / 1.5, high * 1.5]
    ax.plot(line, line, color="grey", linewidth=1, label="prediction = measurement")
    ax.fill_between(line, [v * 0.8 for v in line], [v * 1.2 for v in line], color="grey",
                    alpha=0.12, label="±20%")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured step time (ms)")
    ax.set_ylabel("predicted step time (ms)")
    ax.set_title("Cost model: layouts R x Q predicted against measured\n"
                 "(squares: short layouts, timed on the ranks; circles: modelled)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def sparse_dnn(runs: list[dict[str, Any]], cluster: list[dict[str, Any]], out: Path) -> None:
    """G edges/s against ranks (mincut and balanced, with the scipy loop and perfect scaling
    of it) and against the link between two nodes."""
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 6.5))
    scaling = next(r for r in runs if any(x.get("neurons") == 4096 for x in r["results"]))
    colours = {1024: MPINN, 4096: "tab:green"}
    for n, colour in colours.items():
        rows = [x for x in scaling["results"] if x.get("neurons") == n]
        mincut = sorted((x["ranks"], x["value"]) for x in rows if x.get("strategy") == "mincut")
        left.plot(*zip(*mincut, strict=True), marker="o", color=colour, label=f"mpinn mincut, N = {n}")
        balanced = [(x["ranks"], x["value"]) for x in rows if x.get("strategy") == "balanced"]
        left.scatter(*zip(*balanced, strict=True), marker="x", color=colour, s=60,
                     label=f"mpinn balanced, N = {n}")
        loop = next(x["value"] for x in rows if x["role"] == "peer")
        ranks = [1, 2, 4, 8, 16]
        left.axhline(loop, color=colour, linestyle=":", linewidth=1)
        left.plot(ranks, [loop * p for p in ranks], color=colour, linestyle="--", linewidth=1,
                  alpha=0.6, label=f"ceiling: ranks x the scipy loop ({loop:.2f}), N = {n}")
    left.set_xscale("log", base=2)
    left.set_xticks([1, 2, 4, 8, 16], ["1", "2", "4", "8", "16"])
    left.set_xlabel("MPI ranks (one core each)")
    left.set_ylabel("G edges/s (higher is better)")
    left.set_ylim(0, 40)
    left.set_title(f"Against ranks: L = 120 — {scaling['date']}, {_short(scaling['machine'])}\n"
                   "dotted: the single-process scipy loop (peer)", fontsize=9)
    left.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)

    run = cluster[0]
    series = {}
    for x in run["results"]:
        if x["role"] != "mpinn":
            continue
        key = (x["strategy"], x["exchange"], x["drop_dead"])
        series.setdefault(key, {})[x["link"]] = x["value"]
    for (strategy, exchange, dead), values in sorted(series.items()):
        links = [link for link in LINKS if link in values]
        right.plot([LINKS.index(link) for link in links], [values[link] for link in links],
                   marker="o", linestyle="-" if strategy == "mincut" else "--",
                   label=f"{strategy}, {exchange}{', dead dropped' if dead else ''}")
    single = next(x["value"] for x in run["results"] if x["role"] == "peer")
    right.axhline(single, color="grey", linestyle=":", label=f"1 rank, one host ({single:.2f})")
    right.set_xticks(range(len(LINKS)), [LINK_LABELS[link] for link in LINKS], fontsize=8)
    right.set_xlabel("link between the 2 nodes (2 ranks each)")
    right.set_ylabel("G edges/s (higher is better)")
    right.set_title(f"Against the link: N = 1024, L = 120 — {run['date']}, 2 simulated nodes",
                    fontsize=9)
    right.set_ylim(0, None)
    right.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def servers(runs: list[dict[str, Any]], out: Path) -> None:
    """Samples/s of two servers per link, mpinn and the PyTorch peers, against one server
    and twice its GEMM ceiling."""
    import matplotlib.pyplot as plt
    run = runs[0]
    links = [link for link in LINKS if any(x["link"] == link for x in run["results"])]
    names = list(dict.fromkeys(x["name"] for x in run["results"] if x["servers"] == 2))
    fig, ax = plt.subplots(figsize=(8, 5))
    width = 0.8 / len(names)
    colours = {names[0]: MPINN, **dict(zip(names[1:], (PEER, "tab:brown"), strict=False))}
    for i, name in enumerate(names):
        values = [next((x["value"] for x in run["results"]
                        if x["name"] == name and x["link"] == link), 0) for link in links]
        positions = [j + (i - (len(names) - 1) / 2) * width for j in range(len(links))]
        ax.bar(positions, values, width, color=colours[name], label=name)
        for p, v in zip(positions, values, strict=True):
            ax.text(p, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    one = next(x["value"] for x in run["results"] if x["servers"] == 1 and x["role"] == "mpinn")
    ceiling = next(x["value"] for x in run["results"] if x["role"] == "ceiling")
    ax.axhline(one, color="grey", linestyle=":", label=f"mpinn, 1 server ({one:.0f})")
    ax.axhline(2 * ceiling, color=CEILING, linestyle="--",
               label=f"ceiling: 2 x one server's GEMM peak ({2 * ceiling:.0f})")
    ax.set_xticks(range(len(links)), [LINK_LABELS[link] for link in links], fontsize=8)
    ax.set_xlabel("link between the 2 servers")
    ax.set_ylabel("samples/s (higher is better)")
    ax.set_ylim(0, 2 * ceiling * 1.4)
    ax.set_title(f"Training across 2 servers: {run['title']}\n{run['date']}, simulated servers "
                 "(network namespaces) on a 2-core VM", fontsize=9)
    ax.legend(fontsize=8, loc="upper left", ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def exchange(runs: list[dict[str, Any]], out: Path) -> None:
    """The rate of each exchange kind by link: the dense MLP in samples/s, the Sparse DNN
    (balanced and mincut) in G edges/s, one panel each, the Alltoallv the reference."""
    import matplotlib.pyplot as plt
    run = runs[0]
    panels = [("dense", "balanced"), ("sparse", "balanced"), ("sparse", "mincut")]
    kinds = list(dict.fromkeys(x["exchange"] for x in run["results"]))
    colours = dict(zip(kinds, (MPINN, "tab:green", "tab:purple", "tab:olive"), strict=False))
    fig, axes = plt.subplots(1, len(panels), figsize=(13, 5.4))
    for ax, (work, strategy) in zip(axes, panels, strict=True):
        rows = [x for x in run["results"] if x["work"] == work and x["strategy"] == strategy]
        links = [link for link in LINKS if any(x["link"] == link for x in rows)]
        width = 0.8 / len(kinds)
        for i, kind in enumerate(kinds):
            cells = [next(x for x in rows if x["link"] == link and x["exchange"] == kind)
                     for link in links]
            positions = [j + (i - (len(kinds) - 1) / 2) * width for j in range(len(links))]
            ax.bar(positions, [x["value"] for x in cells], width, color=colours[kind], label=kind)
            for p, x in zip(positions, cells, strict=True):
                ax.text(p, x["value"], f"x{x['vs_alltoallv']:.2f}", ha="center", va="bottom",
                        fontsize=6, rotation=90)
        ax.set_xticks(range(len(links)), [LINK_LABELS[link] for link in links], fontsize=7)
        ax.set_xlabel("4 ranks: on one host, or 2 nodes x 2 ranks by link")
        unit = rows[0]["unit"]
        ax.set_ylabel(f"{unit}, best round (higher is better)")
        ax.set_ylim(0, max(x["value"] for x in rows) * 1.3)
        name = "dense MLP 784-1024x3-10" if work == "dense" else "Sparse DNN N = 1024, L = 120"
        ax.set_title(f"{name}, {strategy}", fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(kinds), fontsize=8,
               title="--exchange", title_fontsize=8)
    fig.suptitle(f"Exchange kinds, {run['date']}, 2-core VM, quiet; 2 simulated nodes "
                 "(x: the rate against the Alltoallv's)", fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(out, dpi=110)
    plt.close(fig)


def draw_all(here: Path, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    out.mkdir(exist_ok=True)
    runs = {p.stem: json.loads(p.read_text())["runs"] for p in here.glob("*.json")}
    train_mlp(runs["train_mlp"], out / "train_mlp.png")
    cost_model(runs["train_mlp"], out / "cost_model.png")
    sparse_dnn(runs["sparse_dnn"], runs["cluster"], out / "sparse_dnn.png")
    servers(runs["servers"], out / "servers.png")
    exchange(runs["exchange"], out / "exchange.png")


if __name__ == "__main__":
    draw_all(Path(__file__).resolve().parent, Path(__file__).resolve().parent / "_plots")
