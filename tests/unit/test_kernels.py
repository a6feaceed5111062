"""Pure kernels against plain numpy, no MPI."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpinn import kernels
from mpinn.errors import MpinnError
from tests.reference import apply, derivative


@pytest.mark.parametrize("act", ["identity", "relu", "relu_cap", "sigmoid", "tanh"])
def test_activation_and_derivative_match_reference(act):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(5, 7)) * 3
    a = kernels.activate(act, z, cap=2.0)
    np.testing.assert_allclose(a, apply(act, z, 2.0), rtol=1e-12)
    g = rng.normal(size=z.shape)
    np.testing.assert_allclose(kernels.activation_grad(act, z, a, g.copy(), 2.0),
                               g * derivative(act, z, a, 2.0), rtol=1e-12)


def test_csr_kernels_equal_dense_algebra_on_the_pattern():
    import scipy.sparse as sp
    rng = np.random.default_rng(3)
    w = sp.random(9, 13, density=0.3, random_state=4, format="csr")
    x, dz = rng.normal(size=(13, 5)), rng.normal(size=(9, 5))
    z = np.full((9, 5), 7.0)
    kernels.csr_matmul(w.indptr, w.indices, w.data, 13, x, z)
    np.testing.assert_allclose(z, w.toarray() @ x, rtol=1e-12)
    kernels.csr_matmul(w.indptr, w.indices, w.data, 13, x, z, accumulate=True)
    np.testing.assert_allclose(z, 2 * w.toarray() @ x, rtol=1e-12)
    partial = np.full((13, 5), 7.0)
    kernels.csr_transpose_matmul(w.indptr, w.indices, w.data, 13, dz, partial)
    np.testing.assert_allclose(partial, w.toarray().T @ dz, rtol=1e-12)
    rows = np.repeat(np.arange(9), np.diff(w.indptr))
    for fill in (0.3, 0.005):  # the GEMM-then-sample path and the gather path
        w = sp.random(9, 13, density=fill, random_state=4, format="csr")
        w.data[:] = 1
        if w.nnz == 0:
            w[2, 5] = 1
        rows = np.repeat(np.arange(9), np.diff(w.indptr))
        for chunk in (20, 1 << 21):  # many chunks, and one: the 7s never leak into a sum
            grad = np.full(w.nnz, 7.0)
            kernels.csr_weight_grad(w.indptr, w.indices, rows, dz, x, grad, chunk_elements=chunk)
            np.testing.assert_allclose(grad, (dz @ x.T)[rows, w.indices], rtol=1e-12)


def test_relu_cap_needs_a_finite_positive_cap():
    assert kernels.check_cap(32, "layer 1") == 32.0
    for bad in (None, 0, -1.0, float("inf"), True, "3"):
        with pytest.raises(MpinnError, match="finite positive 'cap'"):
            kernels.check_cap(bad, "layer 1")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sgd_update_in_the_weight_gradient_gemm_steps_the_weights_in_place(dtype):
    rng = np.random.default_rng(2)
    w, x, dz = (rng.normal(size=s).astype(dtype) for s in [(5, 7), (7, 3), (5, 3)])
    expected = w.astype(np.float64) - 0.1 * (dz.astype(np.float64) @ x.astype(np.float64).T)
    tol = 1e-6 if dtype == np.float32 else 1e-13
    weight = w.copy()
    kernels.dense_sgd_update(dz, x, weight, 0.1)  # BLAS, in place
    np.testing.assert_allclose(weight, expected, rtol=tol, atol=tol)
    strided = np.zeros((5, 14), dtype)[:, ::2]  # not contiguous: the numpy fallback
    strided[...] = w
    kernels.dense_sgd_update(dz, x, strided, 0.1)
    np.testing.assert_allclose(strided, expected, rtol=tol, atol=tol)
    kernels.dense_sgd_update(dz[:0], x, np.zeros((0, 7), dtype), 0.1)  # a rank without rows


def test_sigmoid_saturates_without_overflow():
    with np.errstate(all="raise"):
        a = kernels.activate("sigmoid", np.array([[-1000.0, 0.0, 1000.0]]))
    np.testing.assert_allclose(a, [[0.0, 0.5, 1.0]], atol=1e-30)


def test_dense_forward_backward_match_matrix_algebra():
    rng = np.random.default_rng(1)
    w, b, x, dz = (rng.normal(size=s) for s in [(4, 6), (4,), (6, 3), (4, 3)])
    np.testing.assert_allclose(kernels.dense_forward(w, b, x), w @ x + b[:, None])
    gw, gb, gx = np.empty((4, 6)), np.empty(4), np.empty((6, 3))
    kernels.dense_backward(x, dz, gw, gb)
    np.testing.assert_allclose(gw, dz @ x.T)
    np.testing.assert_allclose(gb, dz.sum(1))
    # local block (first 2 inputs) and remote block (the rest), as the engine splits them
    kernels.block_input_grad(w, dz, slice(0, 2), gx)
    kernels.block_input_grad(w, dz, slice(2, None), gx)
    np.testing.assert_allclose(gx, w.T @ dz)
    z = np.empty((4, 3))
    kernels.block_forward(w, x, slice(0, 2), z)
    kernels.block_forward(w, x, slice(2, None), z, scratch=np.empty((4, 3)))
    np.testing.assert_allclose(z, w @ x)


def test_softmax_only_allowed_last_and_unknown_refused():
    kernels.check_activation("softmax", True, "layer 2")
    with pytest.raises(MpinnError, match="only allowed on the last layer"):
        kernels.check_activation("softmax", False, "layer 1")
    with pytest.raises(MpinnError, match="unknown activation 'swish'"):
        kernels.check_activation("swish", False, "layer 1")


@pytest.mark.parametrize(("activation", "bound"), [
    ("relu", np.sqrt(6 / 100)), ("relu_cap", np.sqrt(6 / 100)),            # He: fan-in 100
    ("tanh", np.sqrt(6 / 160)), ("sigmoid", np.sqrt(6 / 160)),             # Glorot: 100 in, 60 out
    ("identity", np.sqrt(6 / 160)), ("softmax", np.sqrt(6 / 160))])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_init_rows_are_he_or_glorot_uniform(activation, bound, dtype):
    """Uniform on [-bound, bound]: within the bound, filling it, mean 0, variance bound²/3."""
    w, b = kernels.init_rows(np.random.default_rng(0), 400, 100, 60, activation, dtype)
    assert w.shape == (400, 100) and w.dtype == dtype and b.shape == (400,) and b.dtype == dtype
    assert not b.any()
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.999 * bound
    assert abs(w.mean()) < 4 * bound / np.sqrt(3 * w.size)  # four standard errors
    assert w.var() == pytest.approx(bound**2 / 3, rel=0.03)
    values, _ = kernels.init_rows(np.random.default_rng(0), 400, 100, 60, activation, dtype, n_values=900)
    assert values.shape == (900,) and np.abs(values).max() <= bound  # sparse rows: n_in is the mean fan-in


def pattern_rows(counts: np.ndarray, columns: np.ndarray) -> list[np.ndarray]:
    return np.split(columns, np.cumsum(counts)[:-1])


@settings(max_examples=60, deadline=None)
@given(n_in=st.integers(1, 300), counts=st.lists(st.integers(0, 300), min_size=1, max_size=40),
       seed=st.integers(0, 2**32 - 1))
def test_distinct_columns_are_distinct_sorted_in_range_and_as_many_as_asked(n_in, counts, seed):
    counts = np.minimum(np.asarray(counts), n_in)  # every regime: sparse, middle, complement
    columns = kernels.distinct_columns(np.random.default_rng(seed), counts, n_in)
    assert columns.size == counts.sum()
    for row, count in zip(pattern_rows(counts, columns), counts, strict=True):
        assert row.size == count and np.all(np.diff(row) > 0)
        assert row.size == 0 or (row[0] >= 0 and row[-1] < n_in)


@pytest.mark.parametrize("fan_in", [2, 4, 7, 9])  # rejection, middle (argsort), complement, rejection
def test_fan_in_pattern_is_uniform_over_inputs_and_pairs(fan_in):
    n_in, n_rows = 12 if fan_in < 9 else 40, 30000
    counts, columns = kernels.random_pattern(np.random.default_rng(fan_in), n_rows, n_in,
                                             fan_in, None)
    assert np.array_equal(counts, np.full(n_rows, fan_in))
    # each input is chosen with probability K/n, each pair of inputs with K(K-1)/(n(n-1))
    hits = np.bincount(columns, minlength=n_in) / n_rows
    sigma = np.sqrt(fan_in / n_in * (1 - fan_in / n_in) / n_rows)
    assert np.abs(hits - fan_in / n_in).max() < 5 * sigma
    rows = np.stack(pattern_rows(counts, columns))
    together = np.mean(np.any(rows == 0, axis=1) & np.any(rows == 1, axis=1))
    p_pair = fan_in * (fan_in - 1) / (n_in * (n_in - 1))
    assert abs(together - p_pair) < 5 * np.sqrt(p_pair * (1 - p_pair) / n_rows)


@pytest.mark.parametrize("density", [0.01, 0.3, 0.6, 0.95])
def test_density_pattern_counts_are_binomial_and_positions_uniform(density):
    n_in, n_rows = 200, 20000
    counts, columns = kernels.random_pattern(np.random.default_rng(5), n_rows, n_in, None, density)
    mean, var = n_in * density, n_in * density * (1 - density)
    assert abs(counts.mean() - mean) < 5 * np.sqrt(var / n_rows)
    assert abs(counts.var() / var - 1) < 0.1
    hits = np.bincount(columns, minlength=n_in) / n_rows
    assert np.abs(hits - density).max() < 5 * np.sqrt(density * (1 - density) / n_rows)
    # the counts are the stream's first draw: a counts-only pass sees the same ones
    again = kernels.pattern_counts(np.random.default_rng(5), n_rows, n_in, None, density)
    assert np.array_equal(again, counts)


def test_wide_fan_in_pattern_costs_connections_not_rows_times_inputs():
    # 1024 rows of 8 inputs out of 2^30: a per-(row, input) draw could not even allocate this
    counts, columns = kernels.random_pattern(np.random.default_rng(0), 1024, 2**30, 8, None)
    assert columns.size == 8192 and columns.max() < 2**30
    assert all(np.all(np.diff(row) > 0) for row in pattern_rows(counts, columns))


@pytest.mark.parametrize("name", [a for a in kernels.ACTIVATIONS if a != "softmax"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_activation_in_place_equals_into_a_new_array(name, dtype):
    """Inference engines activate in place (out is z): gelu and silu once read z after
    overwriting it, and evaluate disagreed with training's validation loss."""
    z = np.random.default_rng(3).normal(0, 3, size=(7, 50)).astype(dtype)
    cap = 2.0 if name == "relu_cap" else None
    expected = kernels.activate(name, z, cap=cap)
    in_place = z.copy()
    assert kernels.activate(name, in_place, out=in_place, cap=cap) is in_place
    np.testing.assert_array_equal(in_place, expected)


def test_the_cli_help_names_every_activation_the_kernels_know():
    from mpinn import config
    assert config.ACTIVATIONS == kernels.ACTIVATIONS
