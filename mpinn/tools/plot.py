"""PNG pictures for people: training curves from a --log-json file, and what a partition costs.

Needs matplotlib (``pip install mpinn[plot]``); drawn off-screen with the Agg backend.
"""

from __future__ import annotations

import json

import numpy as np

from mpinn.errors import MpinnError
from mpinn.io.staging import staged
from mpinn.partition.metadata import MetadataTable


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise MpinnError("plotting needs matplotlib: pip install 'mpinn[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def training_curves(log_path: str, out: str) -> None:
    """Loss, accuracy and samples/s per epoch from ``train --log-json`` records."""
    try:
        with open(log_path) as fh:
            records = [json.loads(line) for line in fh if line.strip()]
    except OSError as exc:
        raise MpinnError(f"{log_path}: cannot read ({exc.strerror})") from None
    except ValueError as exc:  # not UTF-8, or not JSON
        raise MpinnError(f"{log_path}: not a --log-json file ({exc})") from None
    keys = ("epoch", "loss", "samples_per_second")
    if not all(isinstance(r, dict) and all(k in r for k in keys) for r in records):
        raise MpinnError(f"{log_path}: not a --log-json file (records need {', '.join(keys)})")
    if not records:
        raise MpinnError(f"{log_path}: no epochs recorded")
    plt = _pyplot()
    runs = split_runs(records)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    several = len(runs) > 1
    for k, run in enumerate(runs):
        # one run: the colours of old; several: one colour per run, no line joining them
        tag = f"run {k + 1} " if several else ""
        color = dict.fromkeys(("loss", "accuracy", "val", "speed"), f"C{k}") if several else \
            {"loss": "tab:blue", "accuracy": "tab:green", "val": "tab:red", "speed": "tab:orange"}
        epochs = [r["epoch"] for r in run]
        axes[0].plot(epochs, [r["loss"] for r in run], marker="o", color=color["loss"],
                     label=f"{tag}training")
        if all(r.get("accuracy") is not None for r in run):
            axes[1].plot(epochs, [r["accuracy"] for r in run], marker="o",
                         color=color["accuracy"], label=f"{tag}training")
        # train --val-data / fit(validation_data=...) records: validation beside training
        for ax, key in ((axes[0], "val_loss"), (axes[1], "val_accuracy")):
            if all(r.get(key) is not None for r in run):
                ax.plot(epochs, [r[key] for r in run], marker="s", linestyle="--",
                        color=color["val"], label=f"{tag}validation")
        axes[2].plot(epochs, [r["samples_per_second"] for r in run], marker="o",
                     color=color["speed"], label=tag.strip() or None)
    axes[0].set(title="loss", xlabel="epoch", yscale="log")
    axes[1].set(title="accuracy", xlabel="epoch")
    axes[2].set(title="samples/s", xlabel="epoch")
    for ax in axes:
        if len(runs) > 1 or any(line.get_label() == "validation" for line in ax.get_lines()):
            ax.legend(fontsize=7 if len(runs) > 1 else None)
    fig.tight_layout()
    with staged(out) as partial:
        fig.savefig(partial, dpi=110, format="png")
    plt.close(fig)


def split_runs(records: list[dict]) -> list[list[dict]]:
    """The records of each run in a log that several runs appended to: a run starts at a
    record marked ``run_start`` (``train.epoch_reporter``), or, in logs from before that
    mark, where the epoch does not grow (a model made anew, or another model's run)."""
    runs: list[list[dict]] = []
    for record in records:
        previous = runs[-1][-1]["epoch"] if runs else None
        numbers = all(isinstance(e, (int, float)) and not isinstance(e, bool)
                      for e in (previous, record["epoch"]))
        if not runs or record.get("run_start") is True or (numbers and record["epoch"] <= previous):
            runs.append([])
        runs[-1].append(record)
    return runs


MAX_BARS = 24  # beyond this many distinct layer groups the ownership is drawn as a heat map


def layer_groups(counts: np.ndarray) -> list[tuple[int, int]]:
    """Runs of consecutive layers with the same neurons per rank, as (first, last) layers:
    a 121-layer RadiX-Net network of identical layers is three groups, not 121 bars."""
    groups: list[tuple[int, int]] = []
    for layer in range(len(counts)):
        if groups and np.array_equal(counts[layer], counts[groups[-1][1]]):
            groups[-1] = (groups[-1][0], layer)
        else:
            groups.append((layer, layer))
    return groups


def partition_picture(table: MetadataTable, traffic: np.ndarray, title: str, out: str) -> None:
    """Heat map of forward bytes per sample between each pair of ranks (``traffic``, sender
    x receiver, from ``partition.traffic.rank_traffic``), and each rank's share of every layer.

    Shares, not neuron counts, so a 10-neuron output layer shows beside 1024-neuron ones;
    runs of identical layers are one bar, and a deep model with many distinct layers is a
    rank x layer heat map with thinned layer labels.
    """
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    p = table.nranks
    counts = np.array([table.counts(layer) for layer in range(len(table.sizes))])
    sizes = np.asarray(table.sizes)
    share = counts / sizes[:, None]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    image = left.imshow(traffic, cmap="viridis")
    left.set(title="forward bytes per sample, sender -> receiver", xlabel="receiving rank",
             ylabel="sending rank")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.yaxis.set_major_locator(MaxNLocator(integer=True))
    if p <= 8:  # numbers stay legible up to 8 x 8 cells
        for s in range(p):
            for d in range(p):
                left.text(d, s, f"{traffic[s, d]:,}", ha="center", va="center", fontsize=8,
                          color="white" if traffic[s, d] < traffic.max() / 2 else "black")
    fig.colorbar(image, ax=left, shrink=0.8)
    groups = layer_groups(counts)
    if len(groups) <= MAX_BARS:
        bottom = np.zeros(len(groups))
        firsts = [first for first, _ in groups]
        for rank in range(p):
            right.bar(range(len(groups)), share[firsts, rank], bottom=bottom,
                      label=f"rank {rank}")
            bottom += share[firsts, rank]
        labels = [f"{a}" if a == b else f"{a}-{b}\n(x{b - a + 1})" for a, b in groups]
        right.set_xticks(range(len(groups)), labels, fontsize=8 if len(groups) <= 12 else 6)
        for x, (first, _) in enumerate(groups):
            right.text(x, 1.01, f"{sizes[first]:,}", ha="center", va="bottom", fontsize=7)
        right.set(title="share of each layer per rank (neurons on top)", ylim=(0, 1.12),
                  xlabel="layer (0 = inputs; runs of identical layers grouped)",
                  ylabel="fraction of the layer's neurons")
        if p <= 16:
            right.legend(fontsize=7, loc="lower right", ncol=1 + p // 9)
    else:
        heat = right.imshow(share.T, aspect="auto", cmap="magma", vmin=0, vmax=1,
                            interpolation="nearest")
        right.set(title="share of each layer per rank", xlabel="layer (0 = inputs)",
                  ylabel="rank")
        right.xaxis.set_major_locator(MaxNLocator(nbins=12, integer=True))
        right.yaxis.set_major_locator(MaxNLocator(integer=True))
        fig.colorbar(heat, ax=right, shrink=0.8, label="fraction of the layer's neurons")
    fig.suptitle(title)
    fig.tight_layout()
    with staged(out) as partial:
        fig.savefig(partial, dpi=110, format="png")
    plt.close(fig)


# what each category of span is drawn as in a timeline (trace.py's categories)
TIMELINE_COLORS = {"compute": "tab:blue", "pack": "tab:orange", "wait": "tab:red",
                   "optimizer": "tab:green", "io": "tab:purple", "validation": "tab:gray",
                   "data": "tab:brown", "exchange": "tab:olive"}


def read_trace(path: str) -> tuple[dict[int, str], list[dict]]:
    """Rank names and complete spans of a ``--trace`` file."""
    try:
        with open(path) as fh:
            data = json.load(fh)
        events = data["traceEvents"]
        names = {e["pid"]: e["args"]["name"] for e in events if e.get("name") == "process_name"}
        spans = [e for e in events if e.get("ph") == "X"]
        for e in spans:
            float(e["ts"]), float(e["dur"]), e["pid"], e["tid"], e["cat"]  # noqa: B018
    except OSError as exc:
        raise MpinnError(f"{path}: cannot read ({exc.strerror})") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise MpinnError(f"{path}: not a --trace file ({type(exc).__name__}: {exc})") from None
    return names, spans


def timeline(trace_path: str, out: str) -> None:
    """One training step of every rank from a ``--trace`` file: per rank a lane of its work
    (compute, pack, wait, optimizer) and a lane of its exchanges in flight, for the step of
    median length in the second half of the run (past warm-up)."""
    names, spans = read_trace(trace_path)
    steps = sorted((e for e in spans if e["name"] == "step" and e["pid"] == 0),
                   key=lambda e: e["ts"])
    if not steps:
        raise MpinnError(f"{trace_path}: no training steps recorded")
    late = steps[len(steps) // 2:]
    chosen = sorted(late, key=lambda e: e["dur"])[len(late) // 2]
    index = steps.index(chosen)
    start, end = chosen["ts"], chosen["ts"] + chosen["dur"]
    ranks = sorted(names) or sorted({e["pid"] for e in spans})
    # the same step on every rank: its index among that rank's steps
    windows = {}
    for rank in ranks:
        own = sorted((e for e in spans if e["name"] == "step" and e["pid"] == rank),
                     key=lambda e: e["ts"])
        if index < len(own):
            windows[rank] = (own[index]["ts"], own[index]["ts"] + own[index]["dur"])
    start = min(w[0] for w in windows.values())
    end = max(w[1] for w in windows.values())
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(13, 1.0 + 0.9 * len(ranks)))
    labels, seen = [], set()
    for lane, rank in enumerate(ranks):
        base = (len(ranks) - 1 - lane) * 2
        for e in spans:
            if e["pid"] != rank or e["cat"] not in TIMELINE_COLORS:
                continue
            lo, hi = e["ts"], e["ts"] + e["dur"]
            if hi < start or lo > end:
                continue
            y = base + (0.0 if e["tid"] != 0 else 1.0)  # exchanges and their parts below
            cat = e["cat"]
            ax.broken_barh([((lo - start) / 1e3, e["dur"] / 1e3)], (y + 0.1, 0.8),
                           facecolors=TIMELINE_COLORS[cat],
                           label=cat if cat not in seen else None)
            seen.add(cat)
        labels += [(base + 0.5, f"{names.get(rank, f'rank {rank}')}: exchanges"),
                   (base + 1.5, f"{names.get(rank, f'rank {rank}')}: work")]
    ax.set_yticks([y for y, _ in labels], [text for _, text in labels])
    ax.set_xlabel("ms from the start of the step")
    ax.set_title(f"{trace_path}: step {index + 1} of {len(steps)} "
                 f"({(end - start) / 1e3:.1f} ms)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.55 / len(ranks)), ncols=len(seen),
              fontsize="small", frameon=False)
    fig.tight_layout()
    with staged(out) as partial:
        fig.savefig(partial, format="png", dpi=110)
    plt.close(fig)
