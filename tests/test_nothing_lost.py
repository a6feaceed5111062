"""Nothing lost: checkpoints survive SIGKILL at any moment, resume is bitwise exact, and
SIGTERM/SIGUSR1 make every rank commit a checkpoint and exit 0."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from tests.reference import Reference
from tests.test_cli import ENV, ROOT, command, mpinn, ok

TRAIN = ["--batch-size", "100", "--optimizer", "adam", "--lr", "0.001", "--seed", "3"]


@pytest.fixture(scope="module")
def workload(tmp_path_factory) -> dict[str, Path]:
    """A model and data set big enough that a run can be interrupted mid-epoch, and the
    weights of the same run left uninterrupted."""
    tmp = tmp_path_factory.mktemp("lost")
    data, initial, reference = tmp / "data.h5", tmp / "initial.h5", tmp / "reference.h5"
    ok(mpinn(1, "data", "classification", str(data), "--samples", "6000", "--features", "64",
             "--outputs", "10", "--seed", "1"))
    ok(mpinn(1, "init", str(initial), "--sizes", "64,384,384,10", "--seed", "2"))
    reference.write_bytes(initial.read_bytes())
    ok(mpinn(2, "train", str(reference), "--data", str(data), "--epochs", "4", *TRAIN,
             timeout=300))
    return {"data": data, "initial": initial, "reference": reference}


def copy_model(workload: dict[str, Path], tmp_path: Path) -> Path:
    model = tmp_path / "model.h5"
    model.write_bytes(workload["initial"].read_bytes())
    return model


def start(nranks: int, *args: str) -> subprocess.Popen:
    return subprocess.Popen(command(nranks, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV, cwd=ROOT, start_new_session=True)


def wait_for_line(proc: subprocess.Popen, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        if text in line:
            return
        assert time.monotonic() < deadline, f"no line with {text!r} in time"
    raise AssertionError(f"run ended before printing {text!r}: {proc.stderr.read()}")


def rank_pids(model: Path, launcher: subprocess.Popen) -> list[int]:
    """PIDs of the python ranks working on ``model`` (mpirun itself excluded)."""
    out = subprocess.run(["pgrep", "-f", "--", f"-m mpinn train {model}"], capture_output=True,
                         text=True)
    return sorted(int(p) for p in out.stdout.split() if int(p) not in (os.getpid(), launcher.pid))


def assert_same_weights(a: Path, b: Path) -> None:
    ra, rb = Reference.from_file(str(a)), Reference.from_file(str(b))
    for wa, wb in zip(ra.weights + ra.biases, rb.weights + rb.biases, strict=True):
        assert np.array_equal(wa, wb), "weights differ"


def assert_valid_model(model: Path, data: Path) -> None:
    """The file validates and evaluates (a leftover MODEL.partial is ignored and overwritten)."""
    ok(mpinn(2, "evaluate", str(model), "--data", str(data)))


@pytest.mark.parametrize("delay", [0.3, 0.9, 1.6])
def test_sigkill_of_all_ranks_then_resume_equals_uninterrupted_run(workload, tmp_path, delay):
    model = copy_model(workload, tmp_path)
    proc = start(2, "train", str(model), "--data", str(workload["data"]), "--epochs", "4",
                 "--checkpoint-every", "1", *TRAIN)
    wait_for_line(proc, "epoch 1 ")
    time.sleep(delay)  # somewhere in epoch 2, its checkpoint, or epoch 3
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in rank_pids(model, proc):
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert_valid_model(model, workload["data"])
    ok(mpinn(2, "train", str(model), "--data", str(workload["data"]), "--epochs", "4", "--resume",
             *TRAIN, timeout=300))
    assert_same_weights(model, workload["reference"])


def test_sigkill_of_one_rank_during_checkpoints_leaves_a_valid_model(workload, tmp_path):
    model = copy_model(workload, tmp_path)
    proc = start(2, "train", str(model), "--data", str(workload["data"]), "--epochs", "500",
                 "--checkpoint-every", "1", "--batch-size", "6000", "--lr", "0.001", "--seed", "3")
    wait_for_line(proc, "epoch 3 ")  # from here on a checkpoint is written every few 0.1 s
    time.sleep(0.15)
    pids = rank_pids(model, proc)
    assert len(pids) == 2
    os.kill(pids[1], signal.SIGKILL)
    assert proc.wait(timeout=60) != 0  # mpirun notices and ends the job: nothing hangs
    assert_valid_model(model, workload["data"])


@pytest.mark.parametrize("sig, target", [(signal.SIGUSR1, "mpirun"), (signal.SIGTERM, "ranks")])
def test_preemption_signal_commits_a_checkpoint_and_resume_is_exact(workload, tmp_path, sig, target):
    model = copy_model(workload, tmp_path)
    proc = start(2, "train", str(model), "--data", str(workload["data"]), "--epochs", "4", *TRAIN)
    wait_for_line(proc, "epoch 1 ")
    time.sleep(0.2)  # mid-epoch 2
    if target == "mpirun":
        proc.send_signal(sig)  # mpirun forwards SIGUSR1 to every rank
    else:
        for pid in rank_pids(model, proc):
            os.kill(pid, sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert f"stopped by {sig.name}" in out and "checkpoint committed at epoch" in out, out + err
    ok(mpinn(2, "train", str(model), "--data", str(workload["data"]), "--epochs", "4", "--resume",
             *TRAIN, timeout=300))
    assert_same_weights(model, workload["reference"])


def test_keep_retains_older_checkpoints(workload, tmp_path):
    model = copy_model(workload, tmp_path)
    ok(mpinn(2, "train", str(model), "--data", str(workload["data"]), "--epochs", "3",
             "--checkpoint-every", "1", "--keep", "3", *TRAIN, timeout=300))
    kept = sorted(p.name for p in Path(f"{model}.checkpoints").iterdir())
    assert len(kept) == 2 and all("epoch" in name for name in kept), kept
    for older in Path(f"{model}.checkpoints").iterdir():
        ok(mpinn(1, "evaluate", str(older), "--data", str(workload["data"])))


@pytest.fixture
def small_disk(tmp_path):
    """A 1.5 MB tmpfs: room for the model, not for a checkpoint with Adam's state."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1500k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {made.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_during_checkpoint_is_a_clear_error_and_keeps_the_model(small_disk):
    model = small_disk / "model.h5"
    ok(mpinn(1, "init", str(model), "--sizes", "64,384,384,10", "--seed", "1"))
    before = model.read_bytes()
    result = mpinn(2, "train", str(model), "--data", str(ROOT / "data/digits_train.h5"),
                   "--optimizer", "adam", "--lr", "0.001", timeout=60)
    assert result.returncode == 1
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("mpinn: error:")]
    assert len(errors) == 1 and "writing the checkpoint failed" in errors[0], result.stderr
    assert "previous checkpoint in the file is intact" in errors[0]
    assert model.read_bytes() == before
    assert not Path(f"{model}.partial").exists()


def test_same_seed_ranks_and_strategy_give_bitwise_identical_runs(workload, tmp_path):
    runs = []
    for name in ("a", "b"):
        model = tmp_path / f"{name}.h5"
        model.write_bytes(workload["initial"].read_bytes())
        ok(mpinn(3, "train", str(model), "--data", str(workload["data"]), "--epochs", "1",
                 "--strategy", "percentage", "--percentages", "50,30,20", *TRAIN, timeout=300))
        runs.append(model)
    assert_same_weights(*runs)
