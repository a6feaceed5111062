"""The timeline (``train --trace``, ``fit(trace=)``, issue 26): one Chrome trace of every
rank, which parses, whose spans nest on each track, and whose step spans add up to the
time the trainer itself measured."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.system.test_cli import DIGITS_TRAIN, ENV, ROOT, command, mpinn, ok

STEPS_PER_EPOCH = 23  # the digits training set (1437 samples) in batches of 64


def spans(trace: dict) -> list[dict]:
    return [e for e in trace["traceEvents"] if e["ph"] == "X"]


def assert_nested(events: list[dict]) -> None:
    """On each (rank, track), any two spans are disjoint or one holds the other."""
    tracks: dict[tuple[int, int], list[dict]] = {}
    for e in events:
        tracks.setdefault((e["pid"], e["tid"]), []).append(e)
    slack = 0.01  # microseconds: the rounding of ts and dur
    for key, track in tracks.items():
        track.sort(key=lambda e: (e["ts"], -e["dur"]))
        open_ends: list[float] = []
        for e in track:
            while open_ends and e["ts"] >= open_ends[-1] - slack:
                open_ends.pop()
            end = e["ts"] + e["dur"]
            assert not open_ends or end <= open_ends[-1] + slack, (key, e)
            open_ends.append(end)


@pytest.mark.timeout(630)  # its subprocesses' own limits, and then some
def test_a_traced_training_has_a_track_per_rank_nested_spans_and_its_measured_step_time(
        tmp_path):
    model, trace, log = tmp_path / "m.h5", tmp_path / "t.json", tmp_path / "log.jsonl"
    ok(mpinn(1, "init", str(model), "--sizes", "64,256,256,10", "--seed", "1", "--quiet"))
    # the GEMMs in parts as across nodes (engine.overlap_parts), on this one host
    train = subprocess.run(
        command(2, "train", str(model), "--data", DIGITS_TRAIN, "--epochs", "2", "--batch-size",
                "64", "--exchange", "alltoallv", "--trace", str(trace), "--log-json", str(log),
                "--quiet"), capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**ENV, "MPINN_OVERLAP_PARTS": "4"})
    ok(train)
    data = json.loads(trace.read_text())
    names = sorted(e["args"]["name"] for e in data["traceEvents"] if e["name"] == "process_name")
    assert len(names) == 2 and names[0].startswith("rank 0 (") and names[1].startswith("rank 1 (")
    events = spans(data)
    assert_nested(events)
    kinds = {e["cat"] for e in events}
    assert {"step", "layer", "compute", "pack", "wait", "optimizer", "io", "exchange",
            "data"} <= kinds
    assert {e["name"] for e in events if e["cat"] == "exchange"} >= {
        "layer 2 forward", "layer 2 backward"}
    # the GEMMs beside an exchange in flight run in parts, the exchange tested between them
    # (engine.OVERLAP_PARTS): a step holds tests, forward and backward
    assert sum(e["name"] == "test" for e in events) >= 2 * STEPS_PER_EPOCH * 2 * 3
    epoch_seconds = 1437 / json.loads(
        log.read_text().splitlines()[-1])["samples_per_second"]
    for rank in (0, 1):
        steps = sorted((e for e in events if e["pid"] == rank and e["name"] == "step"),
                       key=lambda e: e["ts"])
        assert len(steps) == 2 * STEPS_PER_EPOCH
        traced = sum(e["dur"] for e in steps[-STEPS_PER_EPOCH:]) / 1e6
        assert abs(traced / epoch_seconds - 1) < 0.05, (rank, traced, epoch_seconds)
    picture = tmp_path / "step.png"
    ok(mpinn(1, "plot", "timeline", str(trace), "--out", str(picture)))
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # an existing trace is replaced only with --force
    again = mpinn(2, "train", str(model), "--data", DIGITS_TRAIN, "--trace", str(trace))
    assert again.returncode == 1 and "--trace" in again.stderr and "--force" in again.stderr


@pytest.mark.mpi
def test_fit_writes_the_trace_of_every_rank(mpi_tmp_path):
    import numpy as np
    from mpi4py import MPI

    from mpinn import Network
    comm = MPI.COMM_WORLD
    path, trace = mpi_tmp_path / "m.h5", mpi_tmp_path / "fit.json"
    x = np.random.default_rng(0).random((40, 8), dtype=np.float32)
    y = np.arange(40) % 3
    net = Network.create(str(path), sizes=[8, 12, 3], seed=1, force=True)
    net.fit(x, y, epochs=2, batch_size=10, trace=str(trace))
    net.close()
    comm.Barrier()
    data = json.loads(Path(trace).read_text())
    events = spans(data)
    assert {e["pid"] for e in events} == set(range(comm.size))
    assert sum(e["name"] == "step" for e in events) == 8 * comm.size
    assert_nested(events)


def test_the_clock_offset_and_the_null_tracer():
    from mpi4py import MPI

    from mpinn.trace import NULL, Tracer, clock_offset
    assert clock_offset(MPI.COMM_SELF) == 0.0
    with NULL.span("nothing", "compute"):
        pass
    tracer = Tracer(MPI.COMM_SELF)
    with tracer.span("outer", "step"), tracer.span("inner", "compute", {"layer": 1}):
        pass
    events = [e for e in tracer.chrome_events() if e["ph"] == "X"]
    assert [e["name"] for e in events] == ["inner", "outer"]
    assert events[0]["args"] == {"layer": 1} and events[1]["ts"] <= events[0]["ts"]
