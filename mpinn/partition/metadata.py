"""The replicated metadata table: global id <-> (layer, index, owner, local index).

Identical on every rank, built from the layer sizes and the owner array alone, and kept
small because every rank holds all of it. A layer whose owners come in few contiguous
runs (balanced, count, percentage, layers, nnz) is stored as its runs (first index,
rank): a few integers per rank and layer. A layer with many runs (ids, mincut) keeps one
owner per neuron in the smallest unsigned type that holds the rank count. Local indices
are never stored: a rank's local order within a layer is ascending global id (also the
order in which a union-of-rows HDF5 selection delivers its rows), so a neuron's local
index is its position among its owner's neurons of the layer, computed on lookup.

Lookups return int64 whatever the stored type, so ``owner - rank`` cannot wrap around.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mpinn.errors import MpinnError

RUN_BYTES = 24  # a run costs its start, its rank and its owner's count before it


def owner_dtype(nranks: int) -> np.dtype:
    """The smallest unsigned integer type that holds every rank number of the job."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if nranks - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


@dataclass(frozen=True)
class OwnerRuns:
    """One layer's owners as runs: indices ``starts[k]`` to ``starts[k + 1] - 1`` belong to
    ``ranks[k]``, which owns ``before[k]`` neurons of the layer in earlier runs."""

    starts: np.ndarray  # (runs + 1,) int64; the last entry is the layer's size
    ranks: np.ndarray   # (runs,) owner_dtype
    before: np.ndarray  # (runs,) int64: the local index of the run's first neuron

    @classmethod
    def from_owner(cls, owner: np.ndarray, nranks: int) -> OwnerRuns:
        owner = np.asarray(owner)
        cut = np.flatnonzero(owner[1:] != owner[:-1]) + 1
        starts = np.concatenate([[0], cut, [owner.size]]).astype(np.int64)
        ranks = owner[starts[:-1]].astype(owner_dtype(nranks))
        lengths = np.diff(starts)
        # neurons of each run's rank in earlier runs: an exclusive running sum per rank
        order = np.argsort(ranks, kind="stable")
        running = np.cumsum(lengths[order]) - lengths[order]
        first_of_rank = np.searchsorted(ranks[order], ranks[order], side="left")
        before = np.empty(ranks.size, dtype=np.int64)
        before[order] = running - running[first_of_rank]
        return cls(starts, ranks, before)

    @property
    def size(self) -> int:
        return int(self.starts[-1])

    def _run(self, index: np.ndarray | int) -> np.ndarray | int:
        return np.searchsorted(self.starts, index, side="right") - 1

    def owner_of(self, index: np.ndarray | int) -> np.ndarray | int:
        return self.ranks[self._run(index)].astype(np.int64)

    def local_index(self, index: np.ndarray | int) -> np.ndarray | int:
        run = self._run(index)
        return self.before[run] + index - self.starts[run]

    def rows(self, rank: int) -> np.ndarray:
        mine = np.flatnonzero(self.ranks == rank)
        lengths = self.starts[mine + 1] - self.starts[mine]
        # each run's indices are its start plus its position within the run
        shift = np.repeat(self.starts[mine] - (np.cumsum(lengths) - lengths), lengths)
        return shift + np.arange(int(lengths.sum()), dtype=np.int64)

    def counts(self, nranks: int) -> np.ndarray:
        return np.bincount(self.ranks, weights=np.diff(self.starts),
                           minlength=nranks).astype(np.int64)

    def owners(self) -> np.ndarray:
        return np.repeat(self.ranks.astype(np.int32), np.diff(self.starts))

    @property
    def nbytes(self) -> int:
        return self.starts.nbytes + self.ranks.nbytes + self.before.nbytes


@dataclass(frozen=True)
class OwnerArray:
    """One layer's owners, one per neuron (a partition with too many runs to list)."""

    owner: np.ndarray  # (size,) owner_dtype

    @property
    def size(self) -> int:
        return int(self.owner.size)

    def owner_of(self, index: np.ndarray | int) -> np.ndarray | int:
        return self.owner[index].astype(np.int64)

    def local_index(self, index: np.ndarray | int) -> np.ndarray | int:
        # one pass over the layer (a radix sort on the small owner type), then discarded
        order = np.argsort(self.owner, kind="stable")
        counts = np.bincount(self.owner, minlength=int(self.owner.max(initial=0)) + 1)
        starts = np.cumsum(counts) - counts
        local = np.empty(self.owner.size, dtype=np.int64)
        local[order] = np.arange(self.owner.size) - starts[self.owner[order]]
        return local[index]

    def rows(self, rank: int) -> np.ndarray:
        return np.flatnonzero(self.owner == rank)

    def counts(self, nranks: int) -> np.ndarray:
        return np.bincount(self.owner, minlength=nranks).astype(np.int64)

    def owners(self) -> np.ndarray:
        return self.owner.astype(np.int32)

    @property
    def nbytes(self) -> int:
        return self.owner.nbytes


def layer_owners(owner: np.ndarray, nranks: int) -> OwnerRuns | OwnerArray:
    """The smaller of the two forms for one layer's owner array."""
    owner = np.asarray(owner)
    runs = 1 + int(np.count_nonzero(owner[1:] != owner[:-1])) if owner.size else 0
    if (runs + 1) * RUN_BYTES <= owner.size * owner_dtype(nranks).itemsize:
        return OwnerRuns.from_owner(owner, nranks)
    return OwnerArray(owner.astype(owner_dtype(nranks)))


@dataclass(frozen=True)
class MetadataTable:
    """Who owns which neuron, and where it sits in the owner's arrays."""

    sizes: tuple[int, ...]
    nranks: int
    layers: tuple[OwnerRuns | OwnerArray, ...]  # layer 0 (the inputs) first
    offsets: np.ndarray  # (n_layers + 2,) int64: first gid of each layer, then the total

    @classmethod
    def build(cls, sizes: Sequence[int], owner: np.ndarray, nranks: int) -> MetadataTable:
        """The table of the owner array ``owner`` (one rank per gid), which is not kept."""
        sizes = tuple(int(n) for n in sizes)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        owner = np.asarray(owner)
        if owner.shape != (offsets[-1],):
            raise MpinnError(f"partition has {owner.size} owner entries but the model has "
                             f"{offsets[-1]} neurons")
        if owner.size and (owner.min() < 0 or owner.max() >= nranks):
            bad = int(owner.min()) if owner.min() < 0 else int(owner.max())
            raise MpinnError(f"partition gives a neuron to rank {bad}, outside 0..{nranks - 1} "
                             f"for a {nranks}-rank job")
        layers = tuple(layer_owners(owner[offsets[i]:offsets[i + 1]], nranks)
                       for i in range(len(sizes)))
        return cls(sizes, nranks, layers, offsets)

    @property
    def n_layers(self) -> int:
        """Number of weight layers (the input layer 0 not counted)."""
        return len(self.sizes) - 1

    def gid(self, layer: int, index: np.ndarray | int) -> np.ndarray | int:
        """Global id of neuron ``index`` of ``layer``."""
        return self.offsets[layer] + index

    def owner_of(self, layer: int, index: np.ndarray | int) -> np.ndarray | int:
        """Owning rank of the neurons ``index`` (in-layer indices) of ``layer``."""
        return self.layers[layer].owner_of(index)

    def local_index(self, layer: int, index: np.ndarray | int) -> np.ndarray | int:
        """Position of the neurons ``index`` of ``layer`` among their owners' rows."""
        return self.layers[layer].local_index(index)

    def layer_owner(self, layer: int) -> np.ndarray:
        """Owner of every neuron of ``layer`` (int32, built on each call: one layer's worth)."""
        return self.layers[layer].owners()

    def layer_local_index(self, layer: int) -> np.ndarray:
        """Owner-local position of every neuron of ``layer`` (built on each call)."""
        return self.local_index(layer, np.arange(self.sizes[layer]))

    def rows(self, layer: int, rank: int) -> np.ndarray:
        """In-layer indices of the neurons ``rank`` owns in ``layer``, ascending."""
        return self.layers[layer].rows(rank)

    def counts(self, layer: int) -> np.ndarray:
        """Neurons each rank owns in ``layer``."""
        return self.layers[layer].counts(self.nranks)

    @property
    def owner(self) -> np.ndarray:
        """The whole owner array (int32, 4 bytes per neuron of the network, built on each
        call): for writing a partition to the file, never for a rank's hot path."""
        return np.concatenate([layer.owners() for layer in self.layers])

    @property
    def nbytes(self) -> int:
        """Bytes the table holds: what every rank pays for knowing every neuron's owner."""
        return sum(layer.nbytes for layer in self.layers) + self.offsets.nbytes
