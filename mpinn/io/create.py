"""Creating a model file: the layer datasets, seeded initialisation a block of rows
at a time (the same weights on any rank count), sparse wiring, and the disk and
memory checks before anything is written."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import h5py
import numpy as np
from mpi4py import MPI

from mpinn.errors import MpinnError
from mpinn.io.checkpoint import Checkpoint
from mpinn.io.hdf5 import available_memory
from mpinn.io.schema import (
    CHECKPOINT_ID,
    DTYPES,
    FORMAT_VERSION,
    STORAGES,
    LayerSpec,
    ModelSpec,
    new_checkpoint_id,
    write_state_attrs,
)
from mpinn.io.staging import staged
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
from mpinn.partition.strategies import blockdist

INIT_BLOCK_ROWS = 1024  # init draws each block of rows from its own seed: rank-count independent


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
        f.attrs[CHECKPOINT_ID] = new_checkpoint_id(MPI.COMM_SELF)
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
