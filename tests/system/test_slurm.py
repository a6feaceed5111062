"""The sbatch scripts in jobs/ on a real single-node SLURM cluster (slurmctld, slurmd, munge).

The cluster is started by scripts/slurm-up.sh (root; Debian packages installed when
missing) and stopped by PID afterwards. Where it cannot start, the tests are skipped with
the reason.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.reference import Reference
from tests.system.test_cli import ENV, ROOT, mpinn, ok
from tests.system.test_sparse import independent_categories

PYTHON = str(ROOT / ".venv/bin/python") if (ROOT / ".venv/bin/python").exists() else "python3"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> dict[str, str]:
    state = tmp_path_factory.mktemp("slurm")
    # started as on a cluster that exports OMP_NUM_THREADS=1: the node must still get every
    # CPU, or each 2-task job below would pend forever
    up = subprocess.run(["bash", str(ROOT / "scripts/slurm-up.sh"), str(state)],
                        capture_output=True, text=True, timeout=300,
                        env={**ENV, "OMP_NUM_THREADS": "1"})
    if up.returncode == 2:  # no SLURM to be had here (not root, no packages)
        pytest.skip(f"no SLURM cluster could be started here: {up.stderr.strip()[-300:]}")
    # anything else (a node that never became idle, a cluster already running) is a failure
    assert up.returncode == 0, f"slurm-up.sh failed: {up.stderr.strip()[-500:]}"
    env = {**ENV, "SLURM_CONF": str(state / "slurm.conf")}
    yield env
    subprocess.run(["bash", str(ROOT / "scripts/slurm-down.sh"), str(state)], timeout=60)


def sbatch(env: dict[str, str], script: str, workdir: Path, wait: bool = True, **params: str) -> str:
    exports = ",".join(["ALL", f"PYTHON={PYTHON}", *(f"{k}={v}" for k, v in params.items())])
    cmd = ["sbatch", "--parsable", f"--chdir={workdir}", "--ntasks=2", f"--export={exports}",
           str(ROOT / "jobs" / script)]
    return submit(env, cmd, wait)


def submit(env: dict[str, str], cmd: list[str], wait: bool, timeout: float = 600) -> str:
    """Run the sbatch command line ``cmd``; the job id, once the job has completed with exit
    code 0 when ``wait``. Polled here rather than by ``sbatch --wait``, which sleeps 2, then 8,
    then 10 s between its looks: 5 to 10 idle seconds after each job of a few seconds."""
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    job = result.stdout.strip().splitlines()[0].split(";")[0]
    if not wait:
        return job
    deadline = time.monotonic() + timeout
    while (info := job_info(env, job)).get("JobState") not in FINISHED:
        assert time.monotonic() < deadline, f"job {job} still {info.get('JobState')} after {timeout} s"
        time.sleep(0.2)
    assert info["JobState"] == "COMPLETED" and info.get("ExitCode") == "0:0", info
    return job


# the states a job ends in (squeue(1), JOB STATE CODES)
FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "PREEMPTED", "BOOT_FAIL", "DEADLINE")


def job_info(env: dict[str, str], job: str) -> dict[str, str]:
    """``scontrol show job``'s fields (JobState, ExitCode, NodeList, ...); none once the job
    is gone."""
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, env=env)
    return dict(field.split("=", 1) for field in out.stdout.split() if "=" in field)


def job_state(env: dict[str, str], job: str) -> str:
    return job_info(env, job).get("JobState", "UNKNOWN")


def wait_through_requeue(env: dict[str, str], job: str, timeout: float = 300) -> None:
    """Wait for a job sent SIGUSR1 (it checkpoints, requeues itself and resumes) to complete.

    A requeued job waits for a begin time (cred_expire, 120 s) so that the revoked credential
    of its first run cannot match the new one; started in the same second, slurmd refuses it
    ("Job credential revoked") and the job fails. Wait past that second, then start it as the
    scheduler would."""
    deadline = time.monotonic() + timeout
    pending_since = None
    while (state := job_state(env, job)) != "COMPLETED":
        assert state in ("RUNNING", "PENDING", "REQUEUED", "COMPLETING"), state
        pending_since = (pending_since or time.monotonic()) if state == "PENDING" else None
        if pending_since is not None and time.monotonic() - pending_since > 3:
            subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], env=env)
        assert time.monotonic() < deadline, f"job {job} still {state}"
        time.sleep(0.2)


@pytest.mark.timeout(1350)  # two jobs of at most 600 s each, one 120 s run
def test_train_and_predict_jobs_run_and_log_next_to_the_model(slurm, tmp_path):
    model, preds = tmp_path / "model.h5", tmp_path / "preds.h5"
    ok(mpinn(1, "init", str(model), "--sizes", "64,32,10", "--seed", "1"))
    job = sbatch(slurm, "train.sbatch", tmp_path, MODEL=str(model),
                 DATA=str(ROOT / "data/digits_train.h5"), EPOCHS="3")
    log = (tmp_path / f"mpinn-train-{job}.out").read_text()
    assert "on 2 ranks" in log and "epoch 3 " in log, log
    with h5py.File(model, "r") as f:
        assert f["state"].attrs["epoch"] == "3"
    job = sbatch(slurm, "predict.sbatch", tmp_path, MODEL=str(model),
                 DATA=str(ROOT / "data/digits_test.h5"), OUT=str(preds))
    log = (tmp_path / f"mpinn-predict-{job}.out").read_text()
    assert "accuracy" in log, log
    with h5py.File(preds, "r") as f:
        assert f["outputs"].shape == (360, 10)


@pytest.mark.timeout(1000)  # runs of 120, 120 and 300 s, then 120 s and 300 s of job waits
def test_preempted_job_checkpoints_requeues_and_ends_as_an_uninterrupted_run(slurm, tmp_path):
    data, model, reference = tmp_path / "data.h5", tmp_path / "model.h5", tmp_path / "ref.h5"
    ok(mpinn(1, "data", "classification", str(data), "--samples", "30000", "--outputs", "10"))
    # epochs of about a second here: the signal must come while training runs (64,256,10
    # took 0.15 s an epoch, and the whole run could end before the test saw its first line)
    ok(mpinn(1, "init", str(model), "--sizes", "64,1024,1024,10", "--seed", "2"))
    reference.write_bytes(model.read_bytes())
    ok(mpinn(2, "train", str(reference), "--data", str(data), "--epochs", "3", "--batch-size",
             "64", "--lr", "0.1", timeout=300))

    job = sbatch(slurm, "train.sbatch", tmp_path, wait=False, MODEL=str(model), DATA=str(data),
                 EPOCHS="3")
    log = tmp_path / f"mpinn-train-{job}.out"
    deadline = time.monotonic() + 120
    while "epoch" not in (log.read_text() if log.exists() else "") or "training" not in log.read_text():
        assert time.monotonic() < deadline and job_state(slurm, job) in ("PENDING", "RUNNING")
        time.sleep(0.5)
    # what SLURM does at --signal=B:USR1@120 before the time limit, or on preemption
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm, check=True)
    wait_through_requeue(slurm, job)
    text = log.read_text()
    assert "stopped by SIGUSR1" in text and f"requeueing job {job}" in text, text
    a, b = Reference.from_file(str(model)), Reference.from_file(str(reference))
    for wa, wb in zip(a.weights + a.biases, b.weights + b.biases, strict=True):
        assert np.array_equal(wa, wb)


@pytest.mark.timeout(1230)  # two jobs of at most 600 s each
def test_sparse_benchmark_and_scaling_jobs_report_matching_categories(slurm, tmp_path):
    small = dict(NEURONS="1024", LAYERS="30", SAMPLES="200", BATCH="100", DIR=str(tmp_path))
    job = sbatch(slurm, "sparse-dnn.sbatch", tmp_path, **small)
    log = (tmp_path / f"mpinn-sparse-dnn-{job}.out").read_text()
    assert "2 ranks" in log and "G edges/s" in log and ": match" in log, log
    # the categories the job found are the ones the test computes itself from the files
    truth, stored = independent_categories(str(tmp_path / "radixnet-n1024-l30-s0.h5"),
                                           str(tmp_path / "radixnet-n1024-l30-s0-inputs200.h5"))
    assert np.array_equal(stored, truth) and 0 < truth.size < 200
    assert f"categories: {truth.size} of 200 samples" in log, log
    job = sbatch(slurm, "scaling.sbatch", tmp_path, **small, STRATEGY="balanced")
    log = (tmp_path / f"mpinn-scaling-{job}.out").read_text()
    rows = [line.split() for line in log.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in rows] == ["1", "2"], log
    runs = [json.loads((tmp_path / f"scaling-{job}-{p}.json").read_text()) for p in (1, 2)]
    base = runs[0]["edges_per_second"]
    for row, run, ranks in zip(rows, runs, (1, 2), strict=True):
        assert run["ranks"] == ranks and run["categories"] == truth.size and run["correct"], run
        rate = run["edges_per_second"]  # the table is the runs' own figures, not made up
        assert row[1:] == [f"{rate / 1e9:.3f}", f"{rate / base:.2f}x", f"{rate / base / ranks:.0%}"], row
