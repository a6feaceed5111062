"""The HDF5 model and data format (v1): schema, validation, and rank-slice reads and writes.

Every file access of mpinn goes through this module. A rank reads and writes only its own
rows: each access is one HDF5 selection built as the union of the rank's contiguous row
runs, issued collectively on the ``mpio`` driver so MPI-IO can merge the ranks' requests.
The format itself is documented in docs/format.md.
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np
from mpi4py import MPI

from mpinn.errors import MpinnError
from mpinn.io.hdf5 import available_memory, read_ranges, read_slice, runs, write_slice
from mpinn.kernels import (
    NEGATIVE_SLOPE,
    check_activation,
    check_cap,
    check_dropout,
    check_slope,
)

FORMAT_VERSION = 1
DTYPES = {"float32": np.dtype(np.float32), "float64": np.dtype(np.float64)}
STORAGES = ("dense", "csr")
MAX_NEURONS = 1 << 40  # a sizes attribute beyond this is refused before anything is allocated


@dataclass(frozen=True)
class LayerSpec:
    """One weight layer: connects layer ``index - 1`` (n_in neurons) to ``index`` (n_out)."""

    index: int
    n_in: int
    n_out: int
    activation: str
    storage: str  # "dense": weight (n_out, n_in); "csr": indptr, indices, data
    nnz: int = -1  # stored weights; n_out * n_in for dense layers
    cap: float | None = None  # relu_cap's ceiling
    negative_slope: float | None = None  # leaky_relu's slope below 0
    dropout: float = 0.0  # the rate training drops this hidden layer's activations at

    def __post_init__(self) -> None:
        if self.nnz < 0:
            object.__setattr__(self, "nnz", self.n_out * self.n_in)

    @property
    def sparse(self) -> bool:
        return self.storage == "csr"


@dataclass(frozen=True)
class ModelSpec:
    """What a model file declares, validated."""

    sizes: tuple[int, ...]
    layers: tuple[LayerSpec, ...]
    dtype: np.dtype

    @property
    def n_neurons(self) -> int:
        return int(sum(self.sizes))

    @property
    def n_parameters(self) -> int:
        return sum(ly.nnz + ly.n_out for ly in self.layers)


# ---------------------------------------------------------------- schema


@contextmanager
def _links_refused(f: h5py.File) -> Iterator[None]:
    """An object that cannot be opened (an external or dangling link) is a clear error
    naming the file, not a KeyError."""
    try:
        yield
    except KeyError as exc:
        reason = str(exc.args[0]) if exc.args else "unknown reason"
        raise MpinnError(f"{f.filename}: an object in the file cannot be opened ({reason}); "
                         "mpinn files hold no external or dangling links") from None


def read_spec(f: h5py.File) -> ModelSpec:
    """Validate the model file's declarations before anything large is read or allocated."""
    with _links_refused(f):
        return _read_spec(f)


def _read_spec(f: h5py.File) -> ModelSpec:
    name = f.filename
    if "mpinn_format_version" not in f.attrs:
        raise MpinnError(f"{name}: not an mpinn model (no mpinn_format_version attribute)")
    version = f.attrs["mpinn_format_version"]
    shown = np.asarray(version).tolist()
    if np.ndim(version) != 0 or not np.issubdtype(np.asarray(version).dtype, np.number) \
            or np.iscomplexobj(version):
        # "1" stored as text is no version 1: say what is stored, not "1 is not supported"
        kind = ("text" if isinstance(shown, (str, bytes)) else
                f"an array of shape {np.shape(version)}" if np.ndim(version) else
                f"a {np.asarray(version).dtype} value")
        if isinstance(shown, bytes):
            shown = shown.decode(errors="replace")
        raise MpinnError(f"{name}: format version {shown!r} is stored as {kind}, not a number "
                         f"(this mpinn reads version {FORMAT_VERSION}, an integer)")
    if version != FORMAT_VERSION:
        raise MpinnError(f"{name}: format version {shown} is not supported "
                         f"(this mpinn reads version {FORMAT_VERSION})")
    sizes = np.asarray(f.attrs.get("sizes", []))
    if sizes.ndim != 1 or sizes.size < 2 or not np.issubdtype(sizes.dtype, np.integer):
        raise MpinnError(f"{name}: attribute 'sizes' must be an integer array of at least 2 layers")
    if np.any(sizes < 1) or sizes.sum() > MAX_NEURONS:
        raise MpinnError(f"{name}: attribute 'sizes' {sizes.tolist()} has a layer with fewer than "
                         f"1 or a total above {MAX_NEURONS} neurons")
    sizes_t = tuple(int(n) for n in sizes)
    table_bytes = 4 * sum(sizes_t)  # the owner array the replicated metadata table is built from
    if table_bytes > available_memory():
        raise MpinnError(f"{name}: sizes {list(sizes_t)} declare {sum(sizes_t):,} neurons; their "
                         f"owner array alone ({table_bytes / 2**30:.1f} GiB) exceeds this "
                         f"machine's memory")
    if "layers" not in f:
        raise MpinnError(f"{name}: missing group /layers")
    layers, dtype = [], None
    for index in range(1, len(sizes_t)):
        where = f"{name}: /layers/{index}"
        if str(index) not in f["layers"]:
            raise MpinnError(f"{where} is missing (sizes declares {len(sizes_t) - 1} layers)")
        group = f["layers"][str(index)]
        activation = _text_attr(group, "activation", where)
        check_activation(activation, index == len(sizes_t) - 1, where)
        cap = check_cap(group.attrs.get("cap"), where) if activation == "relu_cap" else None
        slope = (check_slope(group.attrs.get("negative_slope", NEGATIVE_SLOPE), where)
                 if activation == "leaky_relu" else None)
        dropout = check_dropout(group.attrs.get("dropout", 0.0), index == len(sizes_t) - 1, where)
        storage = _text_attr(group, "storage", where)
        if storage not in STORAGES:
            raise MpinnError(f"{where}: unknown storage {storage!r} (known: {', '.join(STORAGES)})")
        n_in, n_out = sizes_t[index - 1], sizes_t[index]
        if storage == "dense":
            floats = {"weight": (n_out, n_in), "bias": (n_out,)}
            nnz = n_out * n_in
        else:
            nnz = _check_csr(group, where, n_in, n_out)
            floats = {"data": (nnz,), "bias": (n_out,)}
        for dset_name, shape in floats.items():
            dset = _dataset(group, dset_name, where)
            if dset.shape != shape:
                raise MpinnError(f"{where}/{dset_name} has shape {dset.shape}, but sizes "
                                 f"{list(sizes_t)} require {shape}")
            if dset.dtype not in DTYPES.values():
                raise MpinnError(f"{where}/{dset_name} has dtype {dset.dtype}; "
                                 "expected float32 or float64")
            if dtype is None:
                dtype = dset.dtype
            elif dset.dtype != dtype:
                raise MpinnError(f"{where}/{dset_name} is {dset.dtype} but earlier layers are {dtype}")
        layers.append(LayerSpec(index, n_in, n_out, activation, storage, nnz, cap, slope, dropout))
    return ModelSpec(sizes_t, tuple(layers), np.dtype(dtype))


def _dataset(group: h5py.Group, name: str, where: str) -> h5py.Dataset:
    if name not in group or not isinstance(group[name], h5py.Dataset):
        raise MpinnError(f"{where}: missing dataset {name!r}")
    return group[name]


def _check_csr(group: h5py.Group, where: str, n_in: int, n_out: int) -> int:
    """Shapes and ends of a CSR layer's structure; returns its number of stored weights.

    The per-row checks (indptr non-decreasing, indices in range and ascending) are made by
    each rank on the rows it reads (``check_csr_rows``), so no rank reads the whole layer.
    """
    indptr, indices = _dataset(group, "indptr", where), _dataset(group, "indices", where)
    for name, dset in (("indptr", indptr), ("indices", indices)):
        if dset.ndim != 1 or not np.issubdtype(dset.dtype, np.integer):
            raise MpinnError(f"{where}/{name} must be a 1-D integer array, got {dset.dtype} "
                             f"{dset.shape}")
    if indptr.shape != (n_out + 1,):
        raise MpinnError(f"{where}/indptr has shape {indptr.shape}; the layer's {n_out} neurons "
                         f"require ({n_out + 1},)")
    first, last = int(indptr[0]), int(indptr[n_out])
    if first != 0 or last != indices.shape[0]:
        raise MpinnError(f"{where}/indptr must run from 0 to the {indices.shape[0]} stored "
                         f"indices; it runs from {first} to {last}")
    return last


def check_csr_rows(where: str, row_ptr: np.ndarray, indices: np.ndarray, n_in: int) -> None:
    """Refuse a CSR slice whose pointers decrease or whose indices are out of range or not
    strictly ascending within a row (``row_ptr`` relative to ``indices``)."""
    counts = np.diff(row_ptr)
    if np.any(counts < 0):
        raise MpinnError(f"{where}/indptr decreases (row {int(np.argmax(counts < 0))} of the "
                         "rows read)")
    if indices.size and (indices.min() < 0 or indices.max() >= n_in):
        bad = int(indices.min()) if indices.min() < 0 else int(indices.max())
        raise MpinnError(f"{where}/indices holds {bad}, outside 0..{n_in - 1}")
    step = np.diff(indices)
    row_starts = row_ptr[1:-1][(row_ptr[1:-1] > 0) & (row_ptr[1:-1] < indices.size)]
    within = np.ones(step.size, dtype=bool)
    within[row_starts - 1] = False
    if np.any((step <= 0) & within):
        raise MpinnError(f"{where}/indices must be strictly ascending within each row "
                         "(sorted, no duplicate connections)")


def _text_attr(obj: h5py.HLObject, key: str, where: str) -> str:
    if key not in obj.attrs:
        raise MpinnError(f"{where}: missing attribute {key!r}")
    value = obj.attrs[key]
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        raise MpinnError(f"{where}: attribute {key!r} must be text, got {value!r}")
    return value


# ---------------------------------------------------------------- crash-safe writes


Partitions = dict[str, tuple[np.ndarray, int, str, dict[str, Any]]]


def read_partitions(f: h5py.File) -> Partitions:
    """Every partition stored in the file (replicated metadata, small)."""
    with _links_refused(f):
        return {name: read_partition(f, name) for name in list_partitions(f)}


@dataclass
class CsrRows:
    """A rank's rows of a CSR layer as read from the file."""

    row_ptr: np.ndarray  # (rows + 1,) offsets into ``indices``, from 0
    indices: np.ndarray  # input index of each stored weight, rows in order
    ranges: np.ndarray   # [start, stop) of these entries in the file's indices/data
    row_ends: np.ndarray  # indptr[row + 1] of each row, as in the file


def read_csr_rows(group: h5py.Group, rows: np.ndarray, where: str, n_in: int) -> CsrRows:
    """Collectively read the structure of ``rows`` (sorted) of a CSR layer and validate it.

    Both reads are made on every rank before anything is refused, so a rank that finds a
    broken slice never leaves the others waiting in a collective (wrap it in ``agree``).
    """
    rows = np.asarray(rows, dtype=np.int64)
    # starts and stops in two reads: the ranks' selections never overlap within one
    # collective read (OpenMPI 4.1's OMPIO returned wrong values for overlapping ones)
    starts = read_slice(group["indptr"], rows).astype(np.int64)
    stops = read_slice(group["indptr"], rows + 1).astype(np.int64)
    row_runs = runs(rows)
    first = np.searchsorted(rows, row_runs[:, 0])
    last = np.searchsorted(rows, row_runs[:, 1] - 1)
    ranges = (np.stack([starts[first], stops[last]], axis=1) if rows.size
              else np.zeros((0, 2), np.int64))
    problem = None
    if np.any(stops < starts):
        problem = f"{where}/indptr decreases (at row {int(rows[np.argmax(stops < starts)])})"
    elif ranges.size and (ranges.min() < 0 or ranges.max() > group["indices"].shape[0]):
        problem = f"{where}/indptr points outside the layer's {group['indices'].shape[0]} indices"
    indices = read_ranges(group["indices"], ranges if problem is None else ranges[:0])
    if problem is not None:
        raise MpinnError(problem)
    row_ptr = np.concatenate([[0], np.cumsum(stops - starts)]).astype(np.int64)
    check_csr_rows(where, row_ptr, indices.astype(np.int64), n_in)
    return CsrRows(row_ptr, indices.astype(np.int64), ranges, stops)


# ---------------------------------------------------------------- wiring, for partitioning


def read_row_nnz(f: h5py.File, spec: ModelSpec) -> list[np.ndarray]:
    """Stored weights per neuron of every layer (from indptr alone: metadata-sized)."""
    counts = []
    for ly in spec.layers:
        if ly.sparse:
            counts.append(np.diff(f["layers"][str(ly.index)]["indptr"][...].astype(np.int64)))
        else:
            counts.append(np.full(ly.n_out, ly.n_in, dtype=np.int64))
    return counts


def read_layer_wiring(f: h5py.File, ly: LayerSpec) -> tuple[np.ndarray, np.ndarray]:
    """(indptr, indices) of one CSR layer, read by this rank alone: for partitioning and
    traffic reports, one layer at a time, never the weights."""
    group = f["layers"][str(ly.index)]
    indptr = group["indptr"][...].astype(np.int64)
    indices = group["indices"][...].astype(np.int64)
    check_csr_rows(f"{f.filename}: /layers/{ly.index}", indptr, indices, ly.n_in)
    return indptr, indices


def read_layer(f: h5py.File, ly: LayerSpec) -> tuple[Any, np.ndarray]:
    """A whole layer read by this process alone, for converters and single-process baselines:
    its weight (dense (n_out, n_in), or a scipy CSR matrix, validated) and its bias."""
    group = f["layers"][str(ly.index)]
    if ly.sparse:
        import scipy.sparse as sp
        indptr, indices = read_layer_wiring(f, ly)
        weight = sp.csr_matrix((group["data"][...], indices, indptr), shape=(ly.n_out, ly.n_in))
    else:
        weight = group["weight"][...]
    return weight, group["bias"][...]


def wiring_reader(f: h5py.File, spec: ModelSpec
                  ) -> Callable[[int], tuple[np.ndarray, np.ndarray] | None]:
    """layer -> (indptr, indices) of that CSR layer, read when asked (None for a dense
    layer): what partitioning and traffic reports walk, a layer at a time."""
    return lambda i: read_layer_wiring(f, spec.layers[i - 1]) if spec.layers[i - 1].sparse else None


# ---------------------------------------------------------------- partitions


def read_partition(f: h5py.File, name: str) -> tuple[np.ndarray, int, str, dict[str, Any]]:
    """Owner array, rank count, strategy and params of the stored partition ``name``."""
    if "partitions" not in f or name not in f["partitions"]:
        known = ", ".join(f["partitions"].keys()) if "partitions" in f else "none"
        raise MpinnError(f"{f.filename}: no partition named {name!r} (stored: {known})")
    group = f["partitions"][name]
    if "owner" not in group:
        raise MpinnError(f"{f.filename}: partition {name!r} has no 'owner' dataset")
    owner = group["owner"]
    if owner.ndim != 1 or not np.issubdtype(owner.dtype, np.integer):
        raise MpinnError(f"{f.filename}: partition {name!r} 'owner' must be a 1-D integer array")
    n_neurons = int(np.asarray(f.attrs.get("sizes", [0])).sum())
    if owner.shape[0] != n_neurons:
        raise MpinnError(f"{f.filename}: partition {name!r} has {owner.shape[0]} owner entries "
                         f"but the model has {n_neurons} neurons")
    where = f"{f.filename}: partition {name!r}"
    nranks = np.asarray(group.attrs.get("nranks", -1))
    if nranks.ndim != 0 or not np.issubdtype(nranks.dtype, np.integer) or int(nranks) < 1:
        raise MpinnError(f"{where}: attribute 'nranks' must be a positive integer, "
                         f"got {nranks.tolist()!r}")
    strategy = _text_attr(group, "strategy", where)
    try:
        params = json.loads(_text_attr(group, "params", where))
    except json.JSONDecodeError:
        params = None
    if not isinstance(params, dict):
        raise MpinnError(f"{where}: attribute 'params' must be a JSON object") from None
    return owner[...].astype(np.int32), int(nranks), strategy, params


def list_partitions(f: h5py.File) -> list[str]:
    return sorted(f["partitions"].keys()) if "partitions" in f else []


def write_partition(f: h5py.File, name: str, owner: np.ndarray, nranks: int, strategy: str,
                    params: dict[str, Any], comm: MPI.Comm) -> None:
    """Store a partition (collective: every rank passes the same arguments)."""
    if not name or "/" in name:
        raise MpinnError(f"partition name {name!r} must be non-empty and contain no '/'")
    if name in f.get("partitions", {}):
        del f["partitions"][name]
    group = f.require_group("partitions").create_group(name)
    group.attrs["nranks"] = int(nranks)
    group.attrs["strategy"] = strategy
    group.attrs["params"] = json.dumps(params)
    dset = group.create_dataset("owner", owner.shape, np.int32)
    everything = np.arange(owner.size) if comm.rank == 0 else np.zeros(0, dtype=np.int64)
    write_slice(dset, everything, owner[everything])


# ---------------------------------------------------------------- commits

# a random id written into every model file as it is made (init, import, each checkpoint):
# ranks that read different ids read different commits (a network filesystem's stale copy)
CHECKPOINT_ID = "mpinn_checkpoint_id"
ID_BYTES = 8
ID_GLOB = "[0-9a-f]" * (2 * ID_BYTES)  # matches every id new_checkpoint_id makes


def new_checkpoint_id(comm: MPI.Comm) -> str:
    """A fresh commit id, the same on every rank of ``comm`` (collective)."""
    return comm.bcast(secrets.token_hex(ID_BYTES) if comm.rank == 0 else None, root=0)


def read_checkpoint_id(f: h5py.File) -> str | None:
    """The file's commit id; None for files written before ids existed."""
    value = f.attrs.get(CHECKPOINT_ID)
    return value.decode() if isinstance(value, bytes) else None if value is None else str(value)


# ---------------------------------------------------------------- training state


def read_state_attrs(f: h5py.File) -> dict[str, Any]:
    """Epoch, step, seed and optimizer settings recorded by the last save."""
    state = f.get("state")
    if state is None:
        return {"epoch": 0, "step": 0, "seed": 0}
    try:
        values = {key: json.loads(value) for key, value in state.attrs.items()}
    except (TypeError, ValueError):
        raise MpinnError(f"{f.filename}: /state holds an attribute that is not JSON text") from None
    for key in ("epoch", "step", "batch", "seed", "init_seed", "bad_epochs"):
        value = values.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise MpinnError(f"{f.filename}: /state attribute {key!r} must be a whole number")
    best = values.get("best_val_loss")
    if best is not None and (not isinstance(best, (int, float)) or isinstance(best, bool)
                             or not math.isfinite(best)):
        raise MpinnError(f"{f.filename}: /state attribute 'best_val_loss' must be a finite "
                         "number or null")
    if not isinstance(values.get("stopped_early", False), bool):
        raise MpinnError(f"{f.filename}: /state attribute 'stopped_early' must be true or false")
    if not isinstance(values.get("optimizer", {}), dict):
        raise MpinnError(f"{f.filename}: /state attribute 'optimizer' must be a JSON object")
    return values


def write_state_attrs(f: h5py.File, attrs: dict[str, Any]) -> None:
    state = f.require_group("state")
    for key, value in attrs.items():
        state.attrs[key] = json.dumps(value)


def state_dataset(f: h5py.File, layer: int, slot: str, shape: tuple[int, ...],
                  dtype: np.dtype) -> h5py.Dataset:
    """The optimizer-state dataset ``slot`` of ``layer``, created if missing (collective)."""
    group = f.require_group(f"state/layers/{layer}")
    if slot in group and group[slot].shape == shape and group[slot].dtype == dtype:
        return group[slot]
    if slot in group:
        del group[slot]
    return group.create_dataset(slot, shape, dtype)


def read_state_slot(f: h5py.File, layer: int, slot: str, shape: tuple[int, ...],
                    dtype: np.dtype) -> h5py.Dataset | None:
    """The stored optimizer-state dataset if it matches the layer's shape, else None."""
    path = f"state/layers/{layer}/{slot}"
    if path in f and f[path].shape == shape and f[path].dtype == dtype:
        return f[path]
    return None
