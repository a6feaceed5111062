"""Partition strategies and their validation, pure."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpinn.errors import MpinnError
from mpinn.partition import strategies
from mpinn.partition.metadata import RUN_BYTES, MetadataTable, OwnerArray, OwnerRuns, owner_dtype
from tests.helpers import STRATEGIES, strategy_params

SIZES = [7, 13, 11, 5]


def test_blockdist_covers_range_without_overlap():
    for n in range(0, 20):
        for size in range(1, 6):
            blocks = [strategies.blockdist(n, size, r) for r in range(size)]
            assert sum(length for length, _ in blocks) == n
            assert all(blocks[r][1] + blocks[r][0] == blocks[r + 1][1] for r in range(size - 1))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("nranks", [1, 2, 3, 4])
def test_every_strategy_gives_every_neuron_exactly_one_rank(strategy, nranks):
    """One owner per neuron, and the one the strategy's params ask for."""
    params = strategy_params(strategy, SIZES, nranks)
    owner = strategies.partition(SIZES, nranks, strategy, params)
    total = sum(SIZES)
    assert owner.shape == (total,) and owner.dtype == np.int32
    assert owner.min() >= 0 and owner.max() < nranks
    per_rank = np.bincount(owner, minlength=nranks)
    starts = np.cumsum([0, *SIZES])
    if strategy == "balanced":  # every layer split evenly
        for layer in range(len(SIZES)):
            counts = np.bincount(owner[starts[layer]:starts[layer + 1]], minlength=nranks)
            assert counts.max() - counts.min() <= 1, (layer, counts)
    elif strategy == "count":
        assert per_rank.tolist() == params["counts"]
    elif strategy == "percentage":  # largest remainder: each within one neuron of its share
        assert np.all(np.abs(per_rank - np.asarray(params["percentages"]) / 100 * total) < 1), per_rank
    elif strategy == "ids":
        expected = np.full(total, -1)
        for rank, items in params["ids"].items():
            for item in items:
                start, stop = (item, item + 1) if isinstance(item, int) else item
                expected[start:stop] = int(rank)
        assert np.array_equal(owner, expected)
    else:  # layers: each layer's neurons on its rank
        assert np.array_equal(owner, np.repeat(params["layer_ranks"], SIZES))


def test_balanced_splits_each_layer_evenly():
    owner = strategies.balanced(SIZES, 3)
    table = MetadataTable.build(SIZES, owner, 3)
    for layer, n in enumerate(SIZES):
        counts = table.counts(layer)
        assert counts.sum() == n and counts.max() - counts.min() <= 1


def test_percentage_rounds_by_largest_remainder():
    owner = strategies.by_percentage([10], 3, [33.4, 33.3, 33.3])
    assert np.bincount(owner).tolist() == [4, 3, 3]


def test_layers_puts_whole_layers_on_ranks():
    owner = strategies.by_layers(SIZES, 2, [0, 1, 1, 0])
    assert owner.tolist() == [0] * 7 + [1] * 24 + [0] * 5


@pytest.mark.parametrize("call, message", [
    (lambda: strategies.by_count(SIZES, 2, [10, 10]), "sum to 20 but the model has 36 neurons"),
    (lambda: strategies.by_count(SIZES, 2, [36]), "gives 1 entries but the job has 2 ranks"),
    (lambda: strategies.by_count(SIZES, 2, [40, -4]), "must not be negative"),
    (lambda: strategies.by_percentage(SIZES, 2, [50, 49]), "sum to 99, not 100"),
    (lambda: strategies.by_percentage(SIZES, 3, [50, 50]), "gives 2 entries but the job has 3 ranks"),
    (lambda: strategies.by_ids(SIZES, 2, {"0": [[0, 20]], "1": [[19, 36]]}), "global id 19 .*overlap"),
    (lambda: strategies.by_ids(SIZES, 2, {"0": [[0, 20]], "1": [[21, 36]]}),
     "1 global ids are given to no rank .*20"),
    (lambda: strategies.by_ids(SIZES, 2, {"0": [[0, 36]], "1": [40]}),
     "global id 40 of rank 1 is out of range"),
    (lambda: strategies.by_ids(SIZES, 2, {"0": [[0, 36]], "5": []}), "rank 5 is outside 0..1"),
    (lambda: strategies.by_ids(SIZES, 2, {"0": ["x"]}), "expected a global id"),
    (lambda: strategies.by_layers(SIZES, 2, [0, 1, 1]), "gives 3 entries but the model has 4 layers"),
    (lambda: strategies.by_layers(SIZES, 2, [0, 1, 2, 0]), "layer 2 goes to rank 2, outside 0..1"),
    (lambda: strategies.partition(SIZES, 2, "random"), "unknown partition strategy 'random'"),
    (lambda: strategies.partition(SIZES, 2, "count"), "needs --counts"),
])
def test_bad_partition_specs_are_refused_with_a_clear_message(call, message):
    with pytest.raises(MpinnError, match=message):
        call()


def test_ids_flag_reads_json_file(tmp_path):
    spec = strategy_params("ids", SIZES, 3)["ids"]
    path = tmp_path / "ids.json"
    path.write_text(json.dumps(spec))
    params = strategies.params_from_flags("ids", ids=str(path))
    assert np.array_equal(strategies.partition(SIZES, 3, "ids", params), strategies.by_ids(SIZES, 3, spec))
    path.write_text("{not json")
    with pytest.raises(MpinnError, match="not valid JSON"):
        strategies.params_from_flags("ids", ids=str(path))


def test_metadata_local_index_is_position_among_owners_rows():
    owner = strategies.by_ids(SIZES, 3, strategy_params("ids", SIZES, 3)["ids"])
    table = MetadataTable.build(SIZES, owner, 3)
    for layer in range(len(SIZES)):
        for rank in range(3):
            rows = table.rows(layer, rank)
            assert table.layer_local_index(layer)[rows].tolist() == list(range(rows.size))


def test_metadata_refuses_owner_outside_job():
    with pytest.raises(MpinnError, match="rank 3, outside 0..1"):
        MetadataTable.build(SIZES, np.full(36, 3), 2)


def plain_lookups(owner: np.ndarray, nranks: int) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """What the table must answer, from the plain owner array: local index of each neuron
    (its position among its owner's neurons), each rank's rows and counts."""
    rows = [np.flatnonzero(owner == r) for r in range(nranks)]
    local = np.empty(owner.size, dtype=np.int64)
    for r in range(nranks):
        local[rows[r]] = np.arange(rows[r].size)
    return local, rows, np.array([x.size for x in rows])


def check_table_against_owner(table: MetadataTable, owner: np.ndarray, sizes: list[int],
                              nranks: int) -> None:
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    for layer, n in enumerate(sizes):
        layer_owner = owner[offsets[layer]:offsets[layer + 1]]
        local, rows, counts = plain_lookups(layer_owner, nranks)
        index = np.arange(n)
        assert np.array_equal(table.owner_of(layer, index), layer_owner)
        assert np.array_equal(table.local_index(layer, index), local)
        assert np.array_equal(table.layer_owner(layer), layer_owner)
        picked = index[::-1][::3]  # lookups of a subset, out of order
        assert np.array_equal(table.owner_of(layer, picked), layer_owner[picked])
        assert np.array_equal(table.local_index(layer, picked), local[picked])
        assert np.array_equal(table.counts(layer), counts)
        for r in range(nranks):
            assert np.array_equal(table.rows(layer, r), rows[r])
    assert np.array_equal(table.owner, owner)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), sizes=st.lists(st.integers(1, 60), min_size=2, max_size=5),
       nranks=st.integers(1, 6), run_length=st.integers(1, 40))
def test_metadata_lookups_on_runs_and_arrays_equal_the_plain_owner_array(data, sizes, nranks,
                                                                          run_length):
    """Random partitions made of runs of random ranks: long runs are stored as runs, short
    ones as an owner array; every lookup must agree with the owner array either way."""
    total = sum(sizes)
    ranks = data.draw(st.lists(st.integers(0, nranks - 1), min_size=-(-total // run_length),
                               max_size=-(-total // run_length)))
    owner = np.repeat(np.asarray(ranks, dtype=np.int32), run_length)[:total]
    check_table_against_owner(MetadataTable.build(sizes, owner, nranks), owner, sizes, nranks)
    # and both forms on every layer, whichever the table picked
    layer_owner = owner[:sizes[0]]
    local, rows, counts = plain_lookups(layer_owner, nranks)
    index = np.arange(sizes[0])[::-1]
    for form in (OwnerRuns.from_owner(layer_owner, nranks),
                 OwnerArray(layer_owner.astype(owner_dtype(nranks)))):
        assert np.array_equal(form.owner_of(index), layer_owner[index])
        assert np.array_equal(form.local_index(index), local[index])
        assert np.array_equal(form.counts(nranks), counts)
        assert np.array_equal(form.owners(), layer_owner)
        assert all(np.array_equal(form.rows(r), rows[r]) for r in range(nranks))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("nranks", [1, 2, 3, 4])
def test_metadata_of_every_strategy_answers_like_its_owner_array(strategy, nranks):
    sizes = [40, 300, 260, 9]
    owner = strategies.partition(sizes, nranks, strategy, strategy_params(strategy, sizes, nranks))
    check_table_against_owner(MetadataTable.build(sizes, owner, nranks), owner, sizes, nranks)


def test_metadata_of_contiguous_partitions_is_a_few_integers_per_rank_and_layer():
    sizes = [2**20, 2**20, 16]
    table = MetadataTable.build(sizes, strategies.balanced(sizes, 4), 4)
    assert all(isinstance(layer, OwnerRuns) for layer in table.layers[:2])
    # 4 runs per wide layer; the 16 outputs are cheaper as 16 one-byte owners
    assert table.nbytes <= 2 * 5 * RUN_BYTES + 16 + 8 * (len(sizes) + 1)


def test_metadata_of_scattered_owners_is_one_small_integer_per_neuron():
    rng = np.random.default_rng(0)
    sizes = [5000, 7000]
    for nranks, width in ((3, 1), (256, 1), (257, 2), (70000, 4)):
        owner = rng.integers(0, nranks, size=sum(sizes)).astype(np.int32)
        table = MetadataTable.build(sizes, owner, nranks)
        assert all(isinstance(layer, OwnerArray) for layer in table.layers)
        assert table.nbytes == width * sum(sizes) + table.offsets.nbytes
        assert owner_dtype(nranks).itemsize == width
        # lookups are widened: subtracting a rank never wraps around
        assert table.owner_of(0, np.arange(3)).dtype == np.int64
