"""What one rank holds: its rows (incoming weights and biases) of every layer.

Weight columns are kept in the exchange plan's receive order (see exchange.py), so the
plan's receive buffer multiplies them directly; ``save`` puts them back in file order.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import h5py
import numpy as np

from mpinn import format as fmt
from mpinn.errors import MpinnError, inject_fault
from mpinn.exchange import receive_order
from mpinn.format import LayerSpec, ModelSpec
from mpinn.metadata import MetadataTable


@dataclass
class LayerShard:
    """One rank's rows of one layer."""

    spec: LayerSpec
    rows: np.ndarray    # in-layer indices of the owned neurons, ascending
    inputs: np.ndarray  # in-layer indices of layer l-1 the rows read, in receive order
    weight: np.ndarray  # (rows, inputs), columns in receive order
    bias: np.ndarray    # (rows,)

    @contextmanager
    def file_columns(self, values: np.ndarray) -> Iterator[np.ndarray]:
        """A (rows, inputs) array in receive order, seen as (rows, n_in) in file column order.

        When the rows read every input (dense layers) the columns are permuted in place,
        a block of rows at a time, and put back afterwards: saving never copies the shard.
        """
        if self.inputs.size != self.spec.n_in:
            full = np.zeros((values.shape[0], self.spec.n_in), dtype=values.dtype)
            full[:, self.inputs] = values
            yield full
            return
        _permute_columns(values, np.argsort(self.inputs))
        try:
            yield values
        finally:
            _permute_columns(values, self.inputs)

    def from_file_columns(self, values: np.ndarray) -> np.ndarray:
        """A (rows, n_in) array read from the file, reordered to receive order (in place
        when the rows read every input)."""
        if self.inputs.size != self.spec.n_in:
            return np.ascontiguousarray(values[:, self.inputs])
        _permute_columns(values, self.inputs)
        return values


def _permute_columns(values: np.ndarray, order: np.ndarray, block_bytes: int = 1 << 24) -> None:
    """``values[:] = values[:, order]`` in blocks of rows, so the copy is at most a block."""
    if not values.size or np.array_equal(order, np.arange(order.size)):
        return
    step = max(1, block_bytes // max(1, values.shape[1] * values.itemsize))
    for start in range(0, values.shape[0], step):
        block = values[start:start + step]
        block[...] = block[:, order]


@dataclass
class Shard:
    """A rank's share of the model: its rows of every layer, nothing more."""

    spec: ModelSpec
    table: MetadataTable
    rank: int
    layers: list[LayerShard]

    @staticmethod
    def check_fits(spec: ModelSpec, table: MetadataTable, rank: int, max_batch: int) -> None:
        """Refuse, before allocating, a share that cannot fit: rows, gradients and optimizer
        state (about 4 copies of the rows) plus batch-sized work buffers."""
        rows = sum(int(table.counts(ly.index)[rank]) * (ly.n_in + 1) for ly in spec.layers)
        work = sum(int(table.counts(ly.index)[rank]) * 4 + ly.n_in * 2 for ly in spec.layers)
        need = (4 * rows + work * max_batch) * spec.dtype.itemsize
        if need > fmt.available_memory():
            raise MpinnError(f"rank {rank}'s share of the model needs about {need / 2**30:.1f} GiB "
                             f"but only {fmt.available_memory() / 2**30:.1f} GiB are available; "
                             "use more ranks or a smaller --batch-size")

    @classmethod
    def load(cls, f: h5py.File, spec: ModelSpec, table: MetadataTable, rank: int) -> Shard:
        """Read this rank's rows of every layer (collective over the file's communicator)."""
        inject_fault("load", rank)
        layers = []
        for ly in spec.layers:
            rows = table.rows(ly.index, rank)
            needed = np.arange(ly.n_in) if rows.size else np.zeros(0, dtype=np.int64)
            inputs = receive_order(needed, table.layer_owner(ly.index - 1), rank, table.nranks)
            group = f["layers"][str(ly.index)]
            weight = fmt.read_slice(group["weight"], rows)
            bias = fmt.read_slice(group["bias"], rows)
            shard = LayerShard(ly, rows, inputs, weight, bias)
            shard.weight = shard.from_file_columns(weight)  # to receive order, in place
            layers.append(shard)
        return cls(spec, table, rank, layers)

    def save(self, f: h5py.File) -> None:
        """Write this rank's rows back into the model file (collective)."""
        for shard in self.layers:
            group = f["layers"][str(shard.spec.index)]
            with shard.file_columns(shard.weight) as weight:
                fmt.write_slice(group["weight"], shard.rows, weight)
            fmt.write_slice(group["bias"], shard.rows, shard.bias)

    @property
    def nbytes(self) -> int:
        return sum(s.weight.nbytes + s.bias.nbytes for s in self.layers)
