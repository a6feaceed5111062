"""Nothing lost: checkpoints survive SIGKILL at any moment, resume is bitwise exact, and
SIGTERM/SIGUSR1 make every rank commit a checkpoint and exit 0."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from mpinn.io.checkpoint import leftovers
from tests.helpers import assert_same_checkpoint, small_tmpfs
from tests.reference import Reference
from tests.system.test_cli import ENV, ROOT, command, mpinn, ok

# each run in here is bounded by its own limit (120 to 300 s); a test sums at most 600 s of them
pytestmark = pytest.mark.timeout(630)

TRAIN = ["--batch-size", "100", "--optimizer", "adam", "--lr", "0.001", "--seed", "3"]
STEPS = 60  # batches per epoch: 6000 samples in batches of 100


@pytest.fixture(scope="module")
def workload(tmp_path_factory) -> dict[str, Path]:
    """A model and data set big enough that a run can be interrupted mid-epoch, the weights
    of the same run left uninterrupted, and every checkpoint that run committed on the way
    (``--keep`` keeps each replaced file under the state it holds: ``epoch1-step60.h5``...)."""
    tmp = tmp_path_factory.mktemp("lost")
    data, initial, reference = tmp / "data.h5", tmp / "initial.h5", tmp / "reference.h5"
    ok(mpinn(1, "data", "classification", str(data), "--samples", "6000", "--features", "64",
             "--outputs", "10", "--seed", "1"))
    ok(mpinn(1, "init", str(initial), "--sizes", "64,384,384,10", "--seed", "2"))
    reference.write_bytes(initial.read_bytes())
    ok(mpinn(2, "train", str(reference), "--data", str(data), "--epochs", "4", "--checkpoint-every",
             "1", "--keep", "5", *TRAIN, timeout=300))
    return {"data": data, "initial": initial, "reference": reference,
            "checkpoints": Path(f"{reference}.checkpoints")}


def checkpoint(workload: dict[str, Path], epoch: int) -> Path:
    """The file the uninterrupted run committed at the end of ``epoch``."""
    return workload["checkpoints"] / f"epoch{epoch}-step{epoch * STEPS}.h5"


def copy_model(workload: dict[str, Path], tmp_path: Path) -> Path:
    model = tmp_path / "model.h5"
    model.write_bytes(workload["initial"].read_bytes())
    return model


class Run:
    """``mpinn`` under mpirun in the background; stdout and stderr are read line by line as
    they come, each line with the time it arrived."""

    def __init__(self, nranks: int, *args: str, fault: str | None = None) -> None:
        env = {**ENV, "MPINN_FAULT": fault} if fault else ENV
        self.proc = subprocess.Popen(command(nranks, *args), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                                     start_new_session=True)
        self.ended: float | None = None  # when the run was seen to end
        self.lines: queue.Queue[tuple[float, str] | None] = queue.Queue()
        self.output: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self.readers = [threading.Thread(target=self._read, args=(name,), daemon=True)
                        for name in self.output]
        for reader in self.readers:
            reader.start()

    def _read(self, name: str) -> None:
        for line in getattr(self.proc, name):
            self.output[name].append(line)
            self.lines.put((time.monotonic(), line))
        self.lines.put(None)

    def text(self, name: str) -> str:
        return "".join(self.output[name])

    def wait_for(self, pattern: str, timeout: float = 120) -> tuple[float, re.Match]:
        """When the first line matching ``pattern`` came, and the match; fails if both
        streams end or no such line comes within ``timeout`` seconds."""
        deadline, ended = time.monotonic() + timeout, 0
        while True:
            try:
                item = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r} in {timeout} s") from None
            if item is None:
                ended += 1
                if ended == len(self.readers):
                    raise AssertionError(f"run ended before printing {pattern!r}:\n"
                                         f"{self.text('stdout')}{self.text('stderr')}")
                continue
            if match := re.search(pattern, item[1]):
                return item[0], match

    def hold(self, point: str) -> int:
        """Wait until a rank holds at MPINN_FAULT's ``point``; the pid of that rank."""
        _, match = self.wait_for(rf"MPINN_FAULT: rank \d+ \(pid (\d+)\) holds at {point}$")
        assert self.proc.poll() is None, "the run ended: a kill now would interrupt nothing"
        return int(match.group(1))

    def finish(self, timeout: float) -> tuple[int, str, str]:
        """Exit code, stdout and stderr once the run has ended (killed if it outlives
        ``timeout``)."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise
        self.ended = time.monotonic()
        for reader in self.readers:
            reader.join(timeout=10)
        return code, self.text("stdout"), self.text("stderr")


def rank_pids(model: Path, launcher: subprocess.Popen) -> list[int]:
    """PIDs of the python ranks working on ``model`` (mpirun itself excluded)."""
    out = subprocess.run(["pgrep", "-f", "--", f"-m mpinn train {model}"], capture_output=True,
                         text=True)
    return sorted(int(p) for p in out.stdout.split() if int(p) not in (os.getpid(), launcher.pid))


def kill_all(run: Run, model: Path) -> None:
    """SIGKILL every rank and mpirun at once, as a node failure or a hard job limit would."""
    pids = rank_pids(model, run.proc)
    assert len(pids) == 2, pids
    os.killpg(run.proc.pid, signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    run.finish(timeout=30)


def assert_same_weights(a: Path, b: Path) -> None:
    ra, rb = Reference.from_file(str(a)), Reference.from_file(str(b))
    for wa, wb in zip(ra.weights + ra.biases, rb.weights + rb.biases, strict=True):
        assert np.array_equal(wa, wb), "weights differ"


# the phases of the checkpoint at the end of epoch 2 (MPINN_FAULT's second pass), the rank
# that holds there, and the checkpoint the model file must hold when every rank is killed
@pytest.mark.parametrize("phase, rank, committed", [
    ("save-begun", 1, 1),    # the new file has its layout; rank 0 is writing its rows
    ("save-written", 0, 1),  # every row written, not yet synced
    ("save-synced", 1, 1),   # synced and closed, not yet renamed
    ("save-rename", 0, 1),   # rank 0 is about to rename the new file over the model
    ("save-renamed", 0, 2),  # renamed; the directory is not yet synced
])
def test_sigkill_of_all_ranks_at_each_phase_of_a_save_keeps_a_checkpoint_and_resume_is_exact(
        workload, tmp_path, phase, rank, committed):
    model = copy_model(workload, tmp_path)
    run = Run(2, "train", str(model), "--data", str(workload["data"]), "--epochs", "4",
              "--checkpoint-every", "1", *TRAIN, fault=f"{phase}:{rank}:2")
    run.hold(phase)
    kill_all(run, model)
    assert_same_checkpoint(model, checkpoint(workload, committed))
    ok(mpinn(2, "train", str(model), "--data", str(workload["data"]), "--epochs", "4", "--resume",
             *TRAIN, timeout=300))
    assert_same_weights(model, workload["reference"])


def test_sigkill_of_one_rank_during_a_save_ends_the_job_and_keeps_the_last_checkpoint(
        workload, tmp_path):
    model = copy_model(workload, tmp_path)
    run = Run(2, "train", str(model), "--data", str(workload["data"]), "--epochs", "4",
              "--checkpoint-every", "1", *TRAIN, fault="save-synced:1:2")
    os.kill(run.hold("save-synced"), signal.SIGKILL)  # rank 1 only; rank 0 waits to rename
    code, _, err = run.finish(timeout=60)  # mpirun notices and ends the job: nothing hangs
    assert code != 0, err
    assert_same_checkpoint(model, checkpoint(workload, 1))


# rank R holds at its 75th step (epoch 2, batch 15) until the signal reaches it: the
# checkpoint must hold epoch 1 and the 14 batches of epoch 2 done before that step
@pytest.mark.parametrize("sig, target, holder", [
    (signal.SIGUSR1, "mpirun", 1),   # SLURM's --signal: mpirun forwards it to every rank
    (signal.SIGTERM, "rank", 1),     # one rank only: rank 0 learns it from the step's allreduce
    (signal.SIGUSR1, "rank", 0),     # one rank only: rank 1 learns it from rank 0
])
def test_preemption_signal_commits_a_checkpoint_and_resume_is_exact(workload, tmp_path, sig, target,
                                                                    holder):
    model = copy_model(workload, tmp_path)
    run = Run(2, "train", str(model), "--data", str(workload["data"]), "--epochs", "4", *TRAIN,
              fault=f"hold:{holder}:75")
    pid = run.hold("hold")
    os.kill(run.proc.pid if target == "mpirun" else pid, sig)
    code, out, err = run.finish(timeout=120)
    assert code == 0, err
    # rank 0 prints it: it names the signal if rank 0 received it itself
    stopped_by = sig.name if target == "mpirun" or holder == 0 else "a signal on another rank"
    assert (f"mpinn: stopped by {stopped_by}: checkpoint committed at epoch 1, batch 14; "
            "continue with --resume") in out, out + err
    with h5py.File(model, "r") as f:
        state = {key: json.loads(f["state"].attrs[key]) for key in ("epoch", "batch", "step")}
    assert state == {"epoch": 1, "batch": 14, "step": STEPS + 14}
    ok(mpinn(2, "train", str(model), "--data", str(workload["data"]), "--epochs", "4", "--resume",
             *TRAIN, timeout=300))
    assert_same_weights(model, workload["reference"])


def test_keep_retains_older_checkpoints(workload, tmp_path):
    model = copy_model(workload, tmp_path)
    ok(mpinn(2, "train", str(model), "--data", str(workload["data"]), "--epochs", "3",
             "--checkpoint-every", "1", "--keep", "3", *TRAIN, timeout=300))
    kept = sorted(p.name for p in Path(f"{model}.checkpoints").iterdir())
    # each replaced file is kept under the state it holds; the oldest (the initial model) is gone
    assert kept == [f"epoch1-step{STEPS}.h5", f"epoch2-step{2 * STEPS}.h5"], kept
    for epoch in (1, 2):
        assert_same_checkpoint(Path(f"{model}.checkpoints") / kept[epoch - 1],
                               checkpoint(workload, epoch))
    assert_same_checkpoint(model, checkpoint(workload, 3))


@pytest.fixture
def small_disk(tmp_path):
    """A 1.5 MB tmpfs: room for the model, not for a checkpoint with Adam's state."""
    with small_tmpfs(tmp_path / "disk", "1500k") as mount:
        yield mount


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
    assert not leftovers(str(model)), "the unfinished checkpoint was left beside the model"


def test_same_seed_ranks_and_strategy_give_bitwise_identical_runs(workload, tmp_path):
    runs = []
    for name in ("a", "b"):
        model = tmp_path / f"{name}.h5"
        model.write_bytes(workload["initial"].read_bytes())
        ok(mpinn(3, "train", str(model), "--data", str(workload["data"]), "--epochs", "1",
                 "--strategy", "percentage", "--percentages", "50,30,20", *TRAIN, timeout=300))
        runs.append(model)
    assert_same_weights(*runs)
