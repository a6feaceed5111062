"""No rank is ever left waiting: a failure on one rank ends the whole job promptly, with a
clear message and a non-zero exit, and leaves the model file as it was."""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.test_cli import DIGITS_TRAIN, ENV, command, digest, mpinn, ok

BOUND = 45  # seconds: the 10 s agreement window, mpirun's teardown and slack for a loaded CI box


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "model.h5"
    ok(mpinn(1, "init", str(path), "--sizes", "64,48,10", "--seed", "1"))
    return path


@pytest.mark.parametrize("nranks", [2, 4])
@pytest.mark.parametrize("fault, message", [
    ("load:1", "injected fault at load on rank 1"),         # a failed read of one rank's rows
    ("data:1", "injected fault at data on rank 1"),         # bad input seen by one rank only
    ("step:1:5", "injected fault at step on rank 1"),       # an exception inside the engine
    ("save:1", "injected fault at save on rank 1"),         # a write error during a checkpoint
])
def test_failure_on_one_rank_ends_every_rank_promptly(model, nranks, fault, message):
    before = digest(model)
    started = time.monotonic()
    result = subprocess.run(command(nranks, "train", str(model), "--data", DIGITS_TRAIN,
                                    "--epochs", "2"),
                            capture_output=True, text=True, timeout=120,
                            env={**ENV, "MPINN_FAULT": fault})
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert elapsed < BOUND, f"took {elapsed:.1f} s"
    assert message in result.stderr and "mpinn: error:" in result.stderr, result.stderr
    assert digest(model) == before


@pytest.mark.parametrize("nranks", [2, 3])
def test_non_finite_loss_on_one_rank_stops_every_rank_and_names_it(model, nranks):
    before = digest(model)
    result = subprocess.run(command(nranks, "train", str(model), "--data", DIGITS_TRAIN,
                                    "--epochs", "2"),
                            capture_output=True, text=True, timeout=120,
                            env={**ENV, "MPINN_FAULT": f"nan:{nranks - 1}:7"})
    assert result.returncode == 1
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("mpinn: error:")]
    assert len(lines) == 1, result.stderr
    assert "epoch 1, step 7: the loss is nan" in lines[0], lines[0]
    assert f"(rank {nranks - 1})" in lines[0], lines[0]
    assert digest(model) == before


def test_user_errors_show_no_traceback_unless_debug(model):
    plain = mpinn(2, "train", str(model), "--data", DIGITS_TRAIN, "--lr", "0")
    debug = mpinn(2, "--debug", "train", str(model), "--data", DIGITS_TRAIN, "--lr", "0")
    assert plain.returncode == debug.returncode == 1
    assert "Traceback" not in plain.stderr and "Traceback" in debug.stderr
