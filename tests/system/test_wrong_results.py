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
import re
from pathlib import Path

import h5py
import numpy as np
import pytest

from mpinn.errors import MpinnError
from tests.system.test_cli import DIGITS_TRAIN, initialised, mpinn, ok
from tests.system.test_user_mistakes import assert_no_leftovers, refused


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """The issue's model: ``init M --sizes 64,32,10 --seed 1``."""
    return initialised(tmp_path / "M.h5", "--sizes", "64,32,10", "--seed", "1")


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
    from mpinn.io.datafile import _digest
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

    from mpinn.io.pytorch import save_torch_file
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


# ---------------------------------------------------------------- 15: tracebacks


BAD_CALLS = [  # (call, arguments, message): each a raw exception or a silent run before
    ("fit", dict(epochs=1.5), "fit: epochs must be a whole number >= 0, got 1.5"),
    ("fit", dict(epochs=True), "fit: epochs must be a whole number >= 0, got True"),
    ("fit", dict(batch_size=-1), "fit: batch_size must be a whole number >= 1, got -1"),
    ("fit", dict(seed=-1), "fit: seed must be a whole number >= 0 and <= 9223372036854775807"),
    ("fit", dict(optimizer="Adam"), "fit: optimizer must be one of sgd, adam, adamw .or None., got 'Adam'"),
    ("fit", dict(shuffle="no"), "fit: shuffle must be True or False, got 'no'"),
    ("fit", dict(momentum=1.0), r"fit: momentum must be in \[0, 1\) .or None., got 1.0"),
    ("fit", dict(clip_norm=float("nan")), "fit: clip_norm must be zero .off. or more .or None., got nan"),
    ("fit", dict(callbacks=print), "fit: callbacks must be a list of callables"),
    ("fit", dict(schedule="linear"), "fit: schedule must be one of constant, step, cosine"),
    ("predict", dict(batch_size=0), "predict: batch_size must be a whole number >= 1 .or None."),
    ("evaluate", dict(batch_size=2.0), "evaluate: batch_size must be a whole number >= 1 .or None."),
    ("create", dict(sizes=[4, 0, 2]), "create: sizes must be at least two whole numbers >= 1"),
    ("create", dict(seed=1.0), "create: seed must be a whole number"),
    ("create", dict(activation="softmax"), "create: activation must be one of identity, relu"),
    ("create", dict(storage="dense,coo"), "create: storage must be one of dense, csr"),
    ("create", dict(dropout=[0.5, 2]), r"create: dropout must be in \[0, 1\), or a list"),
    ("create", dict(force="yes"), "create: force must be True or False"),
    ("open", dict(replicas=1.0), "open: replicas must be a whole number >= 1, got 1.0"),
    ("open", dict(exchange="smoke"), "open: exchange must be one of auto, alltoallv"),
    ("open", dict(comm="world"), "open: comm must be an mpi4py communicator or None"),
]


@pytest.mark.parametrize("call,arguments,message", BAD_CALLS,
                         ids=[f"{c}-{next(iter(a))}-{i}" for i, (c, a, _) in enumerate(BAD_CALLS)])
def test_a_bad_api_argument_is_one_error_naming_the_parameter_and_changes_nothing(
        tmp_path, call, arguments, message):
    from mpinn import Network
    net = _tiny(tmp_path / "m.h5")
    before = Path(net.path).read_bytes()
    x, y = _arrays()
    calls = {"fit": lambda: net.fit(x, y, **arguments),
             "predict": lambda: net.predict(x, **arguments),
             "evaluate": lambda: net.evaluate(x, y, **arguments),
             "create": lambda: Network.create(str(tmp_path / "new.h5"),
                                              **{"sizes": [4, 3, 2], **arguments}),
             "open": lambda: Network.open(net.path, **arguments)}
    with pytest.raises(MpinnError, match=message):
        calls[call]()
    net.close()
    assert Path(net.path).read_bytes() == before
    assert not (tmp_path / "new.h5").exists()


def test_cli_messages_name_flags_with_dashes():
    from mpinn.cli import parser
    with pytest.raises(MpinnError, match="^--clip-norm must be zero"):
        parser.parse(["train", "M.h5", "--data", "d.h5", "--clip-norm", "-1"])
    with pytest.raises(MpinnError, match="^--weight-decay must be zero or more"):
        parser.parse(["train", "M.h5", "--data", "d.h5", "--weight-decay", "nan"])


def _hostile_data(path: Path) -> Path:
    """A 2 KB data file declaring 10^12 samples (chunked, never written)."""
    with h5py.File(path, "w") as f:
        f.create_dataset("X", shape=(10**12, 64), dtype="f4", chunks=(1024, 64))
        f.create_dataset("y", shape=(10**12,), dtype="i8", chunks=(4096,))
    return path


@pytest.mark.parametrize("hostile", ["best_val_loss", "data_rows", "sizes"])
def test_a_hostile_attribute_or_declaration_is_refused_before_allocating(model, tmp_path, hostile):
    data, command = DIGITS_TRAIN, "train"
    extra = ["--val-data", DIGITS_TRAIN, "--patience", "2"]
    if hostile == "best_val_loss":
        _set_state(model, best_val_loss="not a number")
        message = "/state attribute 'best_val_loss' must be a finite number or null"
    elif hostile == "data_rows":
        data, extra = str(_hostile_data(tmp_path / "big.h5")), []
        message = "X declares 1,000,000,000,000 samples; this rank's columns of them need about"
    else:  # every rank used to allocate 8 GiB for the owner array before any check
        from tests.system.test_bad_input import declared_only
        model = declared_only(tmp_path / "wide.h5", [64, 2**31, 10])
        command, extra = "evaluate", []
        message = "(partition table every rank builds|this node's share of the model)"
    before = model.read_bytes()
    result = mpinn(2, command, str(model), "--data", data, *extra, timeout=60)
    errors = [line for line in result.stderr.splitlines() if line.startswith("mpinn: error:")]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert len(errors) == 1 and re.search(message, errors[0]), result.stderr
    assert model.read_bytes() == before
    assert_no_leftovers(tmp_path)


def test_a_closed_stdout_ends_inspect_quietly(model):
    import subprocess
    import sys

    from tests.system.test_cli import ENV, ROOT
    child = subprocess.Popen([sys.executable, "-m", "mpinn", "inspect", str(model)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=ROOT)
    child.stdout.close()  # `| head -1` gone before mpinn writes: its print meets EPIPE
    stderr = child.stderr.read().decode()
    assert child.wait(timeout=60) == 141, stderr
    assert stderr == ""
