"""Data files as a rank sees them, and generators of synthetic data sets.

A rank loads only the input features it owns (the neurons of layer 0 in its shard) and,
for float targets, only the target columns of the output neurons it owns. Integer labels
are small and read by every rank.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np
from mpi4py import MPI

from mpinn._testing.faults import inject_fault
from mpinn.comm.collectives import SUM, agree, allreduce, first_difference, take_turn
from mpinn.errors import MpinnError
from mpinn.io import hdf5
from mpinn.io.hdf5 import MPI_IO, opened, write_slice
from mpinn.io.schema import _links_refused
from mpinn.io.staging import staged
from mpinn.partition.metadata import MetadataTable

# ---------------------------------------------------------------- data files


@dataclass(frozen=True)
class DataSpec:
    """What a data file holds: ``X`` (samples, features) and labels or targets ``y``."""

    path: str
    n_samples: int
    n_features: int
    labels: bool  # y holds int class labels (else float targets, one per output)


def read_data_spec(f: h5py.File, n_inputs: int, n_outputs: int) -> DataSpec:
    """Validate a data file's shapes against the model's input and output sizes."""
    with _links_refused(f):
        return _read_data_spec(f, n_inputs, n_outputs)


def _read_data_spec(f: h5py.File, n_inputs: int, n_outputs: int) -> DataSpec:
    name = f.filename
    for key in ("X", "y"):
        if key not in f or not isinstance(f[key], h5py.Dataset):
            raise MpinnError(f"{name}: missing dataset {key!r}")
    x, y = f["X"], f["y"]
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype,
                                                                             np.complexfloating):
        raise MpinnError(f"{name}: X must be a 2-D array of real numbers, got {x.dtype} "
                         f"of shape {x.shape}")
    if x.shape[0] == 0:
        raise MpinnError(f"{name}: X holds no samples")
    if x.shape[1] != n_inputs:
        raise MpinnError(f"{name}: X has {x.shape[1]} features but the model has "
                         f"{n_inputs} inputs")
    labels = targets_are_labels(f"{name}: ", "X", int(x.shape[0]), y.shape, y.dtype, n_outputs)
    return DataSpec(name, int(x.shape[0]), int(x.shape[1]), labels)


def targets_are_labels(where: str, x_name: str, n_samples: int, y_shape: tuple[int, ...],
                       y_dtype: np.dtype, n_outputs: int) -> bool:
    """Whether y holds integer class labels (True) or float targets, one per output (False),
    for ``n_samples`` samples of ``x_name``; anything else is refused. Shared by data files
    and the API's in-memory arrays."""
    if tuple(y_shape[:1]) != (n_samples,):
        raise MpinnError(f"{where}y has {y_shape[0] if len(y_shape) else 0} rows but {x_name} "
                         f"has {n_samples}")
    if len(y_shape) == 1 and np.issubdtype(y_dtype, np.integer):
        return True
    if len(y_shape) == 2 and y_shape[1] == n_outputs and np.issubdtype(y_dtype, np.floating):
        return False
    raise MpinnError(f"{where}y must be integer labels of shape ({n_samples},) or float "
                     f"targets of shape ({n_samples}, {n_outputs}); got {y_dtype} {tuple(y_shape)}")


def count_samples(path: str) -> int:
    """Samples in a data file, read by this process alone before any work: batches and
    their buffers are never sized beyond them, and an empty file is refused up front."""
    with opened(path, "r", MPI.COMM_SELF) as f:
        if "X" not in f or not isinstance(f["X"], h5py.Dataset) or f["X"].ndim != 2:
            raise MpinnError(f"{path}: missing 2-D dataset 'X' (samples, features)")
        if f["X"].shape[0] == 0:
            raise MpinnError(f"{path}: X holds no samples")
        return int(f["X"].shape[0])


def write_data(path: str, x: np.ndarray, y: np.ndarray, attrs: dict[str, Any] | None = None,
               extra: dict[str, np.ndarray] | None = None) -> None:
    """Write a data file from one process (generators and converters), complete before it
    appears under its name; ``extra`` datasets go beside X and y (the challenge's
    ``categories``)."""
    with staged(path) as partial, h5py.File(partial, "w") as f:
        f.create_dataset("X", data=x)
        f.create_dataset("y", data=y)
        for key, value in (extra or {}).items():
            f.create_dataset(key, data=value)
        for key, value in (attrs or {}).items():
            f.attrs[key] = value


def write_outputs(path: str, n_samples: int, n_outputs: int, columns: np.ndarray,
                  values: np.ndarray, comm: MPI.Comm) -> None:
    """Collectively write ``outputs`` (samples, outputs); each rank writes its owned columns.

    ``values`` is neuron-major (owned outputs, samples) as the engine produces it.
    """
    if MPI_IO:
        with opened(path, "w", comm) as f:
            dset = f.create_dataset("outputs", (n_samples, n_outputs), values.dtype)
            write_slice(dset, columns, np.ascontiguousarray(values.T), axis=1)
        return
    with take_turn(comm), opened(path, "w" if comm.rank == 0 else "r+", comm) as f:
        if comm.rank == 0:
            f.create_dataset("outputs", (n_samples, n_outputs), values.dtype)
        write_slice(f["outputs"], columns, np.ascontiguousarray(values.T), axis=1)
    comm.Barrier()


@dataclass
class LocalData:
    """One rank's view of a data file, neuron-major."""

    spec: DataSpec
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


def load(path: str, table: MetadataTable, dtype: np.dtype, comm: MPI.Comm,
         group: MPI.Comm | None = None) -> LocalData:
    """Read this rank's columns of ``path`` and validate them (collective).

    ``group``: the ranks ``table`` partitions (one replica group, ``ReplicaGroups``), when
    ``comm`` holds several copies of the model; each group reads the file on its own."""
    n_in, n_out = table.sizes[0], table.sizes[-1]
    group = comm if group is None else group
    with hdf5.opened(path, "r", group) as f:
        spec = agree(comm, lambda: read_data_spec(f, n_in, n_out))
        inject_fault("data", comm.rank)
        inputs = table.rows(0, group.rank)
        outputs = table.rows(len(table.sizes) - 1, group.rank)
        agree(comm, lambda: _check_fits(spec, inputs.size, outputs.size))
        features = np.ascontiguousarray(hdf5.read_slice(f["X"], inputs, axis=1).T, dtype=dtype)
        labels = targets = None
        if spec.labels:
            labels = hdf5.read_whole(f["y"]).astype(np.int64)
        else:
            targets = np.ascontiguousarray(hdf5.read_slice(f["y"], outputs, axis=1).T, dtype=dtype)

    agree(comm, lambda: _check_values(path, features, inputs, labels, targets, n_out))
    return LocalData(spec, features, labels, targets)


def _check_fits(spec: DataSpec, n_inputs: int, n_outputs: int) -> None:
    """Refuse, before anything is read, a data file whose declared samples would not fit:
    this rank's feature columns as read and as converted, its target or label column and
    its outputs, 8 bytes a value at most (a hostile file can declare 10^12 rows in 2 KB)."""
    need = spec.n_samples * (2 * n_inputs + 3 * n_outputs + 1) * 8
    available = hdf5.available_memory()
    if need > available:
        raise MpinnError(f"{spec.path}: X declares {spec.n_samples:,} samples; this rank's columns "
                         f"of them need about {need / 2**30:.1f} GiB but only "
                         f"{available / 2**30:.1f} GiB are available")


def _check_values(source: str, features: np.ndarray, inputs: np.ndarray, labels: np.ndarray | None,
                  targets: np.ndarray | None, n_out: int) -> None:
    """Refuse a NaN or infinite feature or target, or a label outside the model's classes."""
    if not np.all(np.isfinite(features)):
        col = inputs[np.flatnonzero(~np.isfinite(features).all(axis=1))[0]]
        raise MpinnError(f"{source}: X has a NaN or infinite value in feature {col}")
    if targets is not None and not np.all(np.isfinite(targets)):
        raise MpinnError(f"{source}: y has a NaN or infinite target")
    if labels is not None and labels.size and (labels.min() < 0 or labels.max() >= n_out):
        bad = int(labels.min()) if labels.min() < 0 else int(labels.max())
        raise MpinnError(f"{source}: label {bad} is out of range 0..{n_out - 1} "
                         f"for a model with {n_out} outputs")


SOFT_LABEL_TOLERANCE = 1e-4  # how far from 1 a soft label's sum may be (float32 rounding)


def check_distributions(data: LocalData, group: MPI.Comm, comm: MPI.Comm) -> None:
    """Refuse float targets for a softmax output unless every sample's targets form a
    probability distribution (non-negative, summing to 1): those train as soft labels with
    cross-entropy; anything else (regression targets) would train silently towards values a
    softmax cannot take. ``group`` holds each output column once (one replica group): the
    sums over my columns are added over it; ``comm``: every rank, which agree on the error.
    Collective; one allreduce of a float per sample."""
    if data.targets is None:
        return
    sums = np.ascontiguousarray(data.targets.sum(axis=0, dtype=np.float64))
    allreduce(group, sums, SUM)

    def check() -> None:
        advice = ("a softmax output trains float targets as soft labels (cross-entropy against "
                  "probability distributions: non-negative, summing to 1 over the outputs); for "
                  "other targets make the output identity (--output identity, "
                  "Network.create(output=\"identity\"))")
        negative = np.flatnonzero((data.targets < 0).any(axis=0))
        if negative.size:
            raise MpinnError(f"{data.spec.path}: y of sample {negative[0]} has a negative target; "
                             f"{advice}")
        off = np.flatnonzero(np.abs(sums - 1.0) > SOFT_LABEL_TOLERANCE)
        if off.size:
            raise MpinnError(f"{data.spec.path}: y of sample {off[0]} sums to {sums[off[0]]:.6g}, "
                             f"not 1; {advice}")

    agree(comm, check)


def from_arrays(x: object, y: object | None, table: MetadataTable, dtype: np.dtype,
                comm: MPI.Comm, name: str = "X", source: str = "the arrays",
                group: MPI.Comm | None = None) -> LocalData:
    """This rank's view of in-memory arrays ``x`` (samples, features) and ``y`` (collective).

    ``x`` and ``y`` must be the same on every rank (as after loading the same file or
    drawing from the same seed); each rank copies only its own feature columns (and, for
    float targets, its own output columns), neuron-major, as ``load`` does from a file.
    ``y`` None gives features only (prediction). The ranks compare shapes, dtypes and a
    CRC-32 of every byte of ``x`` and ``y`` (one allgather), and refuse data that differs:
    a difference in any single row would otherwise train each rank on other data.
    ``group``: the ranks ``table`` partitions, as in ``load``.
    """
    rank = (comm if group is None else group).rank
    n_in, n_out = table.sizes[0], table.sizes[-1]

    def spec() -> tuple[DataSpec, np.ndarray, np.ndarray | None]:
        xs = np.asarray(x)
        if xs.ndim != 2 or not np.issubdtype(xs.dtype, np.number):
            raise MpinnError(f"{name} must be a 2-D numeric array (samples, features), got "
                             f"{xs.dtype} of shape {xs.shape}")
        if xs.shape[1] != n_in:
            raise MpinnError(f"{name} has {xs.shape[1]} features but the model has {n_in} inputs")
        if y is None:
            return DataSpec(name, xs.shape[0], n_in, False), xs, None
        ys = np.asarray(y)
        labels = targets_are_labels("", name, xs.shape[0], ys.shape, ys.dtype, n_out)
        return DataSpec(name, xs.shape[0], n_in, labels), xs, ys

    data_spec, xs, ys = agree(comm, spec)
    differs = first_difference(comm, _digest(xs, ys))
    if differs is not None:
        raise MpinnError(f"{source}: {name} and y must be the same on every rank, but rank "
                         f"{differs}'s differ from rank 0's (load or draw them alike on every "
                         "rank, or pass a data file)", agreed=True)
    inputs = table.rows(0, rank)
    features = np.ascontiguousarray(xs[:, inputs].T, dtype=dtype)
    labels = targets = None
    if ys is not None and data_spec.labels:
        labels = ys.astype(np.int64)
    elif ys is not None:
        outputs = table.rows(len(table.sizes) - 1, rank)
        targets = np.ascontiguousarray(ys[:, outputs].T, dtype=dtype)
    agree(comm, lambda: _check_values(source, features, inputs, labels, targets, n_out))
    return LocalData(data_spec, features, labels, targets)


DIGEST_CHUNK_BYTES = 16 * 2**20  # rows are copied to contiguous memory this much at a time


def _digest(x: np.ndarray, y: np.ndarray | None) -> tuple:
    """Shapes, dtypes and a CRC-32 of all of ``x`` and ``y``: any row differing between
    ranks changes it. About 0.07 s for 60,000 x 784 float32 (188 MB, measured), next to seconds for
    one epoch; a strided array is copied a chunk of rows at a time, never whole."""
    crc = 0
    for array in (x, y) if y is not None else (x,):
        rows = max(1, DIGEST_CHUNK_BYTES // max(1, array[:1].nbytes))
        for start in range(0, array.shape[0], rows):
            crc = zlib.crc32(np.ascontiguousarray(array[start:start + rows]).data, crc)
    return (x.shape, str(x.dtype), None if y is None else (y.shape, str(y.dtype)), crc)


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
