"""The CLI end to end on real files, under real mpirun; errors are clear and change nothing."""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from mpinn.io import datafile
from tests.reference import Reference, assert_close

ROOT = Path(__file__).resolve().parents[2]
DIGITS_TRAIN, DIGITS_TEST = str(ROOT / "data/digits_train.h5"), str(ROOT / "data/digits_test.h5")
ENV = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
       "OMPI_MCA_mpi_yield_when_idle": "1", "PYTHONPATH": str(ROOT)}


def command(nranks: int, *args: str) -> list[str]:
    return ["mpirun", "--oversubscribe", "-n", str(nranks), sys.executable, "-m", "mpinn", *args]


def mpinn(nranks: int, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``python -m mpinn ARGS`` under ``mpirun -n nranks``, bounded in time."""
    return subprocess.run(command(nranks, *args), capture_output=True, text=True, timeout=timeout,
                          env=ENV, cwd=ROOT)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


_INITIALISED: dict[tuple[str, ...], Path] = {}


def initialised(path: Path, *args: str) -> Path:
    """``mpinn init PATH ARGS`` for a fixture: a copy of the file one real ``init`` of these
    arguments (seeded, so the same weights) made earlier in this test process. The fixtures
    of a hundred tests would otherwise start a hundred init processes."""
    if args not in _INITIALISED:
        made = Path(tempfile.mkdtemp(prefix="mpinn-init-")) / "model.h5"
        atexit.register(shutil.rmtree, made.parent, True)
        ok(mpinn(1, "init", str(made), *args))
        _INITIALISED[args] = made
    shutil.copyfile(_INITIALISED[args], path)
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def small_model(tmp_path: Path) -> Path:
    return initialised(tmp_path / "model.h5", "--sizes", "64,32,10", "--seed", "1")


def test_digits_train_evaluate_predict_reaches_95_percent(tmp_path):
    model, preds = tmp_path / "model.h5", tmp_path / "preds.h5"
    ok(mpinn(1, "init", str(model), "--sizes", "64,256,256,10", "--activation", "relu",
             "--output", "softmax", "--seed", "1"))
    out = ok(mpinn(4, "train", str(model), "--data", DIGITS_TRAIN, "--epochs", "20",
                   "--batch-size", "64", "--lr", "0.1"))
    assert out.count("epoch ") == 20 and "samples/s" in out
    # README's tour: 99% on the training set, 96.7% on the test set (measured: the test
    # allows for other BLAS kernels' rounding on other machines)
    assert float(re.search(r"epoch 20 .*accuracy (\S+)", out).group(1)) >= 0.99, out
    out = ok(mpinn(3, "evaluate", str(model), "--data", DIGITS_TEST))
    accuracy = float(re.search(r"accuracy (\S+)", out).group(1))
    assert accuracy >= 0.95, out
    ok(mpinn(2, "predict", str(model), "--data", DIGITS_TEST, "--out", str(preds)))
    with h5py.File(preds, "r") as f, h5py.File(DIGITS_TEST, "r") as d:
        outputs, x, y = f["outputs"][...], d["X"][...], d["y"][...]
    assert outputs.shape == (360, 10)
    assert np.mean(outputs.argmax(1) == y) == pytest.approx(accuracy, abs=1e-4)
    _, acts = Reference.from_file(str(model)).forward(x)
    assert_close(outputs, acts[-1], "float32", "predict outputs")


def test_init_under_mpirun_writes_the_same_model_as_one_process(tmp_path):
    one, three = tmp_path / "one.h5", tmp_path / "three.h5"
    ok(mpinn(1, "init", str(one), "--sizes", "5,2100,3", "--seed", "9"))
    ok(mpinn(3, "init", str(three), "--sizes", "5,2100,3", "--seed", "9"))
    a, b = Reference.from_file(str(one)), Reference.from_file(str(three))
    for wa, wb in zip(a.weights + a.biases, b.weights + b.biases, strict=True):
        assert np.array_equal(wa, wb)


def test_stored_partition_is_used_and_shown_by_inspect(small_model):
    out = ok(mpinn(1, "partition", str(small_model), "--ranks", "3", "--strategy", "count",
                   "--counts", "40,40,26", "--name", "uneven"))
    assert "stored partition 'uneven'" in out
    out = ok(mpinn(1, "inspect", str(small_model)))
    assert "partition 'uneven': strategy count, 3 ranks" in out
    assert re.search(r"^\s+2\s+26\s", out, re.M), out
    out = ok(mpinn(3, "train", str(small_model), "--data", DIGITS_TRAIN, "--partition", "uneven",
                   "--epochs", "1"))
    assert "partition 'uneven' (count)" in out


def test_training_in_two_runs_equals_one_run_bitwise(tmp_path):
    once, twice = tmp_path / "once.h5", tmp_path / "twice.h5"
    for path in (once, twice):
        ok(mpinn(1, "init", str(path), "--sizes", "64,32,10", "--seed", "4"))
    common = ["--data", DIGITS_TRAIN, "--batch-size", "50", "--optimizer", "adam", "--lr", "0.01"]
    ok(mpinn(2, "train", str(once), "--epochs", "4", *common))
    ok(mpinn(2, "train", str(twice), "--epochs", "2", *common))
    ok(mpinn(2, "train", str(twice), "--epochs", "2", *common))
    a, b = Reference.from_file(str(once)), Reference.from_file(str(twice))
    for wa, wb in zip(a.weights + a.biases, b.weights + b.biases, strict=True):
        assert np.array_equal(wa, wb)


def _bad_data(tmp_path: Path, kind: str) -> str:
    path = tmp_path / f"{kind}.h5"
    if kind == "missing":
        return str(path)
    x = np.random.default_rng(0).random((20, 64), dtype=np.float32)
    y = np.arange(20) % 10
    if kind == "features":
        x = x[:, :50]
    elif kind == "labels":
        y[3] = 12
    elif kind == "nan":
        x[5, 40] = np.nan
    datafile.write_data(str(path), x, y)
    return str(path)


@pytest.mark.parametrize("nranks", [2, 3])
@pytest.mark.parametrize("args, message", [
    (["--data", "@features"], "X has 50 features but the model has 64 inputs"),
    (["--data", "@labels"], "label 12 is out of range 0..9"),
    (["--data", "@nan"], "X has a NaN or infinite value in feature 40"),
    (["--data", "@missing"], "missing.h5: no such file"),
    (["--strategy", "percentage", "--percentages", "@30each"], "not 100"),
    (["--strategy", "count", "--counts", "@1each"], "but the model has 106 neurons"),
    (["--strategy", "layers", "--layer-ranks", "0,7,1"], "layer 1 goes to rank 7"),
    (["--partition", "nope"], "no partition named 'nope'"),
    (["--lr", "-1"], "--lr must be a positive number"),
])
def test_bad_input_fails_on_every_rank_with_one_clear_line_and_no_change(
        small_model, tmp_path, nranks, args, message):
    def expand(arg: str) -> str:
        if arg.endswith("each"):
            return ",".join([arg[1:-4]] * nranks)
        return _bad_data(tmp_path, arg[1:]) if arg.startswith("@") else arg

    args = [expand(a) for a in args]
    if "--data" not in args:
        args = ["--data", DIGITS_TRAIN, *args]
    before = digest(small_model)
    result = mpinn(nranks, "train", str(small_model), *args, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("mpinn: error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert digest(small_model) == before


@pytest.mark.parametrize("setup, message", [
    (lambda p: p.write_bytes(b"not an hdf5 file at all"), "not an HDF5 file"),
    (lambda p: _edit(p, lambda f: f.attrs.__delitem__("mpinn_format_version")), "not an mpinn model"),
    (lambda p: _edit(p, lambda f: f.attrs.__setitem__("mpinn_format_version", 7)), "format version 7"),
    (lambda p: _edit(p, lambda f: f["layers/1"].attrs.__setitem__("activation", "softmax")),
     "/layers/1: softmax is only allowed on the last layer"),
    (lambda p: _edit(p, lambda f: f["layers/2"].attrs.__setitem__("activation", "swish")),
     "unknown activation 'swish'"),
    (lambda p: _edit(p, lambda f: f.__delitem__("layers/2/bias")), "missing dataset 'bias'"),
    (lambda p: _edit(p, lambda f: f.attrs.__setitem__("sizes", [64, 33, 10])),
     "/layers/1/weight has shape (32, 64), but sizes [64, 33, 10] require (33, 64)"),
])
def test_bad_model_file_is_refused_with_a_clear_message(small_model, setup, message):
    setup(small_model)
    before = digest(small_model)
    result = mpinn(2, "evaluate", str(small_model), "--data", DIGITS_TEST, timeout=60)
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert digest(small_model) == before


def test_non_finite_weights_are_refused(small_model):
    _edit(small_model, lambda f: f["layers/2/weight"].__setitem__((9, 31), np.inf))
    result = mpinn(2, "train", str(small_model), "--data", DIGITS_TRAIN, timeout=60)
    assert result.returncode == 1 and "/layers/2/weight holds a NaN or infinite value" in result.stderr


def _edit(path: Path, change) -> None:
    with h5py.File(path, "r+") as f:
        change(f)


# runs the CLI, then prints what threadpoolctl reports for that process's BLAS pools
THREADS_REPORT = ("import sys\nfrom threadpoolctl import threadpool_info\n"
                  "from mpinn.cli.commands import main\n"
                  "code = main(sys.argv[1:])\n"
                  "threads = sorted({p['num_threads'] for p in threadpool_info()})\n"
                  "sys.stdout.write(f'BLAS threads {threads}\\n')\n"  # one write: ranks' lines stay whole
                  "sys.stdout.flush()\n"
                  "sys.exit(code)")


def blas_threads(nranks: int, *args: str) -> str:
    """Output of ``mpinn ARGS`` with each process's BLAS thread counts. Unbound to cores (one
    process runs without mpirun), so the default is every core shared among the ranks."""
    launcher = (["mpirun", "--oversubscribe", "--bind-to", "none", "-n", str(nranks)] if nranks > 1
                else [])
    return ok(subprocess.run([*launcher, sys.executable, "-c", THREADS_REPORT, *args],
                             capture_output=True, text=True, timeout=120, env=ENV, cwd=ROOT))


def test_threads_flag_sets_blas_threads_and_refuses_zero(small_model):
    evaluate = ["evaluate", str(small_model), "--data", DIGITS_TEST]
    default = blas_threads(1, *evaluate)
    assert f"BLAS threads [{len(os.sched_getaffinity(0))}]" in default, default  # every core
    out = blas_threads(1, "--threads", "1", *evaluate)
    assert "accuracy" in out and "BLAS threads [1]" in out, out
    bad = mpinn(1, "--threads", "0", *evaluate)
    assert bad.returncode == 1 and "--threads must be at least 1" in bad.stderr


def test_threads_flag_can_raise_blas_threads_above_the_default(small_model):
    """Two ranks on two cores default to one thread each; --threads 2 gives them two."""
    out = blas_threads(2, "--threads", "2", "evaluate", str(small_model), "--data", DIGITS_TEST)
    assert out.count("BLAS threads [2]") == 2, out


def test_config_file_supplies_flags_and_the_command_line_wins(small_model, tmp_path):
    config, log = tmp_path / "run.toml", tmp_path / "log.jsonl"
    config.write_text(f'quiet = true\n[train]\ndata = "{DIGITS_TRAIN}"\nepochs = 5\n'
                      f'batch-size = 100\nlog-json = "{log}"\nstrategy = "percentage"\n'
                      'percentages = [60, 40]\n')
    out = ok(mpinn(2, "--config", str(config), "train", str(small_model), "--epochs", "2"))
    assert out.strip() == "", out  # quiet: no per-epoch lines
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(r["loss"] > 0 and 0 <= r["accuracy"] <= 1 for r in records)
    config.write_text("[train]\nepoch = 5\n")
    bad = mpinn(2, "--config", str(config), "train", str(small_model), "--data", DIGITS_TRAIN)
    assert bad.returncode == 1 and "unknown setting(s) for 'train': epoch" in bad.stderr
    bad = mpinn(1, "train", str(small_model))
    assert bad.returncode == 1 and "train needs --data" in bad.stderr


def test_without_mpi_io_results_are_identical_and_the_fallback_warns_once(tmp_path):
    """Serial HDF5 (MPINN_IO=independent forces it): independent reads, one writer at a time."""
    models = {}
    for io in ("mpio", "independent"):
        env = {**ENV, "MPINN_IO": io}
        model, preds = tmp_path / f"{io}.h5", tmp_path / f"{io}-preds.h5"
        steps = [(3, "init", str(model), "--sizes", "64,48,10", "--seed", "3"),
                 (2, "train", str(model), "--data", DIGITS_TRAIN, "--epochs", "2", "--optimizer",
                  "adam", "--lr", "0.01", "--checkpoint-every", "1"),
                 (3, "predict", str(model), "--data", DIGITS_TEST, "--out", str(preds))]
        for nranks, *args in steps:
            result = subprocess.run(command(nranks, *args), capture_output=True, text=True,
                                    timeout=120, env=env, cwd=ROOT)
            assert result.returncode == 0, result.stderr
            assert result.stderr.count("h5py has no MPI support") == (io == "independent"), \
                result.stderr
        models[io] = (model, preds)
    a, b = (Reference.from_file(str(models[io][0])) for io in ("mpio", "independent"))
    for wa, wb in zip(a.weights + a.biases, b.weights + b.biases, strict=True):
        assert np.array_equal(wa, wb)
    with h5py.File(models["mpio"][1], "r") as f, h5py.File(models["independent"][1], "r") as g:
        assert np.array_equal(f["outputs"][...], g["outputs"][...])


def test_plot_draws_training_curves_and_partition_pictures(small_model, tmp_path):
    pytest.importorskip("matplotlib")
    log, curves, picture = tmp_path / "log.jsonl", tmp_path / "curves.png", tmp_path / "part.png"
    ok(mpinn(2, "train", str(small_model), "--data", DIGITS_TRAIN, "--epochs", "3",
             "--log-json", str(log), "--quiet"))
    ok(mpinn(1, "plot", "curves", str(log), "--out", str(curves)))
    ok(mpinn(1, "plot", "partition", str(small_model), "--ranks", "3", "--strategy", "count",
             "--counts", "50,30,26", "--out", str(picture)))
    for png in (curves, picture):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    bad = mpinn(1, "plot", "curves", str(small_model))
    assert bad.returncode == 1 and "not a --log-json file" in bad.stderr
