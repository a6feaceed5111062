"""What one rank holds: its rows (incoming weights and biases) of every layer.

Weight columns are kept in the exchange plan's receive order (see comm/plans.py), so the
plan's receive buffer multiplies them directly; ``save`` puts them back in file order.
A dense layer's rows are a (rows, inputs) matrix whose leading columns are the rank's own
inputs. A CSR layer's rows read only the inputs they name; their stored weights are kept
as two CSR blocks sharing one array, local-input entries first, remote-input entries after
(PETSc's diagonal and off-diagonal blocks), so each block is one compiled kernel call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import h5py
import numpy as np
from mpi4py import MPI

from mpinn import kernels
from mpinn._testing.faults import inject_fault
from mpinn.comm.collectives import agree
from mpinn.comm.replicas import ReplicaGroups
from mpinn.errors import MpinnError
from mpinn.io import hdf5, schema
from mpinn.io.schema import LayerSpec, ModelSpec
from mpinn.partition.metadata import MetadataTable
from mpinn.partition.traffic import receive_order

# peak bytes per neuron while a rank builds the replicated partition table: the owner array
# and its per-layer forms (measured with tracemalloc for the balanced strategy: 8.0)
TABLE_BYTES_PER_NEURON = 8


@dataclass
class LayerShard:
    """One rank's rows of one layer."""

    spec: LayerSpec
    rows: np.ndarray    # in-layer indices of the owned neurons, ascending
    inputs: np.ndarray  # in-layer indices of layer l-1 the rows read, in receive order
    weight: np.ndarray  # (rows, inputs), columns in receive order
    bias: np.ndarray    # (rows,)
    n_local: int = 0    # inputs owned by this rank: the leading columns (the local block)

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

    # ---- the math of my rows, one block at a time (see Engine)

    # the math below can run a part of the rows (or of the local inputs) at a time, so the
    # engine can let MPI move an exchange in flight between parts (Engine._in_parts)
    parts = True

    def forward_local(self, gathered: np.ndarray, z: np.ndarray,
                      part: slice = slice(None)) -> None:
        """``z = W_local @ x_local``: the pre-activations from my own inputs (rows ``part``)."""
        kernels.block_forward(self.weight[part], gathered, slice(0, self.n_local), z[part])

    def forward_remote(self, gathered: np.ndarray, z: np.ndarray, scratch: np.ndarray) -> None:
        """``z += W_remote @ x_remote``, once the remote inputs have arrived."""
        kernels.block_forward(self.weight, gathered, slice(self.n_local, None), z, scratch=scratch)

    def input_grad_local(self, grad_z: np.ndarray, partial: np.ndarray,
                         part: slice = slice(None)) -> None:
        """Partial sums ``W_local^T dz`` for my own inputs (those of ``part``)."""
        start, stop, _ = part.indices(self.n_local)
        kernels.block_input_grad(self.weight, grad_z, slice(start, stop), partial)

    def input_grad_remote(self, grad_z: np.ndarray, partial: np.ndarray) -> None:
        """Partial sums ``W_remote^T dz``, sent back to the inputs' owners."""
        kernels.block_input_grad(self.weight, grad_z, slice(self.n_local, None), partial)

    def weight_grad(self, grad_z: np.ndarray, inputs: np.ndarray, grad_weight: np.ndarray,
                    part: slice = slice(None)) -> None:
        """``grad_weight = dz @ x^T`` of my rows (``part``) over the whole batch."""
        kernels.dense_weight_grad(grad_z[part], inputs, grad_weight[part])

    def sgd_update(self, grad_z: np.ndarray, inputs: np.ndarray, grad_weight: np.ndarray,
                   lr: float, part: slice = slice(None)) -> None:
        """Plain SGD of my weights (rows ``part``), ``W -= lr dz @ x^T``, in the
        weight-gradient GEMM itself (``grad_weight`` is left as it was)."""
        kernels.dense_sgd_update(grad_z[part], inputs, self.weight[part], lr)

    # ---- file I/O of weight-shaped arrays (weights, optimizer state)

    def weight_file_shape(self) -> tuple[int, ...]:
        return (self.spec.n_out, self.spec.n_in)

    def read_weight_like(self, dset: h5py.Dataset) -> np.ndarray:
        """My rows of a weight-shaped dataset, in memory order (collective)."""
        return self.from_file_columns(hdf5.read_slice(dset, self.rows))

    def write_weight_like(self, dset: h5py.Dataset, values: np.ndarray) -> None:
        """Write a weight-shaped array of mine into the file (collective)."""
        with self.file_columns(values) as in_file_order:
            hdf5.write_slice(dset, self.rows, in_file_order)

    def save(self, group: h5py.Group) -> None:
        """Write my rows of this layer into a new file's group (collective)."""
        self.write_weight_like(group["weight"], self.weight)
        hdf5.write_slice(group["bias"], self.rows, self.bias)

    @contextmanager
    def file_order(self, values: np.ndarray) -> Iterator[np.ndarray]:
        """A weight-shaped array seen as the file stores my rows (for tests and tools)."""
        with self.file_columns(values) as in_file_order:
            yield in_file_order


@dataclass
class CsrLayerShard(LayerShard):
    """One rank's rows of a CSR layer: only the inputs they name, as two CSR blocks.

    ``weight`` holds my stored weights, local-input entries first (``n_local_entries``), in
    row order within each block; ``order`` maps them to the file order of my entries.
    """

    parts = False  # its kernels run all its rows at once
    local_ptr: np.ndarray = None      # CSR row pointers of the local block
    remote_ptr: np.ndarray = None     # ... of the remote block
    columns: np.ndarray = None        # entry -> position in the receive buffer (both blocks)
    entry_rows: np.ndarray = None     # entry -> my row, for the weight gradient
    order: np.ndarray = None          # memory position -> position among my file entries
    file_indices: np.ndarray = None   # my entries' input indices, file order (for saving)
    ranges: np.ndarray = None         # my entries' [start, stop) in the file
    row_ends: np.ndarray = None       # indptr[row + 1] of each of my rows, global
    n_local_entries: int = 0

    @classmethod
    def build(cls, spec: schema.LayerSpec, rows: np.ndarray, csr: schema.CsrRows, values: np.ndarray,
              bias: np.ndarray, owner: np.ndarray, rank: int, size: int) -> CsrLayerShard:
        """Arrange my rows' entries (file order) into the two blocks (pure)."""
        inputs = receive_order(np.unique(csr.indices), owner, rank, size)
        position = np.empty(spec.n_in, dtype=np.int64)
        position[inputs] = np.arange(inputs.size)
        n_local = int(np.count_nonzero(owner[inputs] == rank))
        entry_rows = np.repeat(np.arange(rows.size), np.diff(csr.row_ptr))
        columns = position[csr.indices]
        remote = columns >= n_local
        order = np.lexsort((np.arange(columns.size), entry_rows, remote))  # stable, blocks first
        index_type = np.int32 if max(columns.size, inputs.size) < 2**31 else np.int64
        n_local_entries = int(columns.size - np.count_nonzero(remote))
        pointers = [np.concatenate([[0], np.cumsum(np.bincount(entry_rows[order][block],
                                                               minlength=rows.size))])
                    .astype(index_type) for block in (slice(0, n_local_entries),
                                                       slice(n_local_entries, None))]
        columns = columns[order]
        shard = cls(spec, rows, inputs, np.ascontiguousarray(values[order]), bias, n_local,
                    local_ptr=pointers[0], remote_ptr=pointers[1],
                    columns=columns.astype(index_type), entry_rows=entry_rows[order],
                    order=order, file_indices=csr.indices.astype(index_type), ranges=csr.ranges,
                    row_ends=csr.row_ends, n_local_entries=n_local_entries)
        return shard

    def _blocks(self, array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return array[: self.n_local_entries], array[self.n_local_entries:]

    # Both blocks index the whole receive buffer: the local block only its head (my own
    # inputs), the remote block only the rest, so neither needs its own numbering.

    def forward_local(self, gathered: np.ndarray, z: np.ndarray,
                      part: slice = slice(None)) -> None:  # parts = False: all rows
        w, _ = self._blocks(self.weight)
        c, _ = self._blocks(self.columns)
        kernels.csr_matmul(self.local_ptr, c, w, self.inputs.size, gathered, z)

    def forward_remote(self, gathered: np.ndarray, z: np.ndarray, scratch: np.ndarray) -> None:
        _, w = self._blocks(self.weight)
        _, c = self._blocks(self.columns)
        kernels.csr_matmul(self.remote_ptr, c, w, self.inputs.size, gathered, z, accumulate=True)

    def input_grad_local(self, grad_z: np.ndarray, partial: np.ndarray,
                         part: slice = slice(None)) -> None:
        w, _ = self._blocks(self.weight)
        c, _ = self._blocks(self.columns)
        partial[: self.n_local].fill(0)
        kernels.csr_transpose_matmul(self.local_ptr, c, w, self.inputs.size, grad_z, partial,
                                     accumulate=True)

    def input_grad_remote(self, grad_z: np.ndarray, partial: np.ndarray) -> None:
        _, w = self._blocks(self.weight)
        _, c = self._blocks(self.columns)
        partial[self.n_local:].fill(0)
        kernels.csr_transpose_matmul(self.remote_ptr, c, w, self.inputs.size, grad_z, partial,
                                     accumulate=True)

    def weight_grad(self, grad_z: np.ndarray, inputs: np.ndarray, grad_weight: np.ndarray,
                    part: slice = slice(None)) -> None:
        """Gradients of the stored weights only: the sparsity pattern is kept."""
        for ptr, block in ((self.local_ptr, slice(0, self.n_local_entries)),
                           (self.remote_ptr, slice(self.n_local_entries, None))):
            kernels.csr_weight_grad(ptr, self.columns[block], self.entry_rows[block], grad_z,
                                    inputs, grad_weight[block])

    def sgd_update(self, grad_z: np.ndarray, inputs: np.ndarray, grad_weight: np.ndarray,
                   lr: float, part: slice = slice(None)) -> None:
        """Plain SGD of the stored weights: their gradients, then one axpy."""
        self.weight_grad(grad_z, inputs, grad_weight)
        kernels.axpy(-lr, grad_weight, self.weight)

    def weight_file_shape(self) -> tuple[int, ...]:
        return (self.spec.nnz,)

    def read_weight_like(self, dset: h5py.Dataset) -> np.ndarray:
        return np.ascontiguousarray(hdf5.read_ranges(dset, self.ranges)[self.order])

    def write_weight_like(self, dset: h5py.Dataset, values: np.ndarray) -> None:
        with self.file_order(values) as in_file_order:
            hdf5.write_ranges(dset, self.ranges, in_file_order)

    def save(self, group: h5py.Group) -> None:
        # the wiring is written with the weights: the new file is complete on its own
        # indptr[row + 1] for each of my rows; indptr[0] by the owner of row 0
        head = 1 if self.rows.size and self.rows[0] == 0 else 0
        hdf5.write_slice(group["indptr"], np.concatenate([[0] * head, self.rows + 1]),
                        np.concatenate([[0] * head, self.row_ends]))
        hdf5.write_ranges(group["indices"], self.ranges, self.file_indices)
        self.write_weight_like(group["data"], self.weight)
        hdf5.write_slice(group["bias"], self.rows, self.bias)

    @contextmanager
    def file_order(self, values: np.ndarray) -> Iterator[np.ndarray]:
        in_file_order = np.empty_like(values)
        in_file_order[self.order] = values
        yield in_file_order


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
    def check_table_fits(spec: ModelSpec, nranks: int, ranks_here: int) -> None:
        """Refuse, before the owner array is made, a model whose replicated partition table
        (about TABLE_BYTES_PER_NEURON at its peak, on every rank) or whose average share of
        the parameters (4 copies, as ``check_fits``) cannot fit ``ranks_here`` times in this
        node's memory: every rank of the node builds the same table, and holds a share."""
        available = hdf5.available_memory()
        neurons = sum(spec.sizes)
        table = TABLE_BYTES_PER_NEURON * neurons
        if table * ranks_here > available:
            raise MpinnError(f"sizes {list(spec.sizes)} declare {neurons:,} neurons: the partition "
                             f"table every rank builds ({table / 2**30:.1f} GiB on each of the "
                             f"{ranks_here} ranks of this node) needs about "
                             f"{table * ranks_here / 2**30:.1f} GiB but only "
                             f"{available / 2**30:.1f} GiB are available")
        rows = sum(ly.nnz + ly.n_out for ly in spec.layers)
        share = 4 * rows * spec.dtype.itemsize / nranks
        if share * ranks_here > available:
            raise MpinnError(f"this node's share of the model ({ranks_here} of {nranks} ranks, for "
                             f"{rows:,} parameters with their gradients and optimizer state) needs "
                             f"about {share * ranks_here / 2**30:.1f} GiB but only "
                             f"{available / 2**30:.1f} GiB are available; use more nodes or ranks")

    @staticmethod
    def check_fits(spec: ModelSpec, table: MetadataTable, rank: int, max_batch: int) -> None:
        """Refuse, before allocating, a share that cannot fit: rows, gradients and optimizer
        state (about 4 copies of the rows, CSR rows counted at the layer's mean fill) plus
        batch-sized work buffers."""
        rows = sum(int(table.counts(ly.index)[rank]) * (ly.nnz / ly.n_out + 1) for ly in spec.layers)
        work = sum(int(table.counts(ly.index)[rank]) * 4 + ly.n_in * 2 for ly in spec.layers)
        need = (4 * rows + work * max_batch) * spec.dtype.itemsize
        if need > hdf5.available_memory():
            raise MpinnError(f"rank {rank}'s share of the model needs about {need / 2**30:.1f} GiB "
                             f"but only {hdf5.available_memory() / 2**30:.1f} GiB are available; "
                             "use more ranks or a smaller --batch-size")

    @classmethod
    def load(cls, f: h5py.File, spec: ModelSpec, table: MetadataTable, comm: MPI.Comm) -> Shard:
        """Read this rank's rows of every layer (collective over the file's communicator)."""
        rank, size = comm.rank, comm.size
        inject_fault("load", rank)
        layers: list[LayerShard] = []
        for ly in spec.layers:
            rows = table.rows(ly.index, rank)
            owner = table.layer_owner(ly.index - 1)
            group = f["layers"][str(ly.index)]
            if ly.sparse:
                where = f"{f.filename}: /layers/{ly.index}"
                csr = agree(comm, lambda group=group, rows=rows, where=where, ly=ly:
                            schema.read_csr_rows(group, rows, where, ly.n_in))
                values = hdf5.read_ranges(group["data"], csr.ranges)
                bias = hdf5.read_slice(group["bias"], rows)
                layers.append(CsrLayerShard.build(ly, rows, csr, values, bias, owner, rank, size))
                continue
            needed = np.arange(ly.n_in) if rows.size else np.zeros(0, dtype=np.int64)
            inputs = receive_order(needed, owner, rank, size)
            weight = hdf5.read_slice(group["weight"], rows)
            bias = hdf5.read_slice(group["bias"], rows)
            n_local = int(np.count_nonzero(owner[inputs] == rank))
            shard = LayerShard(ly, rows, inputs, weight, bias, n_local)
            shard.weight = shard.from_file_columns(weight)  # to receive order, in place
            layers.append(shard)
        return cls(spec, table, rank, layers)

    @classmethod
    def synthetic(cls, spec: ModelSpec, table: MetadataTable, rank: int, nranks: int,
                  seed: int = 0) -> Shard:
        """This rank's rows of a dense model with random weights, made in memory: what
        ``load`` would give for such a file, for the cost model's probe (partition/costmodel.py), which
        times real steps without a model file."""
        rng = np.random.default_rng([seed, rank])
        layers: list[LayerShard] = []
        for ly in spec.layers:
            if ly.sparse:
                raise MpinnError("a synthetic shard is made of dense layers only")
            rows = table.rows(ly.index, rank)
            owner = table.layer_owner(ly.index - 1)
            needed = np.arange(ly.n_in) if rows.size else np.zeros(0, dtype=np.int64)
            inputs = receive_order(needed, owner, rank, nranks)
            weight = rng.standard_normal((rows.size, inputs.size)).astype(spec.dtype)
            weight *= 1 / np.sqrt(max(ly.n_in, 1))
            n_local = int(np.count_nonzero(owner[inputs] == rank))
            layers.append(LayerShard(ly, rows, inputs, weight, np.zeros(rows.size, spec.dtype),
                                     n_local))
        return cls(spec, table, rank, layers)

    @classmethod
    def load_from_first_group(cls, f: h5py.File, spec: ModelSpec, table: MetadataTable,
                              groups: ReplicaGroups) -> Shard:
        """This rank's rows when every group holds the same partition: group 0 reads them
        (``load``, collective over its ranks), and every other rank receives the arrays of
        each layer from the rank of group 0 holding the same rows (``ReplicaGroups.from_first``)
        instead of reading the file again. Collective over ``groups.world``; a failed read
        is raised on every rank before any broadcast."""
        first = groups.index == 0
        read = agree(groups.world, lambda: cls.load(f, spec, table, groups.group) if first else None)
        layers: list[LayerShard] = []
        for i, ly in enumerate(spec.layers):
            kind = CsrLayerShard if ly.sparse else LayerShard
            names = [field.name for field in dataclasses.fields(kind) if field.name != "spec"]
            mine = read.layers[i] if read is not None else None
            arrays = groups.from_first(None if mine is None else
                                       {name: getattr(mine, name) for name in names})
            layers.append(mine if mine is not None else kind(spec=ly, **arrays))
        return read if read is not None else cls(spec, table, groups.group.rank, layers)

    def save(self, f: h5py.File) -> None:
        """Write this rank's rows back into the model file (collective)."""
        for shard in self.layers:
            shard.save(f["layers"][str(shard.spec.index)])

    @property
    def nbytes(self) -> int:
        return sum(s.weight.nbytes + s.bias.nbytes for s in self.layers)
