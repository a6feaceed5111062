"""The Python API keeps the CLI's promises (issue 25): no lost model (a continued run keeps
its optimizer, the writer's lock, no second handle writing older weights back) and no hang
(a collective call on some ranks, a callback that exits, Ctrl-C on one rank): one line,
a bounded end, every file as it was.

Scripts run under ``mpirun -n 2`` and ``-n 3`` as users run them (``python -m mpi4py``);
the in-process tests run at 1 to 4 ranks with ``make test-mpi``; the rules are pure
functions tested without MPI.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mpinn.errors import MpinnError
from mpinn.io import lock
from mpinn.train import RUN_DEFAULTS, resolve_run
from tests.system.test_cli import DIGITS_TRAIN, ENV, ROOT, mpinn, ok

TIMEOUT = 2  # MPINN_COLLECTIVE_TIMEOUT in the scripts, seconds
# from the start of mpirun: the job's start and its scripts' work (3-5 s on 2 busy cores),
# the watchdog's deadline, and mpirun's teardown after MPI_Abort
BOUND = 30


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("mpinn: error:")]


# ---------------------------------------------------------------- the rules (no MPI)


ADAM_STATE = {"epoch": 2, "optimizer": {"name": "adam", "lr": 0.001, "weight_decay": 0.0, "t": 9},
              "schedule": {"name": "step", "lr": 0.001, "step_size": 2, "gamma": 0.5,
                           "min_lr": 0.0, "warmup_steps": 0}}


def test_a_continued_run_takes_every_setting_it_does_not_name_from_the_file():
    run = resolve_run("m.h5", ADAM_STATE, {})
    assert run["optimizer"] == "adam" and run["lr"] == 0.001
    assert run["schedule"] == "step" and run["step_size"] == 2 and run["gamma"] == 0.5
    named = resolve_run("m.h5", ADAM_STATE, {"lr": 0.01, "clip_norm": 1.0})
    assert named["optimizer"] == "adam" and named["lr"] == 0.01 and named["clip_norm"] == 1.0
    recorded = {"run": {**RUN_DEFAULTS, "optimizer": "adamw", "dropout": 0.25}}
    assert resolve_run("m.h5", recorded, {})["dropout"] == 0.25
    assert resolve_run("m.h5", {"epoch": 0}, {}) == RUN_DEFAULTS  # a new model


def test_naming_another_optimizer_than_the_stored_state_is_refused_unless_reset():
    with pytest.raises(MpinnError, match="holds the state of optimizer adam.*--reset-optimizer"):
        resolve_run("m.h5", ADAM_STATE, {"optimizer": "sgd"})
    reset = resolve_run("m.h5", ADAM_STATE, {"optimizer": "sgd"}, reset_optimizer=True)
    # the optimizer's own settings start afresh; the schedule carries on
    assert reset["optimizer"] == "sgd" and reset["lr"] == RUN_DEFAULTS["lr"]
    assert reset["schedule"] == "step"
    plain = {"optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0}}
    assert resolve_run("m.h5", plain, {"optimizer": "adam"})["optimizer"] == "adam"  # no state
    heavy = {"optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0}}
    with pytest.raises(MpinnError, match="state of optimizer sgd"):
        resolve_run("m.h5", heavy, {"optimizer": "adam"})


def test_a_hostile_stored_setting_is_refused_unless_named():
    hostile = {"run": {**RUN_DEFAULTS, "lr": "fast", "optimizer": "rmsprop"}}
    with pytest.raises(MpinnError, match="records optimizer = 'rmsprop'"):
        resolve_run("m.h5", hostile, {})
    with pytest.raises(MpinnError, match="records lr = 'fast'"):
        resolve_run("m.h5", hostile, {"optimizer": "sgd"})
    assert resolve_run("m.h5", hostile, {"optimizer": "sgd", "lr": 0.5})["lr"] == 0.5


# ---------------------------------------------------------------- CLI: resume keeps the optimizer


def test_train_resume_continues_the_stored_optimizer_bitwise(tmp_path):
    """Issue 25 case 1: init; train --optimizer adam --epochs 2; train --epochs 4 --resume
    equals one run of 4 Adam epochs, bitwise; naming sgd then is refused, file unchanged."""
    split, whole = tmp_path / "split.h5", tmp_path / "whole.h5"
    for path in (split, whole):
        ok(mpinn(1, "init", str(path), "--sizes", "64,32,10", "--seed", "1", "--quiet"))
    adam = ["--optimizer", "adam", "--lr", "1e-3", "--schedule", "step", "--gamma", "0.5"]
    ok(mpinn(2, "train", str(split), "--data", DIGITS_TRAIN, "--epochs", "2", *adam, "--quiet"))
    ok(mpinn(2, "train", str(split), "--data", DIGITS_TRAIN, "--epochs", "4", "--resume",
             "--quiet"))
    ok(mpinn(2, "train", str(whole), "--data", DIGITS_TRAIN, "--epochs", "4", *adam, "--quiet"))
    _same_training(split, whole)
    before = digest(split)
    result = mpinn(2, "train", str(split), "--data", DIGITS_TRAIN, "--optimizer", "sgd")
    assert result.returncode == 1 and len(errors(result.stderr)) == 1, result.stderr
    assert "--reset-optimizer" in errors(result.stderr)[0]
    assert digest(split) == before
    ok(mpinn(2, "train", str(split), "--data", DIGITS_TRAIN, "--optimizer", "sgd",
             "--reset-optimizer", "--quiet"))
    import h5py
    with h5py.File(split) as f:
        assert '"name": "sgd"' in f["state"].attrs["optimizer"]


# ---------------------------------------------------------------- in-process, 1 to 4 ranks


def _small(path: Path):
    from mpinn import Network
    return Network.create(str(path), sizes=[8, 6, 3], seed=1, force=True)


def _data(n: int = 24) -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(0).random((n, 8), dtype=np.float32)
    return x, np.arange(n) % 3


def _bytes(path: Path) -> bytes:
    from mpi4py import MPI
    MPI.COMM_WORLD.Barrier()  # every rank done with the file
    return path.read_bytes()


@pytest.mark.mpi
def test_fit_continues_the_optimizer_of_the_last_fit_bitwise(mpi_tmp_path):
    from mpinn import Network
    x, y = _data()
    split, whole = mpi_tmp_path / "split.h5", mpi_tmp_path / "whole.h5"
    _small(split).fit(x, y, epochs=2, batch_size=5, optimizer="adam", lr=1e-3)
    with Network.open(str(split)) as net:
        history = net.fit(x, y, epochs=1, batch_size=5)  # adam, lr 1e-3: from the file
    _small(whole).fit(x, y, epochs=3, batch_size=5, optimizer="adam", lr=1e-3)
    assert history.epoch == 3
    _bytes(split)  # every rank done with both files
    _same_training(split, whole)


def _same_training(a: Path, b: Path) -> None:
    """Weights, biases, optimizer state arrays and optimizer record equal, bitwise."""
    import h5py
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        arrays: list[str] = []
        fa.visit(lambda name: arrays.append(name) if isinstance(fa[name], h5py.Dataset) else None)
        assert any("_m" in name for name in arrays), arrays  # Adam's moments are there
        for name in arrays:
            assert np.array_equal(fa[name][...], fb[name][...]), name
        assert fa["state"].attrs["optimizer"] == fb["state"].attrs["optimizer"]


@pytest.mark.mpi
def test_a_second_handle_never_writes_older_weights_over_a_commit(mpi_tmp_path):
    from mpinn import Network
    x, y = _data()
    path = mpi_tmp_path / "m.h5"
    _small(path).close()
    a, b = Network.open(str(path)), Network.open(str(path))
    a.fit(x, y, epochs=1, batch_size=5)
    committed = _bytes(path)
    with pytest.raises(MpinnError, match="committed by another Network handle or job"):
        b.fit(x, y, epochs=1, batch_size=5)
    with pytest.raises(MpinnError, match="committed by another Network handle or job"):
        b.save()
    a.fit(x, y, epochs=1, batch_size=5)  # the handle that committed goes on
    assert _bytes(path) != committed
    a.close()
    b.close()


@pytest.mark.mpi
def test_api_writers_take_the_lock_and_refuse_a_held_one(mpi_tmp_path):
    from mpi4py import MPI

    from mpinn import Network
    x, y = _data()
    path = mpi_tmp_path / "m.h5"
    net = _small(path)
    held = lock.acquire(str(path), "trained") if MPI.COMM_WORLD.rank == 0 else None
    try:
        before = _bytes(path)
        with pytest.raises(MpinnError, match=r"is being trained by pid \d+"):
            net.fit(x, y, epochs=1, batch_size=5)
        with pytest.raises(MpinnError, match=r"is being trained by pid \d+"):
            Network.create(str(path), sizes=[8, 3], force=True)
        assert _bytes(path) == before
    finally:
        if held is not None:
            held.release()
    net.fit(x, y, epochs=1, batch_size=5)
    MPI.COMM_WORLD.Barrier()
    assert not Path(f"{path}.lock").exists()  # released when fit returned

    def save_inside(record: dict) -> None:
        net.save()  # a callback's save under fit's own lock

    net.fit(x, y, epochs=1, batch_size=5, callbacks=[save_inside])
    net.close()


@pytest.mark.mpi
def test_bad_outputs_of_fit_and_create_are_refused_before_any_work(mpi_tmp_path):
    from mpinn import Network
    x, y = _data()
    path = mpi_tmp_path / "m.h5"
    net = _small(path)
    before = _bytes(path)
    with pytest.raises(MpinnError, match="log_json .*nodir does not exist"):
        net.fit(x, y, epochs=1, log_json=str(mpi_tmp_path / "nodir" / "x.jsonl"))
    with pytest.raises(MpinnError, match="log_json .* is a directory"):
        net.fit(x, y, epochs=1, log_json=str(mpi_tmp_path))
    with pytest.raises(MpinnError, match="is a directory; give a file path"):
        Network.create(str(mpi_tmp_path), sizes=[8, 3], force=True)
    assert _bytes(path) == before
    assert not Path(f"{mpi_tmp_path}.partial").exists()
    net.close()


# ---------------------------------------------------------------- scripts under mpirun

SCRIPT = """
import os, signal, sys
import numpy as np
from mpi4py import MPI
import mpinn

case, path = sys.argv[1], sys.argv[2]
rank, size = MPI.COMM_WORLD.rank, MPI.COMM_WORLD.size
last = size - 1
x = np.random.default_rng(0).random((24, 8), dtype=np.float32)
y = np.arange(24) % 3
net = mpinn.Network.open(path)
calls = []


def callback(record):
    calls.append(record)
    if rank == last and len(calls) == 2:
        if case == "callback-exit":
            sys.exit(3)
        if case == "callback-ctrl-c":
            raise KeyboardInterrupt
        if case == "sigint":
            os.kill(os.getpid(), signal.SIGINT)


if case == "predict-on-rank-0":
    if rank == 0:
        net.predict(x)
elif case == "fit-on-some-ranks":
    if rank != last:
        net.fit(x, y, epochs=1, batch_size=4)
elif case == "save-on-one-rank":
    if rank == last:
        net.save()
elif case == "different-calls":
    net.predict(x) if rank == 0 else net.evaluate(x, y)
elif case == "locked-by-another-process":
    net.fit(x, y, epochs=1, batch_size=4)
else:
    net.fit(x, y, epochs=50, batch_size=2, callbacks=[callback])
print("script ended", rank, flush=True)
"""

MISTAKES = {
    # case: what the one line says
    "predict-on-rank-0": "predict is collective, but rank{s} {others} of {n} did not call it",
    "fit-on-some-ranks": "fit is collective, but rank {last} of {n} did not call it",
    "save-on-one-rank": "save is collective, but rank{s} {first} of {n} did not call it",
    "different-calls": "collective calls differ between ranks: predict (call 3) on rank 0; "
                       "evaluate (call 3) on rank{s} {others}",
    "callback-exit": "a callback raised SystemExit(3) after epoch 2; training stopped on every "
                     "rank, the model as its last checkpoint left it (rank {last})",
    "callback-ctrl-c": "a callback raised KeyboardInterrupt after epoch 2",
    "sigint": "interrupted (SIGINT on rank {last}) at epoch 3, step 25: every rank stopped",
    # the test process holds the model's lock, as a CLI train would
    "locked-by-another-process": "m.h5 is being trained by pid {pid} on",
}


@pytest.mark.parametrize("nranks", [2, 3])
@pytest.mark.parametrize("case", list(MISTAKES))
def test_an_api_mistake_on_some_ranks_ends_the_job_with_one_line(tmp_path, case, nranks):
    model = tmp_path / "m.h5"
    ok(mpinn(1, "init", str(model), "--sizes", "8,6,3", "--seed", "1", "--quiet"))
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    before = {p.name: digest(p) for p in tmp_path.iterdir()}
    held = lock.acquire(str(model), "trained") if case == "locked-by-another-process" else None
    started = time.monotonic()
    try:
        result = subprocess.run(
            ["mpirun", "--oversubscribe", "-n", str(nranks), sys.executable, "-m", "mpi4py",
             str(script), case, str(model)], capture_output=True, text=True, cwd=tmp_path,
            env={**ENV, "MPINN_COLLECTIVE_TIMEOUT": str(TIMEOUT)}, timeout=120)
    finally:
        if held is not None:
            held.release()
    elapsed = time.monotonic() - started
    n, last = nranks, nranks - 1
    others = ",".join(map(str, range(1, n)))
    first = ",".join(map(str, range(n - 1)))
    s = "s" if n > 2 else ""
    expected = MISTAKES[case].format(n=n, last=last, others=others, first=first, s=s,
                                     pid=os.getpid())
    assert result.returncode != 0, result.stdout + result.stderr
    lines = errors(result.stderr)
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert elapsed < BOUND, f"took {elapsed:.1f} s"
    assert {p.name: digest(p) for p in tmp_path.iterdir()} == before


def test_the_collective_timeout_is_checked(tmp_path):
    result = mpinn(1, "--collective-timeout", "0", "inspect", str(ROOT / "data/digits_train.h5"))
    assert result.returncode == 1 and "--collective-timeout must be a positive number" in \
        result.stderr
