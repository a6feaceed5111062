"""The benchmark scripts still run end to end (tiny sizes; nothing about speed is asserted)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import warnings

import pytest

from tests.system.test_cli import ENV, ROOT


def assert_torchrun_peer_reported(text: str, peer: str) -> None:
    """A torchrun peer's figure in a train_mlp table, or, where a worker died twice (once,
    on a loaded CI machine, gloo's TP worker did), the benchmark's note with the worker's
    reason after its second try, as a warning: never silently nothing."""
    if re.search(rf"{re.escape(peer)} +[\d.]+ ", text):
        return
    skipped = re.search(rf"\({re.escape(peer)} skipped: (.+)\)", text)
    assert skipped and f"({peer} failed, tried once more: " in text, text
    warnings.warn(f"{peer} did not run: {skipped.group(1)}", stacklevel=2)


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
    train = (tmp_path / "train-p2.txt").read_text()
    assert "mpinn, mpirun -n 2" in train and "ceiling: GEMM peak" in train, train
    assert_torchrun_peer_reported(train, "PyTorch TP (DTensor, gloo), torchrun 2x1")
    assert re.search(r"per process at once: [\d.]+ \(rank \d\) / [\d.]+ / [\d.]+ GFLOP/s", train), train
    ring = (tmp_path / "iallreduce-ring-p4.txt").read_text()
    assert "R = 2 x Q = 2" in ring and "2x2 balanced" in ring, ring
    spread = (tmp_path / "spread-p2.txt").read_text()
    assert re.search(r"layer rows 256 round 0: min +[\d.]+ median", spread), spread
    # the replicas and digits parts: every R x Q beside its PyTorch peer, the cost model's
    # prediction per layout, and partition --plan's table with its choice
    for name, p, layouts, peer in (("replicas-p4", 4, ("1 x Q = 4", "2 x Q = 2", "4 x Q = 1"),
                                    "PyTorch, 1 process, 4 threads"),
                                   ("digits-p2", 2, ("2 x Q = 1", "1 x Q = 2"),
                                    "PyTorch DDP (gloo), torchrun 2x1")):
        text = (tmp_path / f"{name}.txt").read_text()
        for layout in layouts:
            assert re.search(rf"mpinn, mpirun -n {p}, R = {layout}, 1 thread/rank +[\d.]+ ", text), text
        if "torchrun" in peer:
            assert_torchrun_peer_reported(text, peer)
        else:
            assert re.search(rf"{re.escape(peer)} +[\d.]+ ", text), text
        assert "its choice for these ranks:" in text and "measured" in text, text
        plan = (tmp_path / f"{name}-plan.txt").read_text()
        assert plan.count("<- chosen") == 1 and "chosen: --replicas" in plan, plan
    assert not (tmp_path / "failed.txt").exists()


@pytest.mark.timeout(630)  # its subprocesses' own limits, and then some
def test_scale_benchmark_times_every_stage_and_prints_its_slope():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks/scale.py"), "--ranks", "2",
                             "--grid", "1024x2,2048x2,1024x4", "--fan-in", "4"],
                            capture_output=True, text=True, env=ENV, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert re.search(r"^\s+2048\s+2\s+16,384(\s+\d+\.\d\d){6}$", out, re.M), out
    for stage in ("init", "partition", "load", "plans", "inference", "checkpoint"):
        assert re.search(rf"^  {stage}\s+-?\d+\.\d\d\s+-?\d+\.\d\d$", out, re.M), out
    assert re.search(r"metadata / rows at \d+x\d+: \S+ \(ceiling 0.1\)", out), out


@pytest.mark.timeout(1230)  # its subprocesses' own limits, and then some
def test_many_cores_scale_script_runs_every_part_at_tiny_sizes(tmp_path):
    """QUICK=1: both challenge runs (generated in parallel, checked against their truth) and
    the scale benchmark, each part's output in OUT_DIR."""
    env = {**ENV, "QUICK": "1", "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    result = subprocess.run(["bash", str(ROOT / "benchmarks/many_cores_scale.sh"),
                             str(tmp_path / "out")], capture_output=True, text=True, env=env,
                            timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("sparse-16384", "sparse-65536"):
        text = (tmp_path / "out" / f"{name}.txt").read_text()
        assert "scipy loop on 2 processes" in text and ": match" in text, text
        assert re.search(r"G edges/s.*\n.*load \(I/O and partition\) [\d.]+ s\n"
                         r"  memory per rank: peak RSS \d+ MiB", text), text
        assert "exit 0, wall" in text, text
    scale = (tmp_path / "out" / "scale.txt").read_text()
    assert "log-log slope against connections" in scale and "exit 0, wall" in scale, scale
    assert not list(tmp_path.glob("mpinn-scale-nets.*")), "the networks were not removed"


def _train_mlp():
    spec = importlib.util.spec_from_file_location("train_mlp", ROOT / "benchmarks/train_mlp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(120)
def test_a_torchrun_peer_that_dies_is_run_once_more_and_its_reason_named(tmp_path, capsys):
    """A worker killed by a signal: the benchmark names the signal (not torchrun's own
    ChildFailedError), tries once more, and keeps the figure when the second run works."""
    pytest.importorskip("torch")
    train_mlp = _train_mlp()
    marker = tmp_path / "died-once"
    worker = tmp_path / "worker.py"
    worker.write_text(f"""import json, os, pathlib
marker = pathlib.Path({str(marker)!r})
if os.environ["RANK"] == "1" and not marker.exists():
    marker.touch()
    os.abort()
if os.environ["RANK"] == "0":
    print(json.dumps({{"samples_per_second": 7.0}}))
""")
    out = train_mlp.run_peer("peer", train_mlp.torchrun([str(worker)], 2), 1)
    assert out == {"samples_per_second": 7.0}
    assert "(peer failed, tried once more: traceback : Signal 6 (SIGABRT)" in capsys.readouterr().out
    # a worker's own exception is the reason, not torchrun's ChildFailedError
    assert train_mlp.failure_reason("Traceback (most recent call last):\n  File x\n"
                                    "ModuleNotFoundError: No module named 'torch'\n"
                                    "    raise ChildFailedError(\n") == \
        "ModuleNotFoundError: No module named 'torch'"
