"""GraphChallenge Sparse DNN helpers: RadiX-Net wiring, inputs, reference inference, TSV files.

Plain pytest, no MPI. The survival tests run the full 1024-neuron, 120-layer network: they
are the proof that the generator is a RadiX-Net and not random wiring.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from mpinn.errors import MpinnError
from mpinn.tools import sparse_dnn as sd


def degrees(weight: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Nonzeros per row and per column."""
    return np.diff(weight.indptr), np.bincount(weight.indices, minlength=weight.shape[1])


def radixnet(n: int, depth: int, seed: int | None = 0) -> Iterator[sp.csr_matrix]:
    """Layers 1..depth, generated one at a time."""
    return (sd.radixnet_layer(n, layer, seed=seed) for layer in range(1, depth + 1))


def random_wiring(n: int, depth: int, fan_in: int, seed: int) -> Iterator[sp.csr_matrix]:
    """Layers with ``fan_in`` distinct uniformly random inputs per neuron, weights WEIGHT."""
    rng = np.random.default_rng(seed)
    for _ in range(depth):
        columns = np.sort(np.argpartition(rng.random((n, n), dtype=np.float32), fan_in, axis=1)[:, :fan_in])
        indptr = np.arange(0, n * fan_in + 1, fan_in)
        yield sp.csr_matrix((np.full(n * fan_in, sd.WEIGHT, np.float32), columns.ravel(), indptr),
                            shape=(n, n))


# ---------------------------------------------------------------- RadiX-Net layers


@pytest.mark.parametrize("seed", [0, None])
@pytest.mark.parametrize("n", [1024, 4096])
def test_radixnet_layer_has_fan_in_nonzeros_per_row_and_column(n, seed):
    for layer in (1, 2, 3, 8, 9):
        rows, columns = degrees(sd.radixnet_layer(n, layer, seed=seed))
        assert (rows == sd.FAN_IN).all() and (columns == sd.FAN_IN).all(), (n, layer, seed)


def test_radixnet_layer_is_canonical_float32_csr_of_challenge_weights():
    weight = sd.radixnet_layer(1024, 5)
    assert isinstance(weight, sp.csr_matrix) and weight.shape == (1024, 1024)
    assert weight.dtype == np.float32 and weight.indices.dtype == np.int32
    assert (weight.data == np.float32(sd.WEIGHT)).all()
    rebuilt = sp.csr_matrix((weight.data, weight.indices, weight.indptr), shape=weight.shape)
    rebuilt.sum_duplicates()
    rebuilt.sort_indices()
    assert np.array_equal(rebuilt.indices, weight.indices) and weight.nnz == 1024 * sd.FAN_IN


def test_plain_radixnet_layers_are_sums_of_cyclic_shifts_by_place_values():
    n = 1024
    receivers = np.arange(n)[:, None]
    for layer, stride in ((1, 1), (2, 32), (3, 1), (4, 32)):
        weight = sd.radixnet_layer(n, layer, seed=None)
        expected = np.sort((receivers - np.arange(32)[None, :] * stride) % n, axis=1)
        assert np.array_equal(weight.indices.reshape(n, 32), expected), layer


def test_radix_plan_of_challenge_sizes_keeps_fan_in_32():
    assert sd.radix_plan(1024) == (32, 1, 2)
    for n in sd.CHALLENGE_BIAS:
        radix, block, digits = sd.radix_plan(n)
        assert radix * block == sd.FAN_IN and block * radix**digits == n


def test_radixnet_layers_differ_across_depth():
    layers = [sd.radixnet_layer(1024, layer) for layer in range(1, 5)]
    for a in range(4):
        for b in range(a + 1, 4):
            assert (layers[a] != layers[b]).nnz > 0, (a + 1, b + 1)
    plain = [sd.radixnet_layer(1024, layer, seed=None) for layer in (1, 2)]
    assert (plain[0] != plain[1]).nnz > 0


def test_radixnet_layer_is_deterministic_per_seed():
    for seed in (0, 7):
        assert (sd.radixnet_layer(4096, 3, seed=seed) != sd.radixnet_layer(4096, 3, seed=seed)).nnz == 0
    assert (sd.radixnet_layer(4096, 3, seed=0) != sd.radixnet_layer(4096, 3, seed=7)).nnz > 0


def test_relabelling_changes_neither_categories_nor_output_values():
    y0 = sd.sparse_inputs(1024, 300, seed=3)
    plain = sd.infer(radixnet(1024, 24, seed=None), -0.3, y0)
    hidden = sd.infer(radixnet(1024, 24, seed=5), -0.3, y0)
    assert np.array_equal(sd.categories(plain), sd.categories(hidden))
    assert np.array_equal(np.sort(plain, axis=1), np.sort(hidden, axis=1))  # same values, neurons renamed


@pytest.mark.parametrize("n, layer, fan_in", [(1000, 1, 32), (1024, 0, 32), (16, 1, 32), (1024, 1, 1)])
def test_radixnet_layer_refuses_sizes_it_cannot_build(n, layer, fan_in):
    with pytest.raises(MpinnError):
        sd.radixnet_layer(n, layer, fan_in=fan_in)


def test_challenge_bias_follows_table_and_defaults_for_other_powers_of_two():
    assert [sd.challenge_bias(n) for n in (1024, 4096, 16384, 65536)] == [-0.30, -0.35, -0.40, -0.45]
    assert sd.challenge_bias(64) == sd.challenge_bias(2048) == -0.30
    for bad in (1000, 16, 0):
        with pytest.raises(MpinnError, match="1024, 4096, 16384, 65536"):
            sd.challenge_bias(bad)


# ---------------------------------------------------------------- inputs, inference, categories


def test_sparse_inputs_are_binary_with_exact_density_and_deterministic():
    y0 = sd.sparse_inputs(1024, 50, density=0.2, seed=4)
    assert y0.shape == (50, 1024) and y0.dtype == np.float32
    assert set(np.unique(y0)) == {0.0, 1.0}
    assert (y0.sum(axis=1) == round(0.2 * 1024)).all()
    assert np.array_equal(y0, sd.sparse_inputs(1024, 50, density=0.2, seed=4))
    assert not np.array_equal(y0, sd.sparse_inputs(1024, 50, density=0.2, seed=5))
    assert not sd.sparse_inputs(64, 3, density=0.0).any()


def test_infer_matches_hand_computation_on_tiny_network():
    y0 = np.array([[1, 0, 2], [0, 0, 0]], dtype=np.float32)
    w1 = sp.csr_matrix(np.array([[1, 1, 0], [0, 0, 4], [0.5, 0, 0]], dtype=np.float32))
    w2 = sp.csr_matrix(np.array([[0, 2, 0], [1, 0, 1], [0, 0, 0]], dtype=np.float32))
    # layer 1, sample 0: [1, 8, 0.5] - 0.5 -> [0.5, 7.5, 0] -> capped at 5: [0.5, 5, 0]
    # layer 2: [10, 0.5, 0] - 0.5 -> [9.5, 0, -0.5] -> [5, 0, 0]; sample 1 stays 0
    y = sd.infer([w1, w2], -0.5, y0, cap=5.0)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, [[5, 0, 0], [0, 0, 0]])
    assert np.array_equal(sd.categories(y), [0]) and sd.categories(y).dtype == np.int64


def test_infer_keeps_zero_rows_when_a_positive_bias_revives_them():
    y = sd.infer([sp.identity(2, dtype=np.float32, format="csr")] * 2, 0.5, np.zeros((1, 2), np.float32))
    np.testing.assert_array_equal(y, [[1.0, 1.0]])


def test_infer_refuses_layers_that_do_not_chain():
    with pytest.raises(MpinnError, match="layer 2 has 4 inputs"):
        sd.infer([sp.identity(3, format="csr"), sp.identity(4, format="csr")], -0.3, np.ones((1, 3)))


def test_radixnet_keeps_some_but_not_all_categories_over_120_layers():
    y0 = sd.sparse_inputs(1024, 500)
    alive = sd.categories(sd.infer(radixnet(1024, 120), sd.challenge_bias(1024), y0))
    assert 0 < alive.size < 500, alive.size


def test_random_wiring_with_challenge_parameters_keeps_no_category():
    y0 = sd.sparse_inputs(1024, 500)
    y = sd.infer(random_wiring(1024, 120, sd.FAN_IN, seed=1), sd.challenge_bias(1024), y0)
    assert sd.categories(y).size == 0


# ---------------------------------------------------------------- GraphChallenge TSV files


def test_tsv_layer_round_trip_in_challenge_convention(tmp_path):
    for layer in (1, 2, 3):
        weight = sd.radixnet_layer(64, layer, fan_in=8, seed=2)
        path = tmp_path / f"n64-l{layer}.tsv"
        sd.write_tsv_layer(path, weight)
        again = sd.read_tsv_layer(path, 64)
        assert again.dtype == np.float32 and again.indices.dtype == np.int32 and again.has_canonical_format
        assert (again != weight).nnz == 0
    out, into = 5, 9  # our W[receiver, input] is their line "input  receiver  value"
    single = sp.csr_matrix(([0.0625], ([out], [into])), shape=(16, 16), dtype=np.float32)
    sd.write_tsv_layer(tmp_path / "one.tsv", single)
    assert (tmp_path / "one.tsv").read_text() == f"{into + 1}\t{out + 1}\t0.0625\n"


def test_tsv_inputs_and_categories_round_trip(tmp_path):
    y0 = sd.sparse_inputs(64, 7, seed=1)
    y0[6] = 0  # a trailing empty sample is only kept when the count is given
    sd.write_tsv_inputs(tmp_path / "sparse-images-64.tsv", y0)
    assert np.array_equal(sd.read_tsv_inputs(tmp_path / "sparse-images-64.tsv", 64, samples=7), y0)
    assert np.array_equal(sd.read_tsv_inputs(tmp_path / "sparse-images-64.tsv", 64), y0[:6])
    cats = np.array([0, 3, 4, 10], dtype=np.int64)
    sd.write_categories(tmp_path / "cats.tsv", cats)
    assert (tmp_path / "cats.tsv").read_text() == "1\n4\n5\n11\n"
    assert np.array_equal(sd.read_categories(tmp_path / "cats.tsv"), cats)
    sd.write_categories(tmp_path / "none.tsv", np.zeros(0, np.int64))
    assert sd.read_categories(tmp_path / "none.tsv").size == 0


@pytest.mark.parametrize("text, line, message", [
    ("1\t2\t0.0625\n1\t3\n", 2, "expected 'input<TAB>output<TAB>value'"),
    ("1\t2\t0.0625\n\n1\tx\t0.0625\n", 3, "expected"),
    ("1\t2\t0.0625\n1\t17\t0.0625\n", 2, "output index 17 is outside 1..16"),
    ("0\t2\t0.0625\n", 1, "input index 0 is outside 1..16"),
    ("1\t2\t0.0625\n1.5\t2\t0.0625\n", 2, "expected"),
    ("1\t2\tabc\n", 1, "expected"),
    ("1\t2\tnan\n", 1, "not finite"),
    ("1\t2\t0.0625\n3\t4\t1\n1\t2\t0.0625\n", 3,
     "duplicate entry (input 1, output 2), first given on line 1"),
])
def test_read_tsv_layer_errors_name_file_and_line(tmp_path, text, line, message):
    path = tmp_path / "n16-l1.tsv"
    path.write_text(text)
    with pytest.raises(MpinnError) as caught:
        sd.read_tsv_layer(path, 16)
    assert f"{path}:{line}:" in str(caught.value) and message in str(caught.value)


def test_read_tsv_inputs_and_categories_errors_name_file_and_line(tmp_path):
    inputs = tmp_path / "sparse-images-16.tsv"
    inputs.write_text("1\t1\t1\n3\t16\t1\n")
    with pytest.raises(MpinnError, match=re.escape(f"{inputs}:2: sample index 3 is outside 1..2")):
        sd.read_tsv_inputs(inputs, 16, samples=2)
    cats = tmp_path / "cats.tsv"
    cats.write_text("2\n5\n2\n")
    with pytest.raises(MpinnError, match=re.escape(f"{cats}:3: sample 2 already listed on line 1")):
        sd.read_categories(cats)
    cats.write_text("2\n0\n")
    with pytest.raises(MpinnError, match=re.escape(f"{cats}:2:")):
        sd.read_categories(cats)


def test_written_challenge_layer_reads_back_as_same_network(tmp_path):
    paths: list[Path] = []
    for layer in range(1, 7):
        paths.append(tmp_path / f"n1024-l{layer}.tsv")
        sd.write_tsv_layer(paths[-1], sd.radixnet_layer(1024, layer))
    y0 = sd.sparse_inputs(1024, 40)
    from_files = sd.infer((sd.read_tsv_layer(p, 1024) for p in paths), -0.3, y0)
    np.testing.assert_array_equal(from_files, sd.infer(radixnet(1024, 6), -0.3, y0))
