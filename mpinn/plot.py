"""PNG pictures for people: training curves from a --log-json file, and what a partition costs.

Needs matplotlib (``pip install mpinn[plot]``); drawn off-screen with the Agg backend.
"""

from __future__ import annotations

import json

import numpy as np

from mpinn.errors import MpinnError
from mpinn.metadata import MetadataTable


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
    epochs = [r["epoch"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(epochs, [r["loss"] for r in records], marker="o", label="training")
    axes[0].set(title="loss", xlabel="epoch", yscale="log")
    if all(r.get("accuracy") is not None for r in records):
        axes[1].plot(epochs, [r["accuracy"] for r in records], marker="o", color="tab:green",
                     label="training")
    axes[1].set(title="accuracy", xlabel="epoch")
    # train --val-data / fit(validation_data=...) records: validation beside training
    for ax, key in ((axes[0], "val_loss"), (axes[1], "val_accuracy")):
        if all(r.get(key) is not None for r in records):
            ax.plot(epochs, [r[key] for r in records], marker="s", linestyle="--",
                    color="tab:red", label="validation")
            ax.legend()
    axes[2].plot(epochs, [r["samples_per_second"] for r in records], marker="o", color="tab:orange")
    axes[2].set(title="samples/s", xlabel="epoch")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def partition_picture(table: MetadataTable, traffic: np.ndarray, title: str, out: str) -> None:
    """Heat map of forward bytes per sample between each pair of ranks (``traffic``, sender
    x receiver, from ``describe.rank_traffic``), and neurons per rank per layer."""
    plt = _pyplot()
    p = table.nranks
    counts = np.array([table.counts(layer) for layer in range(len(table.sizes))])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4))
    image = left.imshow(traffic, cmap="viridis")
    left.set(title="forward bytes per sample, sender -> receiver", xlabel="receiving rank",
             ylabel="sending rank", xticks=range(p), yticks=range(p))
    for s in range(p):
        for d in range(p):
            left.text(d, s, f"{traffic[s, d]:,}", ha="center", va="center", fontsize=8,
                      color="white" if traffic[s, d] < traffic.max() / 2 else "black")
    fig.colorbar(image, ax=left, shrink=0.8)
    bottom = np.zeros(len(table.sizes))
    for rank in range(p):
        right.bar(range(len(table.sizes)), counts[:, rank], bottom=bottom, label=f"rank {rank}")
        bottom += counts[:, rank]
    right.set(title="neurons per rank in each layer", xlabel="layer (0 = inputs)",
              ylabel="neurons", xticks=range(len(table.sizes)))
    right.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
