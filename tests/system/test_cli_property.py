"""The command line and config files as a careless user types them (issue 11), searched by
hypothesis: argv and TOML drawn from the real flag set (the parser itself), with wrong types,
negative and huge numbers, paths that coincide with the model or the data, directories and
existing outputs. The property: the command succeeds with a correct result (checked against
tests/reference.py where it computes one), or exits non-zero within seconds with exactly one
``mpinn: error:`` line, no traceback, and no file that existed before changed.

``MPINN_HYPOTHESIS_EXAMPLES=N`` searches with N random examples per rank count (the default
is a fixed, derandomised set small enough for CI); each example's outcome is appended to
``$MPINN_PROPERTY_LOG`` when set, for the figures in the closing note.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpinn.cli.parser import REQUIRED, build_parser
from mpinn.io import schema
from tests.reference import Reference, assert_close
from tests.system.test_cli import DIGITS_TEST, ENV, ROOT, command, digest

SEARCH = int(os.environ.get("MPINN_HYPOTHESIS_EXAMPLES", "0"))
EXAMPLES = {1: SEARCH or 30, 3: SEARCH or 12}
REFUSAL_SECONDS = 30  # a refusal takes 1-3 s; the bound allows for a loaded CI machine
COMMANDS = ("init", "partition", "inspect", "train", "evaluate", "predict", "plot", "data",
            "import-graphchallenge", "import-torch", "export-torch")
# names in the workspace a path may take: the model, the data, an existing file the user
# keeps, new files, a directory, a file in a missing directory
PATHS = ("M.h5", "D.h5", "keep.h5", "new.h5", "new2.h5", "out.png", "dir", "missing/x.h5")
LIST_FLAGS = {"sizes", "storage", "counts", "percentages", "layer_ranks"}
PATH_FLAGS = {"data", "out", "ids", "log_json", "model", "dir", "inputs", "categories", "config"}


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


numbers = st.sampled_from([-3, -1, 0, 1, 2, 3, 7, 64, 10**9, 10**12, 2**63, 10**30])
junk = st.sampled_from(["abc", "1.5", "", "-", "1e3", "0x10", "true", "None"])
floats = st.sampled_from([-1.0, 0.0, 1e-3, 0.05, 0.5, 0.99, 1.0, 1.5, 1e300, math.nan, math.inf])


# values that make sense, so that most examples get past the flags into the work
VALID = {"sizes": ["64,16,10", "64,10", "64,8,8,10"], "data": ["D.h5"], "out": ["new.h5", "out.png"],
         "ranks": ["1", "2", "3"], "batch_size": ["16", "64"], "lr": ["0.05"],
         "momentum": ["0.5"], "seed": ["3"], "keep": ["1", "2"], "checkpoint_every": ["1"],
         "micro_batches": ["2"], "fan_in": ["2"], "density": ["0.5"], "cap": ["2"],
         "counts": ["50,56", "106"], "percentages": ["50,50", "100"], "layer_ranks": ["0,0,1"],
         "storage": ["dense", "csr", "csr,dense"], "samples": ["50"], "features": ["64"],
         "outputs": ["10"], "threads": ["1"], "strategy": ["balanced", "count", "layers"],
         "log_json": ["log.jsonl"], "name": ["p"]}


def _value(dest: str, action: argparse.Action) -> st.SearchStrategy:
    """What a user might write for one flag (as text on the command line): two times in
    three a sensible value, else anything."""
    if dest in VALID:
        return st.integers(0, 2).flatmap(lambda i: st.sampled_from(VALID[dest]) if i < 2
                                         else _hostile(dest, action))
    return _hostile(dest, action)


def _hostile(dest: str, action: argparse.Action) -> st.SearchStrategy:
    if dest in PATH_FLAGS:
        return st.sampled_from(PATHS)
    if dest in LIST_FLAGS:
        item = (st.sampled_from(["dense", "csr", "coo", ""]) if dest == "storage"
                else st.one_of(numbers.map(str), junk))
        return st.lists(item, min_size=0, max_size=4).map(",".join)
    if action.choices:
        return st.one_of(st.sampled_from(list(action.choices)), junk)
    if action.type is int:
        return st.one_of(numbers.map(str), junk)
    if action.type is float:
        return st.one_of(floats.map(str), numbers.map(str), junk)
    if dest in ("activation", "output"):
        return st.sampled_from(["relu", "sigmoid", "tanh", "gelu", "silu", "leaky_relu", "softmax",
                                "swish", "relu_cap", ""])
    if dest in ("partition", "name"):
        return st.sampled_from(["p", "balanced", ".", "a/b", ""])
    return st.one_of(st.sampled_from(["balanced", "count", "ids", "mincut", "x"]), junk)


def _toml_value(draw: st.DrawFn, text: str) -> str:
    """The same setting as a TOML value, sometimes of another type than its flag's."""
    kind = draw(st.sampled_from(["as-is", "string", "bool", "float", "list"]))
    if kind == "string":
        return json.dumps(text)
    if kind == "bool":
        return draw(st.sampled_from(["true", "false"]))
    if kind == "float":
        return draw(st.sampled_from(["1.7", "-2.5", "0.0", "1e40"]))
    if kind == "list":
        return json.dumps([t for t in text.split(",") if t][:3] or ["a", "b"])
    try:
        return json.dumps(json.loads(text))
    except ValueError:
        return json.dumps(text)


class ArgvPath(str):
    """A path drawn for the command line: resolved against the workspace."""


def _toml_text(value: object) -> object:
    """A TOML value as the text a flag would hold ("a,b" for a list), True for ``true``."""
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return value if isinstance(value, bool) else str(value)


@st.composite
def invocations(draw: st.DrawFn) -> tuple[list[str], str | None, dict[str, object]]:
    """(argv with workspace-relative paths, the TOML text of --config or None, the intent:
    what the drawn command line asks for, by flag name, read from the draws themselves rather
    than by mpinn's parser, so that a parser that misreads a line fails the success checks).
    A path on the command line is the workspace's (``ArgvPath``); one in the config file is
    relative to the directory the command runs in, as the user typed it."""
    name = draw(st.sampled_from(COMMANDS))
    parser = _subparser(name)
    argv: list[str] = []
    intent: dict[str, object] = {"command": name}
    for action in parser._actions:
        if action.option_strings or action.dest == "help":
            continue
        if action.choices:
            argv.append(draw(st.sampled_from(list(action.choices))))
        elif action.nargs == "+":
            argv += draw(st.lists(st.sampled_from(PATHS), min_size=1, max_size=2))
        else:
            argv.append(draw(st.sampled_from(PATHS[:4])))
        intent[action.dest] = ArgvPath(argv[-1]) if argv[-1] in PATHS else argv[-1]
    flags: list[tuple[str, str | None, argparse.Action]] = []
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "quiet", "progress"):
            continue
        required = action.dest in REQUIRED.get(name, ())
        if not draw(st.integers(0, 9)) < (9 if required else 3):  # 90% if required, else 30%
            continue
        flag = action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            flags.append((flag, None, action))
        else:
            flags.append((flag, draw(_value(action.dest, action)), action))
    if name == "train":  # a run that succeeds must end in seconds
        flags = [f for f in flags if f[0] != "--epochs"] + [("--epochs", draw(st.sampled_from(
            ["0", "1", "2", "-1", "1.5"])), None)]
        flags = [f for f in flags if f[0] != "--batch-size"] + [("--batch-size", draw(
            st.sampled_from(["16", "64", "0", "-5", "10000", "x"])), None)]
    config = None
    if flags and draw(st.booleans()):
        moved = draw(st.lists(st.sampled_from(flags), min_size=1, max_size=3, unique=True))
        lines = [f"[{name}]"]
        for flag, value, _ in moved:
            key = flag.lstrip("-")
            lines.append(f"{key} = " + ("true" if value is None else _toml_value(draw, value)))
            flags.remove((flag, value, _))
        config = "\n".join(lines) + "\n"
        for key, value in tomllib.loads(config)[name].items():
            intent[key.replace("-", "_")] = _toml_text(value)
    for flag, value, _ in flags:
        argv += [flag] if value is None else [flag, value]
        if value in PATHS:
            value = ArgvPath(value)
        intent[flag.lstrip("-").replace("-", "_")] = True if value is None else value
    return [name, *argv], config, intent


class Workspace:
    """A directory with the model M.h5, the data D.h5 (the digits test set), an existing
    file keep.h5 and a directory; paths in argv are resolved against it."""

    def __init__(self, root: Path, base: Path) -> None:
        if root.exists():
            shutil.rmtree(root)
        shutil.copytree(base, root)
        self.root = root

    def resolve(self, argv: list[str]) -> list[str]:
        return [str(self.root / a) if a in PATHS or a == "run.toml" else a for a in argv]

    def snapshot(self) -> dict[str, str]:
        files = [p for p in self.root.rglob("*") if p.is_file()] + [Path(DIGITS_TEST)]
        return {str(p.relative_to(self.root) if p.is_relative_to(self.root) else p): digest(p)
                for p in files}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("careless-base")
    subprocess.run([*command(1, "init", str(root / "M.h5"), "--sizes", "64,32,10", "--seed",
                             "1")][4:], check=True, env=ENV, cwd=ROOT, capture_output=True)
    shutil.copy(DIGITS_TEST, root / "D.h5")
    shutil.copy(DIGITS_TEST, root / "keep.h5")
    (root / "dir").mkdir()
    return root


def run(nranks: int, argv: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    cmd = command(nranks, *argv)
    if nranks == 1:
        cmd = cmd[4:]  # python -m mpinn alone: a singleton MPI process, as users run it too
    started = time.monotonic()
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT,
                                timeout=120, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail(f"hung for 120 s: {' '.join(argv)}")
    return result, time.monotonic() - started


WRITES = {"init": ("model",), "train": ("model", "log_json"), "partition": ("model",),
          "predict": ("out",), "data": ("out",), "import-torch": ("model",),
          "export-torch": ("out",), "import-graphchallenge": ("model", "data")}


def check_success(ws: Workspace, intent: dict[str, object],
                  result: subprocess.CompletedProcess, changed: set[str]) -> None:
    """A command that exits 0 did what the command line asked (``intent``), and changed only
    what it writes."""
    name = intent["command"]

    def path(key: str) -> str | None:
        value = intent.get(key)
        if isinstance(value, ArgvPath):
            return str(ws.root / value)
        return None if value is None else str(Path(ROOT) / str(value))

    paths = [path(key) for key in WRITES.get(name, ())]
    if name == "plot":  # the picture of SOURCE goes beside it as SOURCE.png unless --out
        paths.append(path("out") or os.path.splitext(path("source"))[0] + ".png")
    written = {str(Path(p).relative_to(ws.root)) for p in paths
               if p and Path(p).is_relative_to(ws.root)}
    assert changed <= written, f"changed {changed - written}, which it does not write"
    if name == "init":
        with h5py.File(path("model"), "r") as f:
            sizes = [int(n) for n in str(intent["sizes"]).split(",")]
            assert list(schema.read_spec(f).sizes) == sizes
    elif name == "predict":
        with h5py.File(path("out"), "r") as f, h5py.File(path("data"), "r") as d:
            outputs, x = f["outputs"][...], d["X"][...]
        _, acts = Reference.from_file(path("model")).forward(x)
        assert_close(outputs, acts[-1], "float32", "predict")
    elif name == "evaluate":
        with h5py.File(path("data"), "r") as d:
            x, y = d["X"][...], d["y"][...]
        loss = Reference.from_file(path("model")).loss_and_grads(x.astype(np.float64), y)[0]
        printed = float(result.stdout.split("loss ")[1].split()[0])
        assert abs(printed - loss) <= 1e-5 * max(1.0, abs(loss)), (printed, loss)
    elif name == "data":  # the defaults --help states: 1000 samples of 64 features
        with h5py.File(path("out"), "r") as f:
            assert f["X"].shape == (int(intent.get("samples", 1000)),
                                    int(intent.get("features", 64)))
    elif name in ("train", "partition"):
        with h5py.File(path("model"), "r") as f:
            schema.read_spec(f)
    elif name == "plot":
        assert Path(paths[-1]).read_bytes()[:4] == b"\x89PNG"


def check(ws: Workspace, nranks: int, argv: list[str], config: str | None,
          intent: dict[str, object]) -> tuple[str, float]:
    if config is not None:
        (ws.root / "run.toml").write_text(config)
        argv = ["--config", "run.toml", *argv]
    argv = ws.resolve(argv)
    before = ws.snapshot()
    result, seconds = run(nranks, argv)
    after = ws.snapshot()
    shown = " ".join(argv).replace(str(ws.root) + "/", "") + (f"  [config: {config!r}]" if config
                                                              else "")
    output = result.stdout + result.stderr
    assert "Traceback" not in output, f"{shown}\n{output}"
    errors = [line for line in result.stderr.splitlines() if line.startswith("mpinn: error:")]
    leftovers = [p.name for p in ws.root.rglob("*") if p.name.endswith((".partial", ".lock"))]
    assert not leftovers, f"{shown}: left {leftovers}"
    if result.returncode == 0:
        assert not errors, f"{shown}\n{output}"
        changed = {k for k in after if before.get(k) != after[k]}
        check_success(ws, intent, result, changed)
        return "ok", seconds
    assert len(errors) == 1, f"{shown}: exit {result.returncode}, {len(errors)} error lines\n{output}"
    assert seconds < REFUSAL_SECONDS, f"{shown}: refused only after {seconds:.1f} s\n{output}"
    assert after == before, f"{shown}: a refused command changed files"
    return errors[0], seconds


@pytest.mark.timeout(60 * 60 if SEARCH else 900)  # ~3 s an example; minutes on a busy machine
@pytest.mark.parametrize("nranks", [1, 3])
def test_careless_command_lines_succeed_correctly_or_fail_cleanly(base, tmp_path, nranks):
    outcomes: list[str] = []

    @settings(max_examples=EXAMPLES[nranks], deadline=None, derandomize=not SEARCH,
              suppress_health_check=list(HealthCheck), database=None)
    @given(invocations())
    def one(case: tuple[list[str], str | None, dict[str, object]]) -> None:
        argv, config, intent = case
        ws = Workspace(tmp_path / "ws", base)
        outcome, seconds = check(ws, nranks, argv, config, intent)
        outcomes.append(outcome)
        if os.environ.get("MPINN_PROPERTY_LOG"):
            with open(os.environ["MPINN_PROPERTY_LOG"], "a") as fh:
                fh.write(json.dumps({"ranks": nranks, "argv": argv, "config": config,
                                     "outcome": outcome, "seconds": round(seconds, 2)}) + "\n")

    one()
    # command lines that must succeed, through the same checks: a CLI that refused
    # everything (or a check that only looks at refusals) would pass the examples alone
    for argv in (["init", "new.h5", "--sizes", "8,4,2"], ["evaluate", "M.h5", "--data", "D.h5"],
                 ["predict", "M.h5", "--data", "D.h5", "--out", "new2.h5"]):
        intent = {"command": argv[0], "model": ArgvPath(argv[1])}
        intent |= {flag[2:]: ArgvPath(v) if v in PATHS else v
                   for flag, v in zip(argv[2::2], argv[3::2], strict=True)}
        outcome, _ = check(Workspace(tmp_path / "ws", base), nranks, argv, None, intent)
        assert outcome == "ok", f"{' '.join(argv)} was refused: {outcome}"
    print(f"\n{len(outcomes)} examples at {nranks} rank(s): "
          f"{sum(o == 'ok' for o in outcomes)} succeeded, "
          f"{sum(o != 'ok' for o in outcomes)} refused", file=sys.stderr)
