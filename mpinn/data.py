"""Data files as a rank sees them, and generators of synthetic data sets.

A rank loads only the input features it owns (the neurons of layer 0 in its shard) and,
for float targets, only the target columns of the output neurons it owns. Integer labels
are small and read by every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from mpinn import format as fmt
from mpinn.errors import MpinnError, inject_fault
from mpinn.exchange import agree
from mpinn.metadata import MetadataTable


@dataclass
class LocalData:
    """One rank's view of a data file, neuron-major."""

    spec: fmt.DataSpec
    features: np.ndarray        # (owned inputs, samples)
    labels: np.ndarray | None   # (samples,) int64 class labels, or None
    targets: np.ndarray | None  # (owned outputs, samples) float targets, or None

    @property
    def n_samples(self) -> int:
        return self.spec.n_samples

    def batch(self, index: np.ndarray, features_out: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Features, labels and targets of the samples ``index``."""
        n = index.size
        x = (np.take(self.features, index, axis=1, out=features_out[:, :n])
             if features_out is not None else self.features[:, index])
        labels = self.labels[index] if self.labels is not None else None
        targets = self.targets[:, index] if self.targets is not None else None
        return x, labels, targets


def load(path: str, table: MetadataTable, dtype: np.dtype, comm: MPI.Comm) -> LocalData:
    """Read this rank's columns of ``path`` and validate them (collective)."""
    n_in, n_out = table.sizes[0], table.sizes[-1]
    with fmt.opened(path, "r", comm) as f:
        spec = agree(comm, lambda: fmt.read_data_spec(f, n_in, n_out))
        inject_fault("data", comm.rank)
        inputs = table.rows(0, comm.rank)
        features = np.ascontiguousarray(fmt.read_slice(f["X"], inputs, axis=1).T, dtype=dtype)
        labels = targets = None
        if spec.labels:
            labels = fmt.read_whole(f["y"]).astype(np.int64)
        else:
            outputs = table.rows(len(table.sizes) - 1, comm.rank)
            targets = np.ascontiguousarray(fmt.read_slice(f["y"], outputs, axis=1).T, dtype=dtype)

    def check() -> None:
        if not np.all(np.isfinite(features)):
            col = inputs[np.flatnonzero(~np.isfinite(features).all(axis=1))[0]]
            raise MpinnError(f"{path}: X has a NaN or infinite value in feature {col}")
        if targets is not None and not np.all(np.isfinite(targets)):
            raise MpinnError(f"{path}: y has a NaN or infinite target")
        if labels is not None and labels.size and (labels.min() < 0 or labels.max() >= n_out):
            bad = int(labels.min()) if labels.min() < 0 else int(labels.max())
            raise MpinnError(f"{path}: label {bad} is out of range 0..{n_out - 1} "
                             f"for a model with {n_out} outputs")

    agree(comm, check)
    return LocalData(spec, features, labels, targets)


def synthetic_classification(n_samples: int, n_features: int, n_classes: int, seed: int,
                             dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs, one per class, in [0, 1]-ish feature space; learnable but not trivial."""
    if min(n_samples, n_features, n_classes) < 1:
        raise MpinnError("synthetic data needs at least 1 sample, feature and class")
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0.0, 1.0, size=(n_classes, n_features))
    labels = rng.integers(0, n_classes, size=n_samples)
    x = centres[labels] + rng.normal(0.0, 0.25, size=(n_samples, n_features))
    return x.astype(dtype), labels.astype(np.int64)


def synthetic_regression(n_samples: int, n_features: int, n_outputs: int, seed: int,
                         dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """Targets from a fixed random tanh map of the inputs, for regression runs."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_samples, n_features))
    w = rng.normal(size=(n_features, n_outputs)) / np.sqrt(n_features)
    return x.astype(dtype), np.tanh(x @ w).astype(dtype)
