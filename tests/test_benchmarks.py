"""The benchmark scripts still run end to end (tiny sizes; nothing about speed is asserted)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.test_cli import ENV, ROOT


@pytest.mark.timeout(630)  # the script's run is bounded at 600 s
def test_many_cores_script_runs_every_benchmark_at_tiny_sizes(tmp_path):
    """QUICK=1 runs the pipeline, Sparse DNN and dense training benchmarks, as on a big box."""
    env = {**ENV, "QUICK": "1", "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(ROOT / "benchmarks/many_cores.sh"), str(tmp_path)],
                            capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "alltoallv ok" in (tmp_path / "machine.txt").read_text()
    pipeline = (tmp_path / "pipeline.txt").read_text()
    assert re.search(r"P=2 .*M=1: .*M=4: ", pipeline) and re.search(r"P=4 .*M=4: ", pipeline), pipeline
    sparse = (tmp_path / "sparse-scaling.txt").read_text()
    assert sparse.count("categories match") == 5 and "WRONG" not in sparse, sparse
    train = (tmp_path / "train-p4.txt").read_text()
    assert "mpinn, mpirun -n 4" in train and "ceiling: GEMM peak" in train, train
