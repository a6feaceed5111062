"""plot partition stays readable for deep models: identical layers grouped, shares not counts."""

from __future__ import annotations

import numpy as np
import pytest

from mpinn.partition import strategies
from mpinn.partition.metadata import MetadataTable
from mpinn.tools import plot


def test_runs_of_identical_layers_are_one_group():
    sizes = [1024] * 121 + [10]  # a RadiX-Net model: 120 identical hidden layers, 10 outputs
    table = MetadataTable.build(sizes, strategies.balanced(sizes, 4), 4)
    counts = np.array([table.counts(layer) for layer in range(len(sizes))])
    assert plot.layer_groups(counts) == [(0, 120), (121, 121)]
    assert plot.layer_groups(np.array([[1, 2], [2, 1], [2, 1], [1, 2]])) == [(0, 0), (1, 2), (3, 3)]


@pytest.mark.parametrize("sizes", [[1024] * 121 + [10], [64, 256, 256, 10],
                                   list(np.random.default_rng(0).integers(10, 100, size=60))])
def test_partition_pictures_of_shallow_and_deep_models_are_drawn(sizes, tmp_path):
    pytest.importorskip("matplotlib")
    table = MetadataTable.build(sizes, strategies.balanced(sizes, 3), 3)
    out = tmp_path / "part.png"
    plot.partition_picture(table, np.arange(9).reshape(3, 3), "a model", str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
