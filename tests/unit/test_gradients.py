"""Gradients agree with finite differences (float64), for the reference (dense and CSR layers,
relu_cap) and the engine itself."""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

from mpinn.io import create, datafile
from mpinn.io.datafile import load
from mpinn.model import DistributedModel
from mpinn.partition.choice import PartitionChoice
from tests.helpers import classification_data, regression_data
from tests.reference import Reference

CASES = [
    ([5, 8, 6, 4], ["tanh", "sigmoid", "softmax"], True),   # cross-entropy
    ([5, 7, 3], ["relu", "softmax"], "soft"),                # soft-label cross-entropy
    ([4, 6, 3], ["sigmoid", "identity"], False),              # squared error, regression
]


@pytest.mark.parametrize("sizes, acts, labels", CASES)
def test_engine_gradients_match_finite_differences(sizes, acts, labels, tmp_path):
    comm = MPI.COMM_SELF
    model_path, data_path = str(tmp_path / "m.h5"), str(tmp_path / "d.h5")
    create.create_model(model_path, sizes, acts, "float64", seed=2, comm=comm)
    make = classification_data if labels is True else regression_data
    x, y = make(6, sizes[0], sizes[-1], seed=4, dtype="float64")
    if labels == "soft":  # float targets on softmax: probability distributions
        y = np.exp(y) / np.exp(y).sum(axis=1, keepdims=True)
    datafile.write_data(data_path, x, y)
    with DistributedModel(model_path, comm, PartitionChoice(), 6) as model:
        data = load(data_path, model.table, model.spec.dtype, comm)
        xb, lab, tgt = data.batch(np.arange(6))
        engine = model.engine

        def loss() -> float:
            return engine.loss_and_grad(engine.forward(xb), lab, tgt).loss_sum / 6

        loss()
        engine.backward()
        rng = np.random.default_rng(0)
        eps = 1e-6
        for (param, grad) in engine.parameters():
            analytic = grad.copy()
            flat = param.reshape(-1)
            for k in rng.choice(flat.size, size=min(8, flat.size), replace=False):
                saved = flat[k]
                flat[k] = saved + eps
                up = loss()
                flat[k] = saved - eps
                down = loss()
                flat[k] = saved
                numeric = (up - down) / (2 * eps)
                assert abs(numeric - analytic.reshape(-1)[k]) <= 1e-7 * max(1.0, abs(numeric)), \
                    f"param {param.shape} entry {k}: numeric {numeric} analytic {analytic.reshape(-1)[k]}"


REFERENCE_CASES = [
    # CSR layers, relu_cap hitting its cap, cross-entropy
    ([5, 9, 6, 4], ["relu_cap", "tanh", "softmax"], ["csr", "dense", "csr"], True, 0.4),
    # squared error through a CSR relu_cap layer and an identity output
    ([5, 8, 7, 3], ["sigmoid", "relu_cap", "identity"], ["dense", "csr", "csr"], False, 0.15),
]


@pytest.mark.parametrize("sizes, acts, storages, labels, cap", REFERENCE_CASES)
def test_reference_gradients_match_finite_differences(sizes, acts, storages, labels, cap, tmp_path):
    """The yardstick itself: tests/reference.py's gradients of the stored CSR values and of
    relu_cap (0 above the cap) against central differences of its own loss."""
    path = str(tmp_path / "m.h5")
    create.create_model(path, sizes, acts, "float64", seed=2, comm=MPI.COMM_SELF, storages=storages,
                     sparse=create.SparseInit(density=0.6), cap=cap)
    ref = Reference.from_file(path)
    make = classification_data if labels else regression_data
    x, y = make(7, sizes[0], sizes[-1], seed=4, dtype="float64")
    zs, _ = ref.forward(x)
    capped = zs[acts.index("relu_cap")]
    assert (capped > cap).any() and ((capped > 0) & (capped < cap)).any()  # both sides of the cap
    _, gw, gb = ref.loss_and_grads(x, y)
    rng = np.random.default_rng(0)
    eps = 1e-6
    for param, grad in zip(ref.parameters(), gw + gb, strict=True):
        for k in rng.choice(param.size, size=min(12, param.size), replace=False):
            flat = param.reshape(-1)
            saved = flat[k]
            flat[k] = saved + eps
            up = ref.loss_and_grads(x, y)[0]
            flat[k] = saved - eps
            down = ref.loss_and_grads(x, y)[0]
            flat[k] = saved
            numeric, analytic = (up - down) / (2 * eps), np.asarray(grad).reshape(-1)[k]
            assert abs(numeric - analytic) <= 1e-7 * max(1.0, abs(numeric)), \
                f"param {param.shape} entry {k}: numeric {numeric} analytic {analytic}"
