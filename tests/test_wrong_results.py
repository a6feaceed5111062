"""No silent wrong results and no tracebacks (issue 25, items 12-15): data that differs
between ranks, training without targets or from an impossible stored position, a resume with
nothing left to train, float targets on softmax, and bad API arguments are refused or said
in one line, and change nothing.

Serial tests cover the pure parts and the API at one rank (every check is per call);
``@pytest.mark.mpi(min_size=2)`` tests run under ``mpirun -n N python -m pytest --with-mpi``;
the CLI's tests run ``mpinn`` under ``mpirun -n 2``.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from mpinn.errors import MpinnError
from tests.test_cli import DIGITS_TRAIN, mpinn, ok
from tests.test_user_mistakes import assert_no_leftovers, refused


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """The issue's model: ``init M --sizes 64,32,10 --seed 1``."""
    path = tmp_path / "M.h5"
    ok(mpinn(1, "init", str(path), "--sizes", "64,32,10", "--seed", "1"))
    return path


def _comm():
    from mpi4py import MPI
    return MPI.COMM_WORLD


def _tiny(path: Path, output: str = "softmax"):
    from mpinn import Network
    return Network.create(str(path), sizes=[4, 3, 2], output=output, seed=0, force=True)


def _arrays(n: int = 10) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.random((n, 4)).astype(np.float32), np.arange(n) % 2


def _set_state(path: Path, **attrs: object) -> None:
    with h5py.File(path, "r+") as f:
        for key, value in attrs.items():
            f["state"].attrs[key] = json.dumps(value)


# ---------------------------------------------------------------- 12: the same data on every rank


def test_the_digest_sees_every_row_and_not_the_memory_layout():
    from mpinn.data import _digest
    x, y = _arrays(3000)
    digest = _digest(x, y)
    for row in (1, 1501, 2999):  # rows a sample of every other row would skip
        changed = x.copy()
        changed[row, 3] += 1
        assert _digest(changed, y) != digest
        labels = y.copy()
        labels[row] = 1 - labels[row]
        assert _digest(x, labels) != digest
    assert _digest(np.asfortranarray(x), y) == digest  # the bytes of the values, row-major
    assert _digest(x[:, :2], None) == _digest(x[:, :2].copy(), None)


@pytest.mark.mpi(min_size=2)
def test_arrays_differing_between_ranks_in_one_unsampled_row_are_refused(mpi_tmp_path):
    comm = _comm()
    net = _tiny(mpi_tmp_path / "m.h5")
    before = Path(net.path).read_bytes()
    x, y = _arrays(3000)  # the old check sampled every other row of these: row 1 never
    xs, ys = x.copy(), y.copy()
    if comm.rank == 1:
        xs[1, 0] += 1.0
    with pytest.raises(MpinnError, match="must be the same on every rank, but rank 1"):
        net.fit(xs, y)
    if comm.rank == 1:
        ys[2999] = 1 - ys[2999]
    with pytest.raises(MpinnError, match="must be the same on every rank, but rank 1"):
        net.evaluate(x, ys)
    net.close()
    comm.Barrier()
    assert Path(net.path).read_bytes() == before


# ---------------------------------------------------------------- 13: nothing trained, nothing committed


def test_fit_without_targets_or_samples_is_refused_and_commits_nothing(tmp_path):
    net = _tiny(tmp_path / "m.h5")
    before = Path(net.path).read_bytes()
    x, y = _arrays()
    with pytest.raises(MpinnError, match="fit needs y"):
        net.fit(x, None)
    with pytest.raises(MpinnError, match="validation_data needs y"):
        net.fit(x, y, validation_data=(x, None))
    with pytest.raises(MpinnError, match="X holds no samples"):
        net.fit(x[:0], y[:0])
    assert net.epoch == 0
    net.close()
    assert Path(net.path).read_bytes() == before


def test_a_stored_batch_position_past_the_epoch_is_refused_and_commits_nothing(model, tmp_path):
    ok(mpinn(1, "train", str(model), "--data", DIGITS_TRAIN, "--epochs", "1", "--quiet"))
    _set_state(model, batch=10**15)
    before = model.read_bytes()
    result = mpinn(2, "train", str(model), "--data", DIGITS_TRAIN, "--epochs", "2", "--resume")
    refused(result, "/state attribute 'batch' is 1000000000000000, but epoch 2 has only 23 batches")
    assert model.read_bytes() == before
    assert_no_leftovers(tmp_path)


def test_resume_with_nothing_left_to_train_says_so_in_one_line_and_changes_nothing(model,
                                                                                  tmp_path):
    ok(mpinn(1, "train", str(model), "--data", DIGITS_TRAIN, "--epochs", "2", "--quiet"))
    before = model.read_bytes()
    out = ok(mpinn(2, "train", str(model), "--data", DIGITS_TRAIN, "--resume", "--quiet"))
    assert out.strip().splitlines() == [
        f"mpinn: nothing to train: {model} already has 2 epochs; --resume trains until --epochs N "
        "are complete in all (--epochs 1): give an --epochs above 2"]
    assert model.read_bytes() == before
    assert_no_leftovers(tmp_path)


# ---------------------------------------------------------------- 14: float targets on softmax


def _soft_labels(n: int, n_out: int, seed: int, dtype: str) -> np.ndarray:
    """Rows that are probability distributions, some of them one-hot, some smoothed."""
    rng = np.random.default_rng(seed)
    p = rng.random((n, n_out)) ** 3
    p[::3] = np.eye(n_out)[rng.integers(0, n_out, size=len(p[::3]))]
    return (p / p.sum(axis=1, keepdims=True)).astype(dtype)


def test_soft_label_cross_entropy_and_its_gradient_equal_torch():
    import torch

    from mpinn import kernels
    z = np.random.default_rng(1).normal(size=(5, 7))  # (outputs, batch), neuron-major
    p = _soft_labels(7, 5, seed=2, dtype="float64").T
    top = z.max(axis=0)
    log_sum = np.log(np.exp(z - top).sum(axis=0))
    loss = kernels.soft_cross_entropy_local(z, top, log_sum, p)
    logits = torch.tensor(z.T, requires_grad=True)
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor(p.T), reduction="sum")
    expected.backward()
    np.testing.assert_allclose(loss, expected.item(), rtol=1e-12)
    softmax = np.exp(z - top) / np.exp(z - top).sum(axis=0)
    np.testing.assert_allclose(softmax - p, logits.grad.numpy().T, rtol=1e-10, atol=1e-14)


@pytest.mark.mpi
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_soft_labels_on_softmax_train_as_the_reference_cross_entropy(micro_batches, mpi_tmp_path):
    """At any rank count the output columns of a sample are split over the ranks: each rank
    holds a part of the distribution, the loss and gradients are still the whole one's."""
    from mpinn import Network
    from tests.reference import Reference, assert_close
    comm = _comm()
    path = str(mpi_tmp_path / "m.h5")
    Network.create(path, sizes=[6, 9, 5], activation="tanh", seed=3, dtype="float64", force=True)
    ref = Reference.from_file(path)
    comm.Barrier()
    x = np.random.default_rng(4).normal(size=(20, 6))
    y = _soft_labels(20, 5, seed=5, dtype="float64")
    with Network.open(path) as net:
        history = net.fit(x, y, epochs=2, batch_size=8, lr=0.2, seed=7,
                          micro_batches=micro_batches, validation_data=(x, y))
        metrics = net.evaluate(x, y)
    losses = ref.train(x, y, 2, 8, 0.2, seed=7)
    assert_close(history["loss"], losses, "float64", "epoch losses")
    assert_close(metrics["loss"], ref.loss_and_grads(x, y)[0], "float64", "evaluate loss")
    with h5py.File(path, "r") as f:
        for i in (1, 2):
            assert_close(f[f"layers/{i}/weight"][...], ref.weights[i - 1], "float64", f"weight {i}")


@pytest.mark.parametrize("bad,message", [
    ("regression", "sums to"), ("negative", "has a negative target")])
def test_float_targets_that_are_not_distributions_are_refused_on_softmax(tmp_path, bad, message):
    net = _tiny(tmp_path / "m.h5")
    before = Path(net.path).read_bytes()
    x, _ = _arrays()
    y = 3 * np.random.default_rng(0).random((10, 2)).astype(np.float32)  # regression targets
    if bad == "negative":
        y = np.tile(np.array([[1.5, -0.5]], np.float32), (10, 1))  # sums to 1, not a distribution
    with pytest.raises(MpinnError, match=f"{message}.*--output identity"):
        net.fit(x, y)
    with pytest.raises(MpinnError, match=message):
        net.evaluate(x, y)
    net.close()
    assert Path(net.path).read_bytes() == before


def test_a_torch_classifier_ending_in_logits_is_named_at_import_and_takes_output_softmax(tmp_path):
    import torch
    from torch import nn

    from mpinn.torch_io import save_torch_file
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    pt, plain, soft = tmp_path / "c.pt", tmp_path / "plain.h5", tmp_path / "soft.h5"
    save_torch_file(model, str(pt))
    result = mpinn(1, "import-torch", str(pt), str(plain))
    ok(result)
    assert "ends in a Linear with no activation (logits)" in result.stderr
    assert "--output softmax" in result.stderr
    result = mpinn(1, "import-torch", str(pt), str(soft), "--output", "softmax")
    ok(result)
    assert "logits" not in result.stderr
    with h5py.File(plain, "r") as f, h5py.File(soft, "r") as g:
        assert f["layers/2"].attrs["activation"] in ("identity", b"identity")
        assert g["layers/2"].attrs["activation"] in ("softmax", b"softmax")
        np.testing.assert_array_equal(f["layers/2/weight"][...], g["layers/2/weight"][...])
    refused(mpinn(1, "import-torch", str(pt), str(tmp_path / "again.h5"), "--activation", "relu"),
            "--activation names the activations of a bare state_dict")
