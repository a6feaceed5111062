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
