"""Gradients agree with finite differences (float64), for the reference and the engine itself."""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

from mpinn import format as fmt
from mpinn.data import load
from mpinn.train import DistributedModel, PartitionChoice
from tests.helpers import classification_data, regression_data

CASES = [
    ([5, 8, 6, 4], ["tanh", "sigmoid", "softmax"], True),   # cross-entropy
    ([5, 7, 3], ["relu", "softmax"], False),                 # squared error through softmax
    ([4, 6, 3], ["sigmoid", "identity"], False),              # squared error, regression
]


@pytest.mark.parametrize("sizes, acts, labels", CASES)
def test_engine_gradients_match_finite_differences(sizes, acts, labels, tmp_path):
    comm = MPI.COMM_SELF
    model_path, data_path = str(tmp_path / "m.h5"), str(tmp_path / "d.h5")
    fmt.create_model(model_path, sizes, acts, "float64", seed=2, comm=comm)
    make = classification_data if labels else regression_data
    x, y = make(6, sizes[0], sizes[-1], seed=4, dtype="float64")
    fmt.write_data(data_path, x, y)
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
