"""The Python API as a careless script calls it (issue 25), searched by hypothesis: programs of
``Network`` calls whose argument values and order are drawn from the methods' own
signatures (good values, wrong types, negative, huge and non-finite numbers, bad arrays,
paths that are directories, missing or the model itself). The property: every call
succeeds or raises ``MpinnError`` on every rank; none hangs, none shows a traceback, and a
refused call changes no file (tests/api_driver.py checks that after each call).

``MPINN_HYPOTHESIS_EXAMPLES=N`` searches with N random programs per rank count (the default
is a fixed, derandomised set small enough for CI).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpinn.api import Network
from tests.system.test_cli import ENV, ROOT, mpinn, ok

SEARCH = int(os.environ.get("MPINN_HYPOTHESIS_EXAMPLES", "0"))
EXAMPLES = {1: SEARCH or 20, 3: SEARCH or 6}
SECONDS = 60  # a program of a few calls on 24 samples takes 2-6 s; generous for CI
METHODS = ("create", "open", "fit", "predict", "evaluate", "save", "close")

paths = st.sampled_from([{"path": p} for p in ("m.h5", "new.h5", "dir", "missing/x.h5",
                                                "log.jsonl", "dir/log.jsonl")])
anything = st.one_of(st.none(), st.booleans(),
                     st.sampled_from([-1, 0, 1, 2, 3, 7, 10**12, 2**63, 1.5, -0.5, 1e-3,
                                      math.inf, math.nan, "abc", "", "1,2", [1, 2], [-1]]))
arrays = st.sampled_from([{"$": name} for name in ("X", "X3", "Xnan", "X1d", "Xempty")])
targets = st.sampled_from([None, *({"$": name} for name in ("y", "yfloat", "ybig", "yshort",
                                                             "ystr"))])
# values that make sense, so that most programs get past the checks into the work
GOOD: dict[str, Any] = {
    "sizes": st.sampled_from([[8, 6, 3], "8,6,3", [8, 3]]), "path": st.just({"path": "m.h5"}),
    "x": st.just({"$": "X"}), "y": st.just({"$": "y"}), "epochs": st.integers(0, 2),
    "batch_size": st.sampled_from([1, 5, 64]), "optimizer": st.sampled_from(["sgd", "adam"]),
    "lr": st.sampled_from([0.01, 0.1]), "force": st.booleans(), "resume": st.booleans(),
    "strategy": st.sampled_from(["balanced", "count"]), "counts": st.just(None),
    "validation_data": st.just({"tuple": [{"$": "X"}, {"$": "y"}]}),
    "log_json": st.just({"path": "log.jsonl"}), "keep_best": st.just(False),
}
BAD: dict[str, Any] = {"x": arrays, "y": targets, "path": paths, "log_json": paths,
                       "validation_data": st.one_of(arrays, paths, anything)}
SKIPPED = {"self", "cls", "comm", "callbacks", "progress", "verbose", "ids"}


def _parameters(method: str) -> list[inspect.Parameter]:
    signature = inspect.signature(getattr(Network, method))
    return [p for p in signature.parameters.values()
            if p.name not in SKIPPED and p.kind is not p.VAR_KEYWORD]


@st.composite
def calls(draw: st.DrawFn) -> dict[str, Any]:
    """One call: a method, then each of its parameters left out, given a sensible value or
    given anything (the required ones always given)."""
    method = draw(st.sampled_from(METHODS))
    kwargs: dict[str, Any] = {}
    for p in _parameters(method):
        required = p.default is p.empty
        choice = draw(st.sampled_from(["good", "bad", "out"] if not required else ["good", "bad"]))
        if choice == "out" or (choice == "good" and p.name not in GOOD and not required):
            continue
        good = GOOD.get(p.name, anything)
        kwargs[p.name] = draw(good if choice == "good" else BAD.get(p.name, anything))
    return {"call": method, "kwargs": kwargs}


programs = st.lists(calls(), min_size=2, max_size=5).map(
    lambda rest: [{"call": "open", "kwargs": {"path": {"path": "m.h5"}}}, *rest])


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("api-property")
    ok(mpinn(1, "init", str(root / "m.h5"), "--sizes", "8,6,3", "--seed", "1", "--quiet"))
    return root


def run(root: Path, nranks: int, program: list[dict]) -> subprocess.CompletedProcess:
    (root / "program.json").write_text(json.dumps(program))
    launcher = [] if nranks == 1 else ["mpirun", "--oversubscribe", "-n", str(nranks)]
    return subprocess.run([*launcher, sys.executable, "-m", "mpi4py",
                           str(ROOT / "tests/api_driver.py"), str(root / "program.json"),
                           str(root)], capture_output=True, text=True, cwd=root, timeout=SECONDS,
                          env={**ENV, "MPINN_COLLECTIVE_TIMEOUT": "20"})


@pytest.mark.parametrize("nranks", [1, 3])
def test_careless_api_programs_succeed_or_raise_mpinn_error_cleanly(base, tmp_path, nranks):
    import shutil
    counts: dict[str, int] = {}

    @settings(max_examples=EXAMPLES[nranks], deadline=None, derandomize=not SEARCH,
              suppress_health_check=list(HealthCheck))
    @given(program=programs)
    def check(program: list[dict]) -> None:
        root = tmp_path / "ws"
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(base, root)
        (root / "dir").mkdir(exist_ok=True)
        result = run(root, nranks, program)
        shown = json.dumps(program)
        assert "Traceback" not in result.stderr, f"{shown}\n{result.stderr[-3000:]}"
        assert result.returncode == 0, f"{shown}\n{result.stdout}\n{result.stderr[-3000:]}"
        outcomes = [json.loads(line) for line in result.stdout.splitlines()
                    if line.startswith("{")]
        for outcome in outcomes:
            assert "BUT CHANGED" not in outcome["outcome"], f"{shown}\n{outcome}"
            kind = "ok" if outcome["outcome"] == "ok" else "refused"
            counts[kind] = counts.get(kind, 0) + 1

    check()
    print(f"\n{nranks} rank(s): {counts}")
