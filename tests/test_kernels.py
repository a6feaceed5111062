"""Pure kernels against plain numpy, no MPI."""

import numpy as np
import pytest

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
        grad = np.full(w.nnz, 7.0)
        kernels.csr_weight_grad(w.indptr, w.indices, rows, dz, x, grad, first=True,
                                chunk_elements=20)
        np.testing.assert_allclose(grad, (dz @ x.T)[rows, w.indices], rtol=1e-12)
        kernels.csr_weight_grad(w.indptr, w.indices, rows, dz, x, grad, first=False)
        np.testing.assert_allclose(grad, 2 * (dz @ x.T)[rows, w.indices], rtol=1e-12)


def test_relu_cap_needs_a_finite_positive_cap():
    assert kernels.check_cap(32, "layer 1") == 32.0
    for bad in (None, 0, -1.0, float("inf"), True, "3"):
        with pytest.raises(MpinnError, match="finite positive 'cap'"):
            kernels.check_cap(bad, "layer 1")


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


def test_init_rows_bounds_follow_fan_in():
    w, b = kernels.init_rows(np.random.default_rng(0), 50, 100, 10, "relu", np.float32)
    assert w.dtype == np.float32 and np.abs(w).max() <= np.sqrt(6 / 100) and not b.any()
