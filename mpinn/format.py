"""The HDF5 model and data format (v1): schema, validation, and rank-slice reads and writes.

Every file access of mpinn goes through this module. A rank reads and writes only its own
rows: each access is one HDF5 selection built as the union of the rank's contiguous row
runs, issued collectively on the ``mpio`` driver so MPI-IO can merge the ranks' requests.
The format itself is documented in docs/format.md.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Any

import h5py
import numpy as np
from mpi4py import MPI

from mpinn.distributor import blockdist
from mpinn.errors import MpinnError, inject_fault
from mpinn.exchange import take_turn
from mpinn.kernels import (
    NEGATIVE_SLOPE,
    check_activation,
    check_cap,
    check_dropout,
    check_slope,
    init_rows,
    pattern_counts,
    random_pattern,
)
from mpinn.outputs import commit, discard, keep_mode, partial_name, staged

FORMAT_VERSION = 1
DTYPES = {"float32": np.dtype(np.float32), "float64": np.dtype(np.float64)}
STORAGES = ("dense", "csr")
MAX_NEURONS = 1 << 40  # a sizes attribute beyond this is refused before anything is allocated
INIT_BLOCK_ROWS = 1024  # init draws each block of rows from its own seed: rank-count independent

# Elements each dataset has been asked to deliver to this rank, for tests and benchmarks.
READ_STATS: Counter[str] = Counter()

# Parallel HDF5 when h5py has it (MPINN_IO=independent forces the fallback, for tests):
# otherwise ranks read their slices independently and write one at a time.
MPI_IO = bool(h5py.get_config().mpi) and os.environ.get("MPINN_IO", "mpio") != "independent"
_warned = False


def warn_without_mpi_io(comm: MPI.Comm) -> None:
    """Say once, on rank 0, that writes are funnelled because HDF5 has no MPI support."""
    global _warned
    if MPI_IO or comm.size == 1:  # a one-process open (a data file's size) says nothing yet
        return
    if comm.rank == 0 and not _warned:
        print("mpinn: warning: h5py has no MPI support (serial HDF5): ranks read their rows "
              "independently and write them one rank at a time", file=sys.stderr, flush=True)
    _warned = True


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


# ---------------------------------------------------------------- opening files


def open_file(path: str, mode: str, comm: MPI.Comm) -> h5py.File:
    """Open ``path`` on every rank of ``comm`` (collective), with a clear error if it fails.

    Without MPI-IO each rank opens it on its own: use it so only for reading, or inside
    ``exchange.take_turn`` for writing.
    """
    warn_without_mpi_io(comm)
    if os.path.isdir(path):  # before MPI-IO, which would print pages of driver errors first
        raise MpinnError(f"{path} is a directory, not a model or data file")
    if mode in ("r", "r+") and not os.path.exists(path):
        raise MpinnError(f"{path}: no such file")
    try:
        if MPI_IO:
            return h5py.File(path, mode, driver="mpio", comm=comm)
        return h5py.File(path, mode)
    except OSError as exc:
        if mode in ("r", "r+") and not h5py.is_hdf5(path):
            raise MpinnError(f"{path}: not an HDF5 file") from None
        if "truncated" in str(exc) or "eof" in str(exc).lower():
            raise MpinnError(f"{path}: the file is truncated or damaged ({exc}); restore it "
                             f"from a copy or a checkpoint in {path}.checkpoints/") from None
        if mode != "r" and os.path.exists(path) and not os.access(path, os.W_OK):
            mode_bits = os.stat(path).st_mode & 0o7777
            raise MpinnError(f"{path}: cannot open it for writing: permission denied (mode "
                             f"{mode_bits:04o})") from None
        hint = ("; another process has it open, or the filesystem has no file locks: then "
                "set HDF5_USE_FILE_LOCKING=FALSE") if "lock" in str(exc) else ""
        raise MpinnError(f"{path}: cannot open ({exc}{hint})") from None


def file_identity(path: str) -> tuple[int, ...] | None:
    """What changes whenever a model is committed (a new file renamed over it): device,
    inode, size and modification time; None if there is no such file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def safe_to_close(exc: BaseException | None) -> bool:
    """Whether a file may be closed while ``exc`` propagates.

    Closing an ``mpio`` file is collective. During an error that only this rank may have
    hit, the others can be inside another collective, and a close would hang the job; the
    file is then left to the process exit (the CLI ends such a job without collectives).
    """
    return exc is None or not MPI_IO or (isinstance(exc, MpinnError) and exc.agreed)


@contextmanager
def opened(path: str, mode: str, comm: MPI.Comm) -> Iterator[h5py.File]:
    """``open_file`` as a context that closes the file unless that could hang (see above)."""
    f = open_file(path, mode, comm)
    try:
        yield f
    except BaseException as exc:
        if safe_to_close(exc):
            f.close()
        raise
    f.close()


def _collective() -> h5py.h5p.PropDXID | None:
    if not MPI_IO:
        return None
    dxpl = h5py.h5p.create(h5py.h5p.DATASET_XFER)
    dxpl.set_dxpl_mpio(h5py.h5fd.MPIO_COLLECTIVE)
    return dxpl


def available_memory() -> int:
    """Bytes this process may still allocate: MemAvailable, else physical memory."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


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


@dataclass(frozen=True)
class SparseInit:
    """How ``init`` wires a CSR layer: ``fan_in`` random inputs per neuron, or each
    connection present with probability ``density``."""

    fan_in: int | None = None
    density: float | None = None

    def check(self, n_in: int, where: str) -> None:
        if (self.fan_in is None) == (self.density is None):
            raise MpinnError(f"{where}: CSR layers need exactly one of --fan-in or --density")
        if self.fan_in is not None and not 1 <= self.fan_in <= n_in:
            raise MpinnError(f"{where}: --fan-in {self.fan_in} must be between 1 and the layer's "
                             f"{n_in} inputs")
        if self.density is not None and not 0 < self.density <= 1:
            raise MpinnError(f"{where}: --density {self.density} must be in (0, 1]")


def create_model(path: str, sizes: Sequence[int], activations: Sequence[str], dtype: str,
                 seed: int, comm: MPI.Comm, storages: Sequence[str] | None = None,
                 sparse: SparseInit | None = None, cap: float | None = None,
                 negative_slope: float = NEGATIVE_SLOPE,
                 dropout: float | Sequence[float] = 0.0) -> None:
    """Write a new, initialised model file; each rank draws and writes a share of the rows.

    ``dropout``: the training dropout rate of every hidden layer, or one per hidden layer.

    Rows come in blocks of INIT_BLOCK_ROWS, each drawn from its own (seed, layer, block)
    stream, so the file is the same whatever the rank count, and no rank holds more than
    one block of rows at a time. CSR layers draw their wiring from a second stream per
    block; with ``density`` the rows' counts are shared first so every rank knows the
    offsets (indptr) at which its blocks go.
    """
    sizes = [int(n) for n in sizes]
    if len(sizes) < 2 or any(n < 1 for n in sizes):
        raise MpinnError(f"--sizes needs at least two layers of at least 1 neuron, got {sizes}")
    if len(activations) != len(sizes) - 1:
        raise MpinnError(f"{len(activations)} activations given for {len(sizes) - 1} layers")
    storages = list(storages or ["dense"] * (len(sizes) - 1))
    if len(storages) == 1:
        storages *= len(sizes) - 1
    if len(storages) != len(sizes) - 1:
        raise MpinnError(f"--storage gives {len(storages)} entries for {len(sizes) - 1} layers")
    if dtype not in DTYPES:
        raise MpinnError(f"--dtype {dtype!r} is not supported (float32 or float64)")
    if seed < 0:
        raise MpinnError(f"--seed must not be negative, got {seed}")
    rates = ([dropout] * (len(sizes) - 2) if isinstance(dropout, (int, float, np.number))
             else list(dropout))
    if len(rates) != len(sizes) - 2:
        raise MpinnError(f"--dropout gives {len(rates)} rates for {len(sizes) - 2} hidden layers")
    rates.append(0.0)  # the output layer's
    layers, row_counts = [], {}
    for index, (act, storage) in enumerate(zip(activations, storages, strict=True), start=1):
        where = f"layer {index}"
        check_activation(act, index == len(sizes) - 1, where)
        if storage not in STORAGES:
            raise MpinnError(f"{where}: unknown storage {storage!r} (known: {', '.join(STORAGES)})")
        layer_cap = check_cap(cap if cap is not None else None, where) if act == "relu_cap" else None
        slope = check_slope(negative_slope, where) if act == "leaky_relu" else None
        rate = check_dropout(rates[index - 1], index == len(sizes) - 1, where)
        n_in, n_out = sizes[index - 1], sizes[index]
        nnz = n_in * n_out
        if storage == "csr":
            sparse = sparse or SparseInit()
            sparse.check(n_in, where)
            # expected until the rows are drawn: enough to refuse a model that cannot fit
            nnz = (sparse.fan_in * n_out if sparse.fan_in is not None
                   else math.ceil(sparse.density * n_in * n_out))
        layers.append(LayerSpec(index, n_in, n_out, act, storage, nnz, layer_cap, slope, rate))
    check_room(path, ModelSpec(tuple(sizes), tuple(layers), DTYPES[dtype]))
    for i, ly in enumerate(layers):
        if ly.sparse:
            assert sparse is not None
            row_counts[ly.index] = _csr_counts(seed, ly.index, ly.n_in, ly.n_out, sparse, comm)
            layers[i] = replace(ly, nnz=int(row_counts[ly.index].sum()))
    spec = ModelSpec(tuple(sizes), tuple(layers), DTYPES[dtype])
    with Checkpoint(path, spec, {}, comm, keep=1) as f:
        for ly in spec.layers:
            group = f[f"layers/{ly.index}"]
            n_blocks = -(-ly.n_out // INIT_BLOCK_ROWS)
            count, first = blockdist(n_blocks, comm.size, comm.rank)
            indptr = (np.concatenate([[0], np.cumsum(row_counts[ly.index])])
                      if ly.sparse else None)
            for block in range(first, first + count):
                start = block * INIT_BLOCK_ROWS
                stop = min(start + INIT_BLOCK_ROWS, ly.n_out)
                rng = np.random.default_rng([seed, ly.index, block])
                if indptr is None:
                    w, b = init_rows(rng, stop - start, ly.n_in, ly.n_out, ly.activation, spec.dtype)
                    group["weight"][start:stop] = w
                    group["bias"][start:stop] = b
                    continue
                assert sparse is not None
                _, columns = random_pattern(np.random.default_rng([seed, ly.index, block, 1]),
                                            stop - start, ly.n_in, sparse.fan_in, sparse.density)
                fan_in = max(1, round(ly.nnz / ly.n_out))
                w, b = init_rows(rng, stop - start, fan_in, ly.n_out, ly.activation, spec.dtype,
                                 n_values=columns.size)
                lo, hi = int(indptr[start]), int(indptr[stop])
                group["indptr"][start:stop + 1] = indptr[start:stop + 1]
                group["indices"][lo:hi] = columns
                group["data"][lo:hi] = w
                group["bias"][start:stop] = b
        write_state_attrs(f, {"epoch": 0, "step": 0, "batch": 0, "init_seed": int(seed)})


def file_bytes(spec: ModelSpec) -> int:
    """Bytes a model's weights, biases and wiring take in its file."""
    total = 0
    for ly in spec.layers:
        total += (ly.nnz + ly.n_out) * spec.dtype.itemsize
        if ly.sparse:
            total += 8 * (ly.n_out + 1) + ly.nnz * (4 if ly.n_in < 2**31 else 8)
    return total


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} EiB"


def check_space(path: str, disk: int, memory: int, what: str) -> None:
    """Refuse to make ``what`` before anything is written when its file (``disk`` bytes)
    cannot fit the free space of ``path``'s filesystem (``statvfs``) or making it needs
    more than the available ``memory``."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        stat = os.statvfs(directory)
    except OSError as exc:
        raise MpinnError(f"{path}: cannot inspect directory {directory} ({exc.strerror})") from None
    free = stat.f_bavail * stat.f_frsize
    if disk > free:
        raise MpinnError(f"{path}: {what} needs a {_size(disk)} file but {directory} has "
                         f"{_size(free)} free")
    available = available_memory()
    if memory > available:
        raise MpinnError(f"{path}: {what} needs {_size(memory)} of memory to make; "
                         f"{_size(available)} are available")


def check_room(path: str, spec: ModelSpec) -> None:
    """Refuse a new model whose file cannot fit its filesystem, or whose metadata table or
    a block of whose rows cannot fit in memory, before anything is written."""
    sizes = f"sizes {','.join(map(str, spec.sizes))}"
    block = 0
    for ly in spec.layers:
        per_row = ly.n_in if not ly.sparse else max(1, ly.nnz // ly.n_out)
        block = max(block, 3 * 8 * min(INIT_BLOCK_ROWS, ly.n_out) * per_row)  # float64 draws
    check_space(path, file_bytes(spec), max(block, 4 * spec.n_neurons),  # the owner array
                f"a model of {sizes} ({spec.n_neurons:,} neurons, {spec.n_parameters:,} "
                "parameters)")


@dataclass
class LayerArrays:
    """One layer given whole, for writers that build a model in one process (converters,
    benchmark generators): ``weight`` dense (n_out, n_in), or a scipy CSR matrix."""

    activation: str
    weight: Any
    bias: np.ndarray
    cap: float | None = None
    negative_slope: float | None = None  # leaky_relu's (default 0.01)
    dropout: float = 0.0  # training dropout rate of a hidden layer


def write_model(path: str, sizes: Sequence[int], layers: Iterable[LayerArrays], dtype: str) -> None:
    """Write a model file from one process, a layer at a time (``layers`` may be a
    generator: a deep network is never held whole), then swap it in atomically."""
    if dtype not in DTYPES:
        raise MpinnError(f"dtype {dtype!r} is not supported (float32 or float64)")
    count = 0
    with staged(path) as partial, h5py.File(partial, "w") as f:
        f.attrs["mpinn_format_version"] = FORMAT_VERSION
        f.attrs["sizes"] = np.asarray(sizes, dtype=np.int64)
        for index, ly in enumerate(layers, start=1):
            count = index
            where = f"layer {index}"
            if index >= len(sizes):
                raise MpinnError(f"more layers given than sizes {list(sizes)} declare")
            check_activation(ly.activation, index == len(sizes) - 1, where)
            shape = (sizes[index], sizes[index - 1])
            if ly.weight.shape != shape or np.shape(ly.bias) != shape[:1]:
                raise MpinnError(f"{where}: weight {ly.weight.shape} and bias {np.shape(ly.bias)} "
                                 f"do not match sizes {list(sizes)}")
            group = f.create_group(f"layers/{index}")
            group.attrs["activation"] = ly.activation
            if ly.activation == "relu_cap":
                group.attrs["cap"] = check_cap(ly.cap, where)
            if ly.activation == "leaky_relu":
                group.attrs["negative_slope"] = check_slope(
                    NEGATIVE_SLOPE if ly.negative_slope is None else ly.negative_slope, where)
            if check_dropout(ly.dropout, index == len(sizes) - 1, where):
                group.attrs["dropout"] = float(ly.dropout)
            if hasattr(ly.weight, "indptr"):  # scipy CSR
                csr = ly.weight.tocsr()
                csr.sum_duplicates()
                csr.sort_indices()
                group.attrs["storage"] = "csr"
                group["indptr"] = csr.indptr.astype(np.int64)
                group["indices"] = csr.indices.astype(np.int32 if shape[1] < 2**31 else np.int64)
                group["data"] = csr.data.astype(dtype)
            else:
                group.attrs["storage"] = "dense"
                group["weight"] = np.asarray(ly.weight, dtype=dtype)
            group["bias"] = np.asarray(ly.bias, dtype=dtype)
        if count != len(sizes) - 1:
            raise MpinnError(f"{count} layers given but sizes {list(sizes)} declare "
                             f"{len(sizes) - 1}")
        write_state_attrs(f, {"epoch": 0, "step": 0, "batch": 0})


def _csr_counts(seed: int, layer: int, n_in: int, n_out: int, sparse: SparseInit,
                comm: MPI.Comm) -> np.ndarray:
    """Stored weights per row of a new CSR layer (the same on every rank): only the
    counts, the first draw of each block's wiring stream, are drawn here."""
    if sparse.fan_in is not None:
        return np.full(n_out, sparse.fan_in, dtype=np.int64)
    n_blocks = -(-n_out // INIT_BLOCK_ROWS)
    count, first = blockdist(n_blocks, comm.size, comm.rank)
    mine = [pattern_counts(np.random.default_rng([seed, layer, block, 1]),
                           min(INIT_BLOCK_ROWS, n_out - block * INIT_BLOCK_ROWS), n_in, None,
                           sparse.density) for block in range(first, first + count)]
    mine_counts = np.concatenate(mine) if mine else np.zeros(0, dtype=np.int64)
    return np.concatenate(comm.allgather(mine_counts))


# ---------------------------------------------------------------- crash-safe writes


Partitions = dict[str, tuple[np.ndarray, int, str, dict[str, Any]]]


class Checkpoint:
    """A complete new model file, written beside ``path`` and swapped in atomically.

    Entering creates ``<path>.partial`` with the model's layout and the stored partitions
    (collective); the caller writes every rank's rows into it. Leaving without an error
    flushes it to storage (MPI_File_sync) and has rank 0 ``rename`` it over ``path``: a
    job killed at any moment leaves ``path`` holding either the previous or the new
    state, never a mixture. With ``keep`` > 1 the replaced file is kept, hard-linked, in
    ``<path>.checkpoints/`` and the oldest beyond ``keep - 1`` there are removed.
    """

    def __init__(self, path: str, spec: ModelSpec, partitions: Partitions, comm: MPI.Comm,
                 keep: int = 1, label: str = "") -> None:
        if keep < 1:
            raise MpinnError(f"--keep must be at least 1, got {keep}")
        self.path, self.spec, self.partitions, self.comm = path, spec, partitions, comm
        self.keep, self.label = keep, label
        self.partial = partial_name(path)
        self.file: h5py.File | None = None
        self._turn: AbstractContextManager[None] = nullcontext()

    def __enter__(self) -> h5py.File:
        first = MPI_IO or self.comm.rank == 0  # creates the file and its layout
        if not MPI_IO:
            self._turn = take_turn(self.comm)
            self._turn.__enter__()  # the ranks write one after another
        f = self.file = open_file(self.partial, "w" if first else "r+", self.comm)
        try:
            if first:
                self._layout(f)
            inject_fault("save-begun", self.comm.rank)
        except BaseException as exc:
            if safe_to_close(exc):
                f.close()
            self._abandon(exc)
            raise
        return f

    def _abandon(self, exc: BaseException) -> None:
        """Drop the unfinished file (unlinking is safe while open) and say what happened.

        Any failing rank removes it: a rank that failed alone (a full disk seen by one
        writer) may leave rank 0 inside a collective until the job is aborted, and the
        others never rename a file they did not finish."""
        discard(self.partial)
        if isinstance(exc, OSError):
            raise MpinnError(f"{self.path}: writing the checkpoint failed ({exc}; is the disk "
                             "full?); the previous checkpoint in the file is intact") from exc

    def _layout(self, f: h5py.File) -> None:
        inject_fault("save", self.comm.rank)
        f.attrs["mpinn_format_version"] = FORMAT_VERSION
        f.attrs["sizes"] = np.asarray(self.spec.sizes, dtype=np.int64)
        for ly in self.spec.layers:
            group = f.create_group(f"layers/{ly.index}")
            group.attrs["activation"] = ly.activation
            group.attrs["storage"] = ly.storage
            if ly.cap is not None:
                group.attrs["cap"] = ly.cap
            if ly.negative_slope is not None:
                group.attrs["negative_slope"] = ly.negative_slope
            if ly.dropout:
                group.attrs["dropout"] = ly.dropout
            if ly.sparse:
                group.create_dataset("indptr", (ly.n_out + 1,), np.int64)
                index_type = np.int32 if ly.n_in < 2**31 else np.int64
                group.create_dataset("indices", (ly.nnz,), index_type)
                group.create_dataset("data", (ly.nnz,), self.spec.dtype)
            else:
                group.create_dataset("weight", (ly.n_out, ly.n_in), self.spec.dtype)
            group.create_dataset("bias", (ly.n_out,), self.spec.dtype)
        for name, (owner, nranks, strategy, params) in self.partitions.items():
            write_partition(f, name, owner, nranks, strategy, params, self.comm)

    def __exit__(self, exc_type: type | None, exc: BaseException | None, _tb: object) -> None:
        assert self.file is not None
        if exc is not None:
            if safe_to_close(exc):
                self.file.close()
            self._abandon(exc)
            return  # the model file was not touched
        inject_fault("save-written", self.comm.rank)
        inject_fault("sync", self.comm.rank)
        self.file.flush()  # collective MPI_File_sync: the data is on storage before the rename
        self.file.close()
        inject_fault("save-synced", self.comm.rank)
        if not MPI_IO:
            self._turn.__exit__(None, None, None)  # hand the file to the next rank
        self.comm.Barrier()
        if self.comm.rank == 0:
            self._commit()
        self.comm.Barrier()

    def _commit(self) -> None:
        if self.keep > 1 and os.path.exists(self.path):
            try:
                self._keep_previous()
            except OSError as exc:  # checked before training; never lose the new checkpoint
                print(f"mpinn: warning: {self.path}: the previous checkpoint was not kept in "
                      f"{self.path}.checkpoints/ ({exc}); the new one is committed",
                      file=sys.stderr, flush=True)
        keep_mode(self.path, self.partial)  # a model made private (0600) stays private
        inject_fault("save-rename", self.comm.rank)
        commit(self.partial, self.path)  # whatever the I/O driver did: synced, renamed, synced
        inject_fault("save-renamed", self.comm.rank)

    def _keep_previous(self) -> None:
        """Hard-link the file being replaced into ``PATH.checkpoints/`` and drop the oldest
        there beyond ``keep - 1``."""
        history = f"{self.path}.checkpoints"
        os.makedirs(history, exist_ok=True)
        kept = os.path.join(history, self.label or "previous.h5")
        if os.path.exists(kept):
            os.remove(kept)
        os.link(self.path, kept)
        older = sorted((os.path.join(history, n) for n in os.listdir(history)),
                       key=os.path.getmtime)
        for stale in older[: max(0, len(older) - (self.keep - 1))]:
            os.remove(stale)


def check_history(path: str, keep: int) -> None:
    """Before any training with ``keep`` > 1: ``PATH.checkpoints`` must be a writable
    directory holding only files, since each commit links into it and removes its oldest
    entries; refused otherwise, rather than found at the first commit."""
    history = f"{path}.checkpoints"
    if keep <= 1 or not os.path.lexists(history):
        return
    if not os.path.isdir(history):
        raise MpinnError(f"--keep {keep}: {history} is a file, not the directory of older "
                         "checkpoints; move it away")
    for entry in os.scandir(history):
        if entry.is_dir(follow_symlinks=False):
            raise MpinnError(f"--keep {keep}: {entry.path} is a directory, which pruning the "
                             f"older checkpoints in {history}/ cannot remove; move it away")
    if not os.access(history, os.W_OK | os.X_OK):
        raise MpinnError(f"--keep {keep}: {history} is not writable")


def read_state_value(path: str, key: str) -> Any:
    """The /state attribute ``key`` of the file at ``path`` (one process), or None when it
    is not an HDF5 file, has no such attribute, or it is not JSON."""
    try:
        with h5py.File(path, "r") as f:
            state = f.get("state")
            value = state.attrs.get(key) if isinstance(state, h5py.Group) else None
        return json.loads(value) if value is not None else None
    except (OSError, ValueError, TypeError, KeyError):
        return None


def read_partitions(f: h5py.File) -> Partitions:
    """Every partition stored in the file (replicated metadata, small)."""
    with _links_refused(f):
        return {name: read_partition(f, name) for name in list_partitions(f)}


# ---------------------------------------------------------------- rank slices


def runs(indices: np.ndarray) -> np.ndarray:
    """Contiguous runs of sorted distinct ``indices`` as an (n_runs, 2) array of [start, stop)."""
    indices = np.asarray(indices, dtype=np.int64)
    if indices.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    starts = indices[np.concatenate([[0], breaks])]
    stops = indices[np.concatenate([breaks - 1, [indices.size - 1]])] + 1
    return np.stack([starts, stops], axis=1)


def _selection(shape: tuple[int, ...], axis: int, index: np.ndarray | None,
               ranges: np.ndarray | None = None) -> h5py.h5s.SpaceID:
    """File dataspace selecting ``index`` (sorted), or the [start, stop) ``ranges``, along
    ``axis`` and everything along the rest."""
    space = h5py.h5s.create_simple(shape)
    space.select_none()
    op = h5py.h5s.SELECT_SET
    for start, stop in (runs(index) if ranges is None else ranges):
        if stop <= start:
            continue
        offset = [0] * len(shape)
        count = list(shape)
        offset[axis], count[axis] = int(start), int(stop - start)
        space.select_hyperslab(tuple(offset), tuple(count), op=op)
        op = h5py.h5s.SELECT_OR
    return space


def _memory_space(shape: tuple[int, ...]) -> h5py.h5s.SpaceID:
    space = h5py.h5s.create_simple(tuple(max(n, 1) for n in shape))
    if 0 in shape:
        space.select_none()
    return space


def read_slice(dset: h5py.Dataset, index: np.ndarray, axis: int = 0) -> np.ndarray:
    """Collectively read the entries ``index`` (sorted) of ``dset`` along ``axis``."""
    index = np.asarray(index, dtype=np.int64)
    shape = list(dset.shape)
    shape[axis] = index.size
    out = np.empty(shape, dtype=dset.dtype)
    buf = out if out.size else np.empty([max(n, 1) for n in shape], dtype=dset.dtype)
    dset.id.read(_memory_space(tuple(shape)), _selection(dset.shape, axis, index), buf,
                 dxpl=_collective())
    READ_STATS[dset.name] += out.size
    return out


def read_whole(dset: h5py.Dataset) -> np.ndarray:
    """A small dataset every rank needs whole (labels), read independently by each rank:
    the ranks' selections would all overlap, and overlapping selections in one collective
    read are what OpenMPI 4.1's OMPIO has returned wrong values for (see ``read_csr_rows``)."""
    out = dset[...]
    READ_STATS[dset.name] += out.size
    return out


def read_ranges(dset: h5py.Dataset, ranges: np.ndarray) -> np.ndarray:
    """Collectively read the [start, stop) ``ranges`` (ascending, disjoint) of a 1-D dataset,
    concatenated: a CSR layer's entries of a rank's rows."""
    size = int(sum(int(b - a) for a, b in ranges))
    out = np.empty(size, dtype=dset.dtype)
    buf = out if size else np.empty(1, dtype=dset.dtype)
    dset.id.read(_memory_space((size,)), _selection(dset.shape, 0, None, ranges), buf,
                 dxpl=_collective())
    READ_STATS[dset.name] += size
    return out


def write_ranges(dset: h5py.Dataset, ranges: np.ndarray, values: np.ndarray) -> None:
    """Collectively write ``values`` to the [start, stop) ``ranges`` of a 1-D dataset."""
    values = np.ascontiguousarray(values, dtype=dset.dtype)
    mspace = _memory_space(values.shape)
    if values.size == 0:
        values = np.empty(1, dtype=dset.dtype)
    dset.id.write(mspace, _selection(dset.shape, 0, None, ranges), values, dxpl=_collective())


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


def write_slice(dset: h5py.Dataset, index: np.ndarray, values: np.ndarray, axis: int = 0) -> None:
    """Collectively write ``values`` to the entries ``index`` (sorted) of ``dset`` along ``axis``."""
    index = np.asarray(index, dtype=np.int64)
    values = np.ascontiguousarray(values, dtype=dset.dtype)
    if values.size == 0:
        values = np.empty([max(n, 1) for n in values.shape], dtype=dset.dtype)
        shape = list(dset.shape)
        shape[axis] = 0
        mspace = _memory_space(tuple(shape))
    else:
        mspace = _memory_space(values.shape)
    dset.id.write(mspace, _selection(dset.shape, axis, index), values, dxpl=_collective())


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
