"""The replicated metadata table: global id <-> (layer, index, owner, local index).

Identical on every rank, built from the layer sizes and the owner array alone. A rank's
local order within a layer is ascending global id, which is also the order in which a
union-of-rows HDF5 selection delivers its rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mpinn.errors import MpinnError


@dataclass(frozen=True)
class MetadataTable:
    """Who owns which neuron, and where it sits in the owner's arrays."""

    sizes: tuple[int, ...]
    nranks: int
    owner: np.ndarray        # (n_neurons,) int32: owning rank of each gid
    local_index: np.ndarray  # (n_neurons,) int64: position among the owner's neurons of that layer
    offsets: np.ndarray      # (n_layers + 1,) int64: first gid of each layer, then the total

    @classmethod
    def build(cls, sizes: Sequence[int], owner: np.ndarray, nranks: int) -> MetadataTable:
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
        owner = owner.astype(np.int32)
        local = np.empty(owner.size, dtype=np.int64)
        for layer in range(len(sizes)):
            sl = slice(offsets[layer], offsets[layer + 1])
            o = owner[sl]
            order = np.argsort(o, kind="stable")
            starts = np.concatenate([[0], np.cumsum(np.bincount(o, minlength=nranks))[:-1]])
            layer_local = np.empty(o.size, dtype=np.int64)
            layer_local[order] = np.arange(o.size) - starts[o[order]]
            local[sl] = layer_local
        return cls(sizes, nranks, owner, local, offsets)

    @property
    def n_layers(self) -> int:
        """Number of weight layers (the input layer 0 not counted)."""
        return len(self.sizes) - 1

    def gid(self, layer: int, index: np.ndarray | int) -> np.ndarray | int:
        """Global id of neuron ``index`` of ``layer``."""
        return self.offsets[layer] + index

    def layer_owner(self, layer: int) -> np.ndarray:
        """Owner of every neuron of ``layer``, indexed by in-layer index."""
        return self.owner[self.offsets[layer]:self.offsets[layer + 1]]

    def layer_local_index(self, layer: int) -> np.ndarray:
        """Owner-local position of every neuron of ``layer``."""
        return self.local_index[self.offsets[layer]:self.offsets[layer + 1]]

    def rows(self, layer: int, rank: int) -> np.ndarray:
        """In-layer indices of the neurons ``rank`` owns in ``layer``, ascending."""
        return np.flatnonzero(self.layer_owner(layer) == rank)

    def counts(self, layer: int) -> np.ndarray:
        """Neurons each rank owns in ``layer``."""
        return np.bincount(self.layer_owner(layer), minlength=self.nranks)
