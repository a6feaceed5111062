"""The Python API (``mpinn.Network``): results equal the single-process reference at every
rank count and for every strategy; errors are ``MpinnError`` on every rank.

The MPI tests run under ``mpirun -n N python -m pytest --with-mpi -m mpi`` at 1 to 4 ranks
(``make test-mpi``); the serial ones check what needs no communicator, and run the
README's example script under ``mpirun -n 3``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from mpinn.errors import MpinnError
from tests.helpers import STRATEGIES, classification_data, regression_data, strategy_params
from tests.reference import Reference, assert_close

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
       "OMPI_MCA_mpi_yield_when_idle": "1", "PYTHONPATH": str(ROOT)}

CASES = {
    # softmax split over ranks, cross-entropy, SGD with momentum
    "softmax": dict(sizes=[7, 13, 11, 5], hidden=["relu", "tanh"], output="softmax", labels=True,
                    optimizer="sgd", momentum=0.9, lr=0.05),
    # float targets, squared error, Adam
    "regression": dict(sizes=[6, 9, 4], hidden=["sigmoid"], output="identity", labels=False,
                       optimizer="adam", momentum=0.0, lr=0.01),
}
N_SAMPLES, N_VAL, BATCH, EPOCHS = 30, 11, 8, 3


def _comm():
    from mpi4py import MPI
    return MPI.COMM_WORLD


def _arrays(case: dict, dtype: str) -> tuple[np.ndarray, ...]:
    make = classification_data if case["labels"] else regression_data
    sizes = case["sizes"]
    x, y = make(N_SAMPLES, sizes[0], sizes[-1], seed=5, dtype=dtype)
    xv, yv = make(N_VAL, sizes[0], sizes[-1], seed=6, dtype=dtype)
    return x, y, xv, yv


def _create(path: str, case: dict, dtype: str):
    from mpinn import Network
    return Network.create(path, sizes=case["sizes"], activation=case["hidden"],
                          output=case["output"], seed=3, dtype=dtype, force=True)


def _weights(path: str) -> list[np.ndarray]:
    """Every weight, then every bias, in the file (the reference's order)."""
    with h5py.File(path, "r") as f:
        n = len(f.attrs["sizes"]) - 1
        return [f[f"layers/{i}/{name}"][...] for name in ("weight", "bias") for i in range(1, n + 1)]


def _accuracy(ref: Reference, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.argmax(ref.forward(x)[1][-1], axis=1) == y))


# ---------------------------------------------------------------- against the reference


@pytest.mark.mpi
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("case,dtype", [("softmax", "float64"), ("regression", "float32"),
                                        ("regression", "float64")])
def test_fit_predict_evaluate_equal_reference_for_every_strategy(strategy, case, dtype,
                                                                 mpi_tmp_path):
    from mpinn import Network
    comm = _comm()
    c = CASES[case]
    path = str(mpi_tmp_path / "model.h5")
    _create(path, c, dtype)
    ref = Reference.from_file(path)
    comm.Barrier()  # every rank has read the initial weights before fit rewrites them
    x, y, xv, yv = _arrays(c, dtype)
    params = strategy_params(strategy, c["sizes"], comm.size)
    with Network.open(path, strategy, **params) as net:
        history = net.fit(x, y, epochs=EPOCHS, batch_size=BATCH, optimizer=c["optimizer"],
                          lr=c["lr"], momentum=c["momentum"], seed=11, validation_data=(xv, yv))
        probs = net.predict(xv)
        metrics = net.evaluate(xv, yv)

    losses, val_losses, val_acc = [], [], []
    for epoch in range(1, EPOCHS + 1):
        losses += ref.train(x, y, 1, BATCH, c["lr"], c["optimizer"], c["momentum"], seed=11,
                            first_epoch=epoch)
        val_losses.append(ref.loss_and_grads(xv, yv)[0])
        val_acc.append(_accuracy(ref, xv, yv) if c["labels"] else None)
    assert [r["epoch"] for r in history.epochs] == list(range(1, EPOCHS + 1))
    assert_close(history["loss"], losses, dtype, "epoch losses")
    assert_close(history["val_loss"], val_losses, dtype, "validation losses")
    assert history["val_accuracy"] == val_acc
    assert set(history.epochs[0]) == {"epoch", "loss", "accuracy", "samples_per_second", "time",
                                      "val_loss", "val_accuracy"}
    for i, (got, want) in enumerate(zip(_weights(path), ref.weights + ref.biases, strict=True)):
        assert_close(got, want, dtype, f"parameter {i}")
    assert probs.shape == (N_VAL, c["sizes"][-1])
    assert_close(probs, ref.forward(xv)[1][-1], dtype, "predict")
    assert_close(metrics["loss"], val_losses[-1], dtype, "evaluate loss")
    assert metrics["accuracy"] == val_acc[-1]


@pytest.mark.mpi
def test_predict_returns_the_same_whole_array_on_every_rank(mpi_tmp_path):
    comm = _comm()
    c = CASES["softmax"]
    path = str(mpi_tmp_path / "model.h5")
    x, _, _, _ = _arrays(c, "float32")
    with _create(path, c, "float32") as net:
        probs = net.predict(x, batch_size=7)  # several batches, the last one partial
    assert probs.shape == (N_SAMPLES, 5) and probs.dtype == np.float32
    assert all(np.array_equal(p, probs) for p in comm.allgather(probs))
    assert_close(probs.sum(axis=1), np.ones(N_SAMPLES), "float32", "softmax rows")


@pytest.mark.mpi
def test_fit_on_arrays_equals_fit_on_the_data_file_bitwise(mpi_tmp_path):
    from mpinn import Network
    from mpinn.io import datafile
    comm = _comm()
    c = CASES["regression"]
    x, y, _, _ = _arrays(c, "float32")
    data = str(mpi_tmp_path / "data.h5")
    if comm.rank == 0:
        datafile.write_data(data, x, y)
    comm.Barrier()
    results = []
    for source in ("arrays", "file"):
        path = str(mpi_tmp_path / f"{source}.h5")
        _create(path, c, "float32")
        with Network.open(path, "count", **strategy_params("count", c["sizes"], comm.size)) as net:
            args = (x, y) if source == "arrays" else (data,)
            history = net.fit(*args, epochs=2, batch_size=BATCH, optimizer="adam", lr=0.01)
        results.append((history["loss"], _weights(path)))
    assert results[0][0] == results[1][0]
    assert all(np.array_equal(a, b) for a, b in zip(results[0][1], results[1][1], strict=True))


@pytest.mark.mpi
def test_two_fits_equal_one_fit_of_all_the_epochs_bitwise(mpi_tmp_path):
    """The second fit takes Adam's moments and the epoch count from the first one's checkpoint."""
    from mpinn import Network
    c = CASES["softmax"]
    x, y, _, _ = _arrays(c, "float64")
    split, whole = str(mpi_tmp_path / "split.h5"), str(mpi_tmp_path / "whole.h5")
    for path in (split, whole):
        _create(path, c, "float64")
    with Network.open(split, "balanced") as net:
        first = net.fit(x, y, epochs=2, batch_size=BATCH, optimizer="adam", lr=0.01, seed=4)
        net.save()  # a save between fits keeps Adam's state too
        second = net.fit(x, y, epochs=1, batch_size=BATCH, optimizer="adam", lr=0.01, seed=4)
        assert net.epoch == 3
    with Network.open(whole, "balanced") as net:
        both = net.fit(x, y, epochs=3, batch_size=BATCH, optimizer="adam", lr=0.01, seed=4)
    assert first["loss"] + second["loss"] == both["loss"]
    assert [r["epoch"] for r in second.epochs] == [3]
    assert all(np.array_equal(a, b) for a, b in zip(_weights(split), _weights(whole), strict=True))


@pytest.mark.mpi
def test_a_callback_returning_false_on_one_rank_stops_every_rank(mpi_tmp_path):
    comm = _comm()
    c = CASES["softmax"]
    x, y, _, _ = _arrays(c, "float32")
    seen = []

    def stop_at_two(record: dict) -> bool | None:
        seen.append(record["epoch"])
        return False if record["epoch"] == 2 and comm.rank == comm.size - 1 else None

    with _create(str(mpi_tmp_path / "model.h5"), c, "float32") as net:
        history = net.fit(x, y, epochs=5, batch_size=BATCH, callbacks=[stop_at_two])
        assert seen == [1, 2] and len(history) == 2
        assert history.stopped_early == "callback" and net.epoch == 2


# ---------------------------------------------------------------- early stopping


def _overfitting(dtype: str = "float64") -> tuple[dict, tuple[np.ndarray, ...]]:
    """A case whose validation loss turns up within a few epochs: random labels, a big lr."""
    case = dict(sizes=[6, 16, 3], hidden=["tanh"], output="softmax", labels=True)
    x, y = classification_data(24, 6, 3, seed=1, dtype=dtype)
    xv, yv = classification_data(12, 6, 3, seed=2, dtype=dtype)
    return case, (x, y, xv, yv)


def _reference_run(path: str, data: tuple, epochs: int, lr: float, seed: int):
    """Validation loss and parameters of the reference after every epoch."""
    x, y, xv, yv = data
    ref = Reference.from_file(path)
    val, params = [], []
    for epoch in range(1, epochs + 1):
        ref.train(x, y, 1, 8, lr, "sgd", 0.0, seed=seed, first_epoch=epoch)
        val.append(ref.loss_and_grads(xv, yv)[0])
        params.append([p.copy() for p in ref.weights + ref.biases])
    return val, params


def _stop_epoch(val: list[float], patience: int) -> tuple[int, int]:
    """(epoch at which patience runs out, epoch of the best loss) by the documented rule."""
    best, best_epoch, bad = np.inf, 0, 0
    for epoch, loss in enumerate(val, start=1):
        if loss < best:
            best, best_epoch, bad = loss, epoch, 0
        else:
            bad += 1
            if bad >= patience:
                return epoch, best_epoch
    return len(val), best_epoch


@pytest.mark.mpi
@pytest.mark.parametrize("strategy", ["balanced", "ids"])
def test_patience_stops_where_the_reference_stops_and_keeps_the_best(strategy, mpi_tmp_path):
    from mpinn import Network
    from mpinn.train import best_path
    comm = _comm()
    case, data = _overfitting()
    path = str(mpi_tmp_path / "model.h5")
    _create(path, case, "float64")
    val, params = _reference_run(path, data, 15, lr=0.5, seed=3)
    comm.Barrier()
    stop, best = _stop_epoch(val, patience=3)
    assert stop < 15, "the case must stop early for the test to mean anything"
    params_of = strategy_params(strategy, case["sizes"], comm.size)
    with Network.open(path, strategy, **params_of) as net:
        x, y, xv, yv = data
        history = net.fit(x, y, epochs=15, batch_size=8, lr=0.5, seed=3,
                          validation_data=(xv, yv), patience=3, keep_best=True)
        assert len(history) == stop and history.stopped_early == "patience"
        assert_close(history["val_loss"], val[:stop], "float64", "validation losses")
        assert history.best_val_loss == min(history["val_loss"])
        again = net.fit(x, y, epochs=15, batch_size=8, lr=0.5, seed=3, validation_data=(xv, yv),
                        patience=3, resume=True)
        assert len(again) == 0  # a run that stopped early is over
    for i, (got, want) in enumerate(zip(_weights(path), params[stop - 1], strict=True)):
        assert_close(got, want, "float64", f"final parameter {i}")
    assert not os.path.exists(best_path(path) + ".partial")
    for i, (got, want) in enumerate(zip(_weights(best_path(path)), params[best - 1], strict=True)):
        assert_close(got, want, "float64", f"best parameter {i}")
    with h5py.File(best_path(path), "r") as f:
        assert f["state"].attrs["epoch"] == str(best)


@pytest.mark.mpi
def test_early_stopping_resumed_in_the_middle_is_bitwise_an_uninterrupted_run(mpi_tmp_path):
    from mpinn import Network
    case, (x, y, xv, yv) = _overfitting()
    whole, split = str(mpi_tmp_path / "whole.h5"), str(mpi_tmp_path / "split.h5")
    _create(whole, case, "float64")
    _create(split, case, "float64")
    options = dict(batch_size=8, lr=0.5, seed=3, validation_data=(xv, yv), patience=3)
    with Network.open(whole) as net:
        uninterrupted = net.fit(x, y, epochs=15, **options)
    stop = len(uninterrupted)
    assert uninterrupted.stopped_early == "patience" and stop < 15
    # stopped one epoch before patience runs out: the count of bad epochs must carry over
    with Network.open(split) as net:
        first = net.fit(x, y, epochs=stop - 1, **options)
    with Network.open(split) as net:  # a new job, as after a preemption
        rest = net.fit(x, y, epochs=15, resume=True, **options)
    assert first["val_loss"] + rest["val_loss"] == uninterrupted["val_loss"]
    assert rest.stopped_early == "patience" and rest.epoch == stop
    assert all(np.array_equal(a, b) for a, b in zip(_weights(split), _weights(whole), strict=True))


# ---------------------------------------------------------------- errors


@pytest.mark.mpi
def test_bad_calls_raise_mpinn_error_on_every_rank_and_change_nothing(mpi_tmp_path):
    from mpinn import Network
    comm = _comm()
    path = str(mpi_tmp_path / "model.h5")
    net = Network.create(path, sizes=[4, 3, 2], seed=0)
    before = Path(path).read_bytes()
    x = np.zeros((5, 4), np.float32)
    y = np.zeros(5, np.int64)
    with pytest.raises(MpinnError, match="exists; pass force=True"):
        Network.create(path, sizes=[4, 3, 2], seed=1)
    with pytest.raises(MpinnError, match="percentages= applies to strategy='percentage'"):
        Network.open(path, "count", percentages=[100])
    with pytest.raises(MpinnError, match="not both"):
        Network.open(path, "balanced", partition="p")
    with pytest.raises(MpinnError, match="open: strategy must be one of balanced, count"):
        Network.open(path, "best")
    with pytest.raises(MpinnError, match="float32 weights, not float64"):
        Network.open(path, dtype="float64")
    with pytest.raises(MpinnError, match="no such file"):
        Network.open(str(mpi_tmp_path / "missing.h5"))
    with pytest.raises(MpinnError, match="3 features but the model has 4"):
        net.fit(np.zeros((5, 3)), y)
    with pytest.raises(MpinnError, match="label 7 is out of range"):
        net.fit(x, np.full(5, 7))
    with pytest.raises(MpinnError, match="integer labels"):
        net.fit(x, np.zeros(5, np.float32))
    with pytest.raises(MpinnError, match="NaN"):
        net.predict(np.full((5, 4), np.nan))
    with pytest.raises(MpinnError, match="--patience needs validation data"):
        net.fit(x, y, patience=2)
    with pytest.raises(MpinnError, match="fit: lr must be a positive number"):
        net.fit(x, y, lr=-1)
    with pytest.raises(MpinnError, match="evaluate needs y"):
        net.evaluate(x)
    if comm.size > 1:
        with pytest.raises(MpinnError, match="must be the same on every rank, but rank 1"):
            net.fit(x + comm.rank, y)

    def broken(record: dict) -> None:
        if comm.rank == comm.size - 1:
            raise ValueError("the callback broke")

    with pytest.raises(MpinnError, match="ValueError: the callback broke"):
        net.fit(x, y, callbacks=[broken])
    net.close()
    with pytest.raises(MpinnError, match="closed"):
        net.predict(x)
    comm.Barrier()
    assert Path(path).read_bytes() == before


# ---------------------------------------------------------------- serial


def test_import_mpinn_starts_no_mpi_and_lists_the_api():
    code = ("import sys, mpinn; assert 'mpi4py.MPI' not in sys.modules, 'MPI imported'; "
            "assert 'numpy' not in sys.modules, 'numpy imported'; "
            "names = dir(mpinn); print(' '.join(n for n in names if not n.startswith('_'))); "
            "from mpinn import MpinnError, Network; assert 'mpi4py.MPI' in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=ENV, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert {"Network", "History", "MpinnError", "SGD", "Adam"} <= set(result.stdout.split())


def test_partition_choice_infers_the_strategy_from_its_parameter():
    from mpinn.partition.choice import partition_choice
    assert partition_choice(counts="3,4").strategy == "count"
    assert partition_choice(counts=[3, 4]).params == {"counts": [3, 4]}
    assert partition_choice(layer_ranks=[0, 1]).strategy == "layers"
    assert partition_choice(ids={0: [[0, 5]], 1: [5]}).params == {"ids": {"0": [[0, 5]], "1": [5]}}
    assert partition_choice(partition="p3").name == "p3"
    assert partition_choice().strategy == "balanced"
    with pytest.raises(MpinnError, match="counts= applies to strategy='count'"):
        partition_choice("percentage", counts=[1])


def test_history_reads_one_key_over_the_epochs():
    from mpinn.api import History
    history = History([{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.0}])
    assert len(history) == 2 and history["loss"] == [2.0, 1.0]


@pytest.mark.timeout(630)  # its subprocesses' own limits, and then some
def test_the_api_example_runs_as_written_under_mpirun_on_three_ranks(tmp_path):
    """examples/api_digits.py is the issue's (and docs/api.md's) example, on the digits data."""
    model = tmp_path / "m.h5"
    command = ["mpirun", "--oversubscribe", "-n", "3", sys.executable, "-m", "mpi4py",
               str(ROOT / "examples/api_digits.py"), str(model)]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=tmp_path,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.split("\n")
    assert lines[0].startswith("epochs 20 "), result.stdout
    accuracy = float(lines[1].split("accuracy")[-1])
    assert accuracy > 0.9, result.stdout
    assert "predict (" in lines[1] and ", 10)" in lines[1]
    # refused the second time: the file exists
    again = subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=tmp_path,
                           timeout=300)
    assert again.returncode != 0 and "exists; pass force=True" in again.stderr


def test_every_training_option_is_declared_once_in_train_config():
    """``Network.fit`` takes each field of ``TrainConfig`` with its default, and ``mpinn
    train`` has its flag with the same default (run settings: None, from the last run)."""
    import inspect
    from dataclasses import fields

    from mpinn.api import Network
    from mpinn.cli.parser import build_parser
    from mpinn.config import RUN_DEFAULTS, TrainConfig

    signature = inspect.signature(Network.fit).parameters
    names = {f.name for f in fields(TrainConfig)}
    assert set(signature) - names == {"self", "x", "y", "validation_data", "callbacks"}
    for f in fields(TrainConfig):
        assert signature[f.name].default == f.default, f.name
    args = vars(build_parser().parse_args(["train", "m.h5", "--data", "d.h5"]))
    for f in fields(TrainConfig):
        if f.metadata["cli"]:
            dest = f.metadata["flag"].lstrip("-").replace("-", "_") if f.metadata["flag"] else f.name
            assert dest in args, f.name
            assert args[dest] == (f.default if dest == f.name else not f.default), f.name
    assert all(getattr(TrainConfig(), name) is None for name in RUN_DEFAULTS)
