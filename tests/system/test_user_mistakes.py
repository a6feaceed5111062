"""Nothing a user types loses their model: outputs never overwrite inputs or existing files
unless told, one job writes a model at a time, every flag is checked before any work, and
every mistake is one ``mpinn: error:`` line with nothing changed (issue 11's cases)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from pathlib import Path

import h5py
import numpy as np
import pytest

from mpinn.io import schema
from mpinn.tools import sparse_dnn
from tests.helpers import small_tmpfs
from tests.reference import Reference, assert_close
from tests.system.test_cli import (
    DIGITS_TEST,
    DIGITS_TRAIN,
    ENV,
    ROOT,
    command,
    digest,
    initialised,
    mpinn,
    ok,
)

REFUSAL_SECONDS = 30  # a refusal takes 1-3 s here; the bound allows for a loaded CI machine


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """The issue's model: ``init M --sizes 64,32,10 --seed 1``."""
    return initialised(tmp_path / "M.h5", "--sizes", "64,32,10", "--seed", "1")


def snapshot(*roots: Path) -> dict[str, str]:
    """Digest of every file under ``roots`` (and the digits data), to prove nothing changed."""
    files = [Path(DIGITS_TRAIN), Path(DIGITS_TEST)]
    for root in roots:
        files += [p for p in root.rglob("*") if p.is_file()] if root.is_dir() else [root]
    return {str(p): digest(p) for p in files if p.exists()}


def refused(result: subprocess.CompletedProcess, message: str) -> None:
    """Exit 1, exactly one ``mpinn: error:`` line holding ``message``, and no traceback."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("mpinn: error:")]
    assert result.returncode == 1, result.stdout + result.stderr
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def assert_no_leftovers(directory: Path) -> None:
    left = [p.name for p in directory.iterdir() if p.name.endswith((".partial", ".lock"))]
    assert not left, f"left behind: {left}"


# ---------------------------------------------------------------- data loss (cases 1-4)


@pytest.mark.parametrize("target", ["model", "data", "existing"])
def test_predict_never_writes_over_its_model_its_data_or_an_existing_file(model, tmp_path, target):
    data = tmp_path / "test.h5"
    data.write_bytes(Path(DIGITS_TEST).read_bytes())
    existing = tmp_path / "keep.h5"
    existing.write_bytes(b"a file the user keeps")
    out = {"model": model, "data": data, "existing": existing}[target]
    before = snapshot(tmp_path)
    started = time.monotonic()
    result = mpinn(3, "predict", str(model), "--data", str(data), "--out", str(out))
    refused(result, "exists; pass --force" if target == "existing" else "never writes over a file")
    assert time.monotonic() - started < REFUSAL_SECONDS
    assert snapshot(tmp_path) == before
    assert_no_leftovers(tmp_path)
    if target != "existing":  # --force never makes an input an output
        refused(mpinn(3, "predict", str(model), "--data", str(data), "--out", str(out), "--force"),
                "never writes over a file")
        assert snapshot(tmp_path) == before


def test_predict_with_force_replaces_an_existing_output_with_complete_predictions(model, tmp_path):
    out = tmp_path / "preds.h5"
    out.write_bytes(b"old predictions")
    ok(mpinn(3, "predict", str(model), "--data", DIGITS_TEST, "--out", str(out), "--force"))
    with h5py.File(out, "r") as f, h5py.File(DIGITS_TEST, "r") as d:
        outputs, x = f["outputs"][...], d["X"][...]
    _, acts = Reference.from_file(str(model)).forward(x)
    assert_close(outputs, acts[-1], "float32", "predict outputs")
    assert_no_leftovers(tmp_path)


def _challenge_files(tmp_path: Path, n: int = 32, n_layers: int = 2) -> list[str]:
    layers = [sparse_dnn.radixnet_layer(n, i, fan_in=8, seed=None) for i in range(1, n_layers + 1)]
    files = []
    for i, weight in enumerate(layers, start=1):
        files.append(str(tmp_path / f"l{i}.tsv"))
        sparse_dnn.write_tsv_layer(files[-1], weight)
    sparse_dnn.write_tsv_inputs(tmp_path / "in.tsv", sparse_dnn.sparse_inputs(n, 20, 0.5, seed=1))
    return files


def test_import_graphchallenge_refuses_one_path_for_model_and_data(tmp_path):
    files = _challenge_files(tmp_path)
    target = tmp_path / "X.h5"
    before = snapshot(tmp_path)
    result = mpinn(1, "import-graphchallenge", *files, "--neurons", "32", "--inputs",
                   str(tmp_path / "in.tsv"), "--model", str(target), "--data", str(target))
    refused(result, "--data")
    assert "each output needs its own path" in result.stderr
    assert snapshot(tmp_path) == before and not target.exists()
    assert_no_leftovers(tmp_path)


@pytest.mark.parametrize("broken", ["layer", "categories", "inputs"])
def test_a_failed_import_writes_neither_output(tmp_path, broken):
    files = _challenge_files(tmp_path)
    categories = tmp_path / "truth.tsv"
    categories.write_text("1\n2\n")
    if broken == "layer":
        Path(files[1]).write_text("1\t2\tnot-a-number\n")
    elif broken == "categories":
        categories.write_text("1\n999\n")  # beyond the 20 samples
    else:
        (tmp_path / "in.tsv").write_text("1\t99\t1.0\n")  # feature 99 of 32
    before = snapshot(tmp_path)
    result = mpinn(1, "import-graphchallenge", *files, "--neurons", "32", "--inputs",
                   str(tmp_path / "in.tsv"), "--categories", str(categories), "--samples", "20",
                   "--model", str(tmp_path / "m.h5"), "--data", str(tmp_path / "d.h5"))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "m.h5").exists() and not (tmp_path / "d.h5").exists()
    assert_no_leftovers(tmp_path)


@pytest.mark.timeout(630)  # its subprocesses' own limits, and then some
def test_a_second_training_of_a_model_is_refused_and_the_first_completes_untouched(model, tmp_path):
    twin = tmp_path / "twin.h5"
    twin.write_bytes(model.read_bytes())
    train = ["--data", DIGITS_TRAIN, "--epochs", "12", "--batch-size", "16", "--seed", "5"]
    # the first job holds rank 0 at its second step until told to go on (SIGCONT), so the
    # second job meets it whatever the speed of the machine
    first = subprocess.Popen(command(3, "train", str(model), *train), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=ROOT,
                             env={**ENV, "MPINN_FAULT": "hold:0:2"})
    try:
        for line in first.stdout:
            if held := re.match(r"MPINN_FAULT: rank 0 \(pid (\d+)\) holds at hold$", line):
                break
        assert held, first.communicate(timeout=60)
        lock = Path(f"{model}.lock")
        holder = json.loads(lock.read_text())
        started = time.monotonic()
        second = mpinn(1, "train", str(model), "--data", DIGITS_TRAIN, "--optimizer", "adam",
                       "--epochs", "5")
        refused(second, f"is being trained by pid {holder['pid']} on {socket.gethostname()}")
        assert f"remove {lock} if that job is gone" in second.stderr
        assert time.monotonic() - started < REFUSAL_SECONDS
        # a reader may run beside the training: it sees the last committed file
        ok(mpinn(1, "evaluate", str(model), "--data", DIGITS_TEST))
        os.kill(int(held.group(1)), signal.SIGCONT)
        out, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, out + err
    assert not lock.exists()
    ok(mpinn(3, "train", str(twin), *train))  # the first run alone, undisturbed
    a, b = Reference.from_file(str(model)), Reference.from_file(str(twin))
    for wa, wb in zip(a.weights + a.biases, b.weights + b.biases, strict=True):
        assert np.array_equal(wa, wb)


def test_every_flag_is_checked_before_any_training(model):
    before = digest(model)
    started = time.monotonic()
    result = mpinn(3, "train", str(model), "--data", DIGITS_TRAIN, "--epochs", "15", "--keep", "0")
    refused(result, "--keep must be at least 1, got 0")
    assert "epoch 1" not in result.stdout and time.monotonic() - started < REFUSAL_SECONDS
    assert digest(model) == before


# ---------------------------------------------------------------- one writer per model


def test_a_stale_lock_of_a_dead_process_is_broken_and_a_foreign_one_named(model):
    lock = Path(f"{model}.lock")
    dead = subprocess.run(["true"]).returncode == 0 and _dead_pid()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead, "start": "1",
                                "action": "trained", "since": "earlier"}))
    result = ok(mpinn(1, "train", str(model), "--data", DIGITS_TRAIN, "--epochs", "1"))
    assert "epoch 1" in result and not lock.exists()
    lock.write_text(json.dumps({"host": "node7", "pid": 4242, "start": "9", "job": "1234",
                                "action": "trained", "since": "10:31"}))
    before = digest(model)
    refused(mpinn(1, "train", str(model), "--data", DIGITS_TRAIN),
            "is being trained by pid 4242 on node7 (SLURM job 1234) since 10:31")
    refused(mpinn(2, "init", str(model), "--sizes", "64,10", "--force"), "pid 4242 on node7")
    refused(mpinn(2, "partition", str(model), "--ranks", "2"), "pid 4242 on node7")
    assert digest(model) == before and lock.exists()


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _terminal_sigint() -> None:
    """Ctrl-C as a terminal delivers it: a suite started in the background by a
    non-interactive shell hands its children SIGINT ignored, and Python keeps it so."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_leaves_the_model_and_no_lock(model, tmp_path):
    before = digest(model)
    proc = subprocess.Popen(
        [*command(1, "train", str(model), "--data", DIGITS_TRAIN, "--epochs", "400",
                  "--batch-size", "4")][4:],  # python -m mpinn ... without mpirun: one process
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT,
        preexec_fn=_terminal_sigint)
    for line in proc.stdout:
        if line.startswith("epoch 1 "):
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    assert "mpinn: error: interrupted" in err and "Traceback" not in err
    assert digest(model) == before
    assert_no_leftovers(tmp_path)


# ---------------------------------------------------------------- one clear line (cases 5-18)


def _data(tmp: Path, name: str, x: np.ndarray, y: np.ndarray) -> str:
    path = tmp / name
    with h5py.File(path, "w") as f:
        f["X"], f["y"] = x, y
    return str(path)


def _empty_data(tmp: Path) -> str:
    return _data(tmp, "empty.h5", np.zeros((0, 64), np.float32), np.zeros(0, np.int64))


def _complex_data(tmp: Path) -> str:
    return _data(tmp, "complex.h5", np.ones((5, 64), np.complex64), np.zeros(5, np.int64))


def _model_copy(tmp: Path, model: Path, change) -> str:  # noqa: ANN001 - h5py callback
    path = tmp / "changed.h5"
    path.write_bytes(model.read_bytes())
    with h5py.File(path, "r+") as f:
        change(f)
    return str(path)


def _truncated(tmp: Path, model: Path) -> str:
    path = tmp / "half.h5"
    path.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    return str(path)


def _external_link(f: h5py.File) -> None:
    del f["layers/2"]
    f["layers/2"] = h5py.ExternalLink("elsewhere.h5", "/x")


def _text(tmp: Path, name: str, text: str) -> str:
    (tmp / name).write_text(text)
    return str(tmp / name)


def _toml(tmp: Path, text: str) -> list[str]:
    return ["--config", _text(tmp, "run.toml", text)]


# (nranks, argv builder taking (tmp, model), message); the model and every file must not change
CASES = [
    (1, lambda t, m: ["train", str(m), "--data", _empty_data(t)], "X holds no samples"),
    (3, lambda t, m: ["evaluate", str(m), "--data", _empty_data(t)], "X holds no samples"),
    (1, lambda t, m: ["predict", str(m), "--data", _empty_data(t), "--out", str(t / "p.h5")],
     "X holds no samples"),
    (1, lambda t, m: ["bench", "sparse-dnn", "--samples", "0", "--dir", str(t)],
     "--samples must be at least 1"),
    (3, lambda t, m: ["train", str(m), "--data", DIGITS_TRAIN, "--batch-size", "-5"],
     "--batch-size must be at least 1, got -5"),
    (1, lambda t, m: ["evaluate", str(m), "--data", DIGITS_TEST, "--batch-size", "-5"],
     "--batch-size must be at least 1"),
    (1, lambda t, m: [*_toml(t, "[train]\nbatch-size = -5\n"), "train", str(m), "--data",
                      DIGITS_TRAIN], "--batch-size must be at least 1"),
    (1, lambda t, m: ["init", str(t / "i.h5"), "--sizes", "1000000000,1000000000,10"],
     "free"),
    (3, lambda t, m: ["init", str(t / "i.h5"), "--sizes", "64,1000000000,10"], "free"),
    (1, lambda t, m: ["init", str(t / "i.h5"), "--sizes", "64,10", "--seed", "-1"],
     "--seed must be at least 0"),
    (1, lambda t, m: ["partition", str(m), "--ranks", "1000000000"], "1000000000 ranks for a "
     "model of 106 neurons"),
    (1, lambda t, m: ["partition", str(m), "--ranks", "1000000"], "1000000 ranks"),
    (1, lambda t, m: ["partition", str(m), "--ranks", "-2", "--compare"],
     "--ranks must be at least 1"),
    (1, lambda t, m: ["partition", str(m), "--ranks", "2", "--strategy", "ids", "--ids",
                      _text(t, "ids.json", '{"0": [[50, 500000000]], "1": [[0, 50]]}')],
     "global id 499999999 of rank 0 is out of range 0..105"),
    (1, lambda t, m: ["partition", str(m), "--ranks", "2", "--strategy", "ids", "--ids",
                      _text(t, "ids.json", "[" * 100000 + "]" * 100000)], "nests too deeply"),
    (1, lambda t, m: ["partition", str(m), "--ranks", "2", "--strategy", "ids", "--ids",
                      _text(t, "ids.json", '{"0": [[0, 106]], "1": [true]}')],
     "rank 1 has entry true"),
    (1, lambda t, m: [*_toml(t, "[train]\nepochs = 1.7\n"), "train", str(m), "--data",
                      DIGITS_TRAIN], "epochs = 1.7: --epochs takes a whole number, not float"),
    (1, lambda t, m: [*_toml(t, '[train]\ndata = ["a", "b"]\n'), "train", str(m)],
     '--data takes text, not list'),
    (1, lambda t, m: [*_toml(t, "[train]\nepochs = true\n"), "train", str(m), "--data",
                      DIGITS_TRAIN], "--epochs takes a whole number, not bool"),
    (1, lambda t, m: [*_toml(t, '[train]\nno-shuffle = "false"\n'), "train", str(m), "--data",
                      DIGITS_TRAIN], "--no-shuffle takes true or false, not str"),
    (3, lambda t, m: [*_toml(t, "[train\n"), "train", str(m), "--data", DIGITS_TRAIN],
     "is not valid TOML"),
    (3, lambda t, m: [*_toml(t, "[train]\nepoch = 3\n"), "train", str(m), "--data", DIGITS_TRAIN],
     "unknown setting(s) for 'train': epoch"),
    (1, lambda t, m: ["import-graphchallenge", _text(t, "l1.tsv", "1\t1\t0.5\n"), "--neurons", "32",
                      "--inputs", _text(t, "in.tsv", "1000000000000\t1\t1.0\n"), "--model",
                      str(t / "x.h5"), "--data", str(t / "y.h5")], "sample index 1,000,000,000,000"),
    (1, lambda t, m: ["evaluate", _truncated(t, m), "--data", DIGITS_TEST], "truncated or damaged"),
    (3, lambda t, m: ["evaluate", str(t), "--data", DIGITS_TEST], "is a directory"),
    (1, lambda t, m: ["partition", str(m), "--ranks", "2", "--name", "."], "--name '.'"),
    (1, lambda t, m: ["evaluate", _model_copy(t, m, _external_link), "--data", DIGITS_TEST],
     "cannot be opened (Unable to open object (unable to open external file"),
    (1, lambda t, m: ["train", str(m), "--data", _complex_data(t)], "X must be a 2-D array of "
     "real numbers, got complex64"),
    (1, lambda t, m: ["inspect", _model_copy(t, m, lambda f: f.attrs.__setitem__(
        "mpinn_format_version", 1.5))], "format version 1.5 is not supported"),
    (1, lambda t, m: ["bench", "sparse-dnn", "--layers", "0", "--dir", str(t)],
     "--layers must be at least 1"),
    (1, lambda t, m: ["bench", "sparse-dnn", "--neurons", "100", "--layers", "2", "--samples",
                      "10", "--dir", str(t)], "100 neurons"),
    (1, lambda t, m: ["bench", "sparse-dnn", "--neurons", "1000000000", "--dir", str(t)],
     "bench sparse-dnn's network of 1000000000 neurons x 120 layers"),
    (1, lambda t, m: ["train", str(m), "--data", DIGITS_TRAIN, "--lr", "nan"],
     "--lr must be a positive number, got nan"),
    (1, lambda t, m: ["train", str(m), "--data", DIGITS_TRAIN, "--micro-batches", "9",
                      "--batch-size", "4"], "--micro-batches 9 exceeds --batch-size 4"),
    (1, lambda t, m: ["train", str(m), "--data", DIGITS_TRAIN, "--counts", "1,2"],
     "--counts applies to --strategy count"),
    (1, lambda t, m: ["data", "classification", str(t / "d.h5"), "--samples", "1000000000000"],
     "a data set of 1,000,000,000,000 samples x 64 features needs"),
]


@pytest.mark.parametrize("nranks, argv, message", CASES,
                         ids=[f"{n}-{m[:32]}" for n, _, m in CASES])
def test_a_mistake_is_one_clear_line_and_changes_nothing(model, tmp_path, nranks, argv, message):
    args = argv(tmp_path, model)
    before = snapshot(tmp_path)
    started = time.monotonic()
    result = mpinn(nranks, *args, timeout=60)
    refused(result, message)
    assert time.monotonic() - started < REFUSAL_SECONDS
    assert snapshot(tmp_path) == before
    assert_no_leftovers(tmp_path)


def test_a_stored_partition_is_replaced_only_with_force(model):
    ok(mpinn(1, "partition", str(model), "--ranks", "2", "--name", "p"))
    before = model.read_bytes()
    refused(mpinn(1, "partition", str(model), "--ranks", "3", "--name", "p"),
            "a partition named 'p' is stored already; pass --force")
    assert model.read_bytes() == before  # the refusal changed no byte, the 2-rank one stays
    with h5py.File(model, "r") as f:
        assert schema.read_partition(f, "p")[1] == 2
    ok(mpinn(1, "partition", str(model), "--ranks", "3", "--name", "p", "--force"))
    with h5py.File(model, "r") as f:
        assert schema.read_partition(f, "p")[1] == 3


@pytest.mark.parametrize("text", ["[train\n", "[train]\nbogus = 1\n"])
def test_a_config_error_under_mpirun_prints_its_line_even_when_rank_0_is_slow(model, tmp_path,
                                                                              text):
    """The other ranks must not exit (and have mpirun end the job) before rank 0 has printed:
    rank 0 is made to start 2 s late, as on a loaded node."""
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(
        "import os, time\nif os.environ.get('OMPI_COMM_WORLD_RANK') == '0':\n    time.sleep(2)\n")
    config = _text(tmp_path, "bad.toml", text)
    env = {**ENV, "PYTHONPATH": f"{slow}:{ENV['PYTHONPATH']}"}
    result = subprocess.run(command(3, "--config", config, "train", str(model), "--data",
                                    DIGITS_TRAIN), capture_output=True, text=True, env=env,
                            cwd=ROOT, timeout=60)
    refused(result, "bad.toml")


# ---- issue 25: file safety and messages


def _train(model: Path, *args: str, nranks: int = 1) -> subprocess.CompletedProcess:
    """One short training of the issue's model: 1 epoch of the digits, 2 ranks at most."""
    return mpinn(nranks, "train", str(model), "--data", DIGITS_TRAIN, "--epochs", "1", *args)


def _state(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return schema.read_state_attrs(f)


def _api(script: str) -> subprocess.CompletedProcess:
    """``script`` in one process (the API without mpirun), after ``import mpinn``."""
    return subprocess.run([sys.executable, "-c", "import mpinn\n" + script], capture_output=True,
                          text=True, env=ENV, cwd=ROOT, timeout=120)


def test_keep_best_replaces_only_a_best_file_of_its_own_model_unless_force(model, tmp_path):
    """Item 4: an unrelated MODEL.best.h5 (another model's) is refused before any epoch; one
    written by this model's --keep-best is replaced; --force replaces any."""
    best = tmp_path / "M.best.h5"
    other = tmp_path / "other.h5"
    ok(mpinn(1, "init", str(other), "--sizes", "64,32,10", "--seed", "2"))
    best.write_bytes(other.read_bytes())
    watch = ["--val-data", DIGITS_TEST, "--keep-best"]
    before = snapshot(tmp_path)
    result = _train(model, *watch, nranks=2)
    refused(result, f"{best} exists and was not written by --keep-best training of {model}")
    assert "epoch 1" not in result.stdout and snapshot(tmp_path) == before
    assert_no_leftovers(tmp_path)
    ok(_train(model, *watch, "--force"))
    assert _state(best)["best_of"] == "M.h5" and _state(best)["epoch"] == 1
    ok(_train(model, *watch))  # its own best file: replaced at the next new best, no --force
    assert _state(best)["epoch"] == 2
    # the API: fit(keep_best=True) refuses it too, and force=True replaces it
    best.write_bytes(other.read_bytes())
    fit = (f"net = mpinn.Network.open({str(model)!r})\n"
           f"net.fit({DIGITS_TRAIN!r}, validation_data={DIGITS_TEST!r}, keep_best=True, {{}})\n")
    result = _api(fit.format(""))
    # an MpinnError the script does not catch: one line (errors.install_excepthook)
    assert result.returncode != 0 and result.stderr.startswith("mpinn: error: ")
    assert "was not written by --keep-best training" in result.stderr
    assert "Traceback" not in result.stderr
    assert best.read_bytes() == other.read_bytes()
    ok(_api(fit.format("force=True")))
    assert _state(best)["best_of"] == "M.h5"


def test_a_read_only_model_is_refused_by_train_and_partition_and_a_replaced_one_keeps_its_mode(
        model, tmp_path):
    """Item 5: mode 0444 is the user's "do not write": refused by train and partition alike
    (as root, whom the kernel would let write it), naming the file and its mode; a model
    that train replaces keeps its mode bits (0600 stays private)."""
    model.chmod(0o444)
    before = snapshot(tmp_path)
    result = _train(model, nranks=2)
    refused(result, f"MODEL {model} is read-only (mode 0444) and train would replace it")
    assert "epoch 1" not in result.stdout
    refused(mpinn(2, "partition", str(model), "--ranks", "2"),
            f"MODEL {model} is read-only (mode 0444) and partition would write into it")
    assert snapshot(tmp_path) == before and model.stat().st_mode & 0o777 == 0o444
    assert_no_leftovers(tmp_path)
    model.chmod(0o600)
    ok(_train(model, "--keep", "2"))
    assert model.stat().st_mode & 0o777 == 0o600 and _state(model)["epoch"] == 1


def test_a_model_another_user_may_not_write_is_refused_before_any_work(model, tmp_path):
    """Item 5 as a non-root user (``nobody``), for whom os.access, not the mode, refuses: a
    0644 model owned by root in a directory nobody may write (pytest's own is private)."""
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    if subprocess.run([*as_nobody, "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot run as nobody here")
    shared = Path(tempfile.mkdtemp(prefix="mpinn-nobody-"))
    try:
        shared.chmod(0o777)  # nobody may create M.h5.lock here
        theirs = shared / "M.h5"
        theirs.write_bytes(model.read_bytes())
        before = snapshot(shared)
        argv = command(1, "train", str(theirs), "--data", DIGITS_TRAIN)[4:]  # one process
        result = subprocess.run([*as_nobody, *argv], capture_output=True, text=True,
                                env={**ENV, "HOME": str(shared)}, cwd=shared, timeout=120)
        refused(result, f"MODEL {theirs} is read-only (mode 0644) and train would replace it")
        assert snapshot(shared) == before
        assert_no_leftovers(shared)
    finally:
        shutil.rmtree(shared)


@pytest.fixture
def full_disk(tmp_path: Path) -> Path:
    """A small tmpfs (as tests/system/test_nothing_lost.py mounts one) holding the issue's model and
    then filled: a new file can be created there, but not written."""
    with small_tmpfs(tmp_path / "disk", "400k") as mount:
        ok(mpinn(1, "init", str(mount / "M.h5"), "--sizes", "64,32,10", "--seed", "1"))
        fd = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT)
        with suppress(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
        os.close(fd)
        yield mount


def test_a_lock_that_cannot_be_written_is_removed_and_the_run_refused(full_disk):
    """Item 6: a full disk while taking the lock: one line naming the disk error, and no
    empty M.h5.lock left to block every later run."""
    model = full_disk / "M.h5"
    before = digest(model)
    refused(_train(model, nranks=2), f"{model}: cannot write the lock file {model}.lock (No "
            "space left on device)")
    assert digest(model) == before
    assert_no_leftovers(full_disk)


def test_an_empty_lock_is_waited_for_while_fresh_and_broken_once_old(model):
    """Item 6: an empty lock may be one being written now: refused; one older than
    lock.EMPTY_STALE was left by a job that died before writing it: broken, with one note
    (item 16: once, not once per rank)."""
    lock = Path(f"{model}.lock")
    lock.write_text("")
    refused(_train(model), "names no holder yet")
    old = time.time() - 3600
    os.utime(lock, (old, old))
    result = _train(model, nranks=2)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("mpinn: note:") == 1, result.stderr
    assert re.search(r"removed an empty lock file left 36\d\d s ago by a job that died",
                     result.stderr), result.stderr
    assert not lock.exists() and _state(model)["epoch"] == 1


def test_a_lock_of_a_dead_pid_without_a_start_time_is_stale(model):
    """Item 16: a lock naming a dead pid on this host and no start time (older mpinn, or
    written by hand) is broken like any other of a process that is gone."""
    lock = Path(f"{model}.lock")
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(),
                                "action": "trained", "since": "earlier"}))
    result = _train(model)
    assert result.returncode == 0 and "removed a stale lock of pid" in result.stderr, result.stderr
    assert not lock.exists() and _state(model)["epoch"] == 1


def test_a_log_json_that_cannot_be_appended_costs_one_warning_and_no_epoch(model):
    """Item 6: --log-json on a full disk (/dev/full) warns once; training, its checkpoints
    and its exit status are those of a run without the log."""
    result = mpinn(2, "train", str(model), "--data", DIGITS_TRAIN, "--epochs", "2",
                   "--log-json", "/dev/full")
    assert result.returncode == 0, result.stdout + result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("mpinn: warning:")]
    assert len(warnings) == 1 and "--log-json /dev/full: cannot append epoch 1 (No space left on "\
        "device)" in warnings[0], result.stderr
    assert "Traceback" not in result.stderr and "epoch 2" in result.stdout
    assert _state(model)["epoch"] == 2


@pytest.mark.parametrize("in_the_way", ["file", "directory inside"])
def test_a_checkpoints_path_in_the_way_of_keep_is_refused_before_training(model, tmp_path,
                                                                          in_the_way):
    """Item 7: MODEL.checkpoints as a regular file, or holding a directory that pruning
    would have to remove, is refused before any epoch instead of failing at the commit."""
    history = Path(f"{model}.checkpoints")
    if in_the_way == "file":
        history.write_text("the user's notes")
        message = f"--keep 2: {history} is a file, not the directory of older checkpoints"
    else:
        (history / "mine").mkdir(parents=True)
        message = f"--keep 2: {history / 'mine'} is a directory"
    before = snapshot(tmp_path)
    result = _train(model, "--keep", "2", nranks=2)
    refused(result, message)
    assert "epoch 1" not in result.stdout and snapshot(tmp_path) == before
    assert_no_leftovers(tmp_path)


def test_a_checkpoints_path_in_the_way_never_loses_the_commit_of_fit(model):
    """Item 7, the API (no check before fit): keeping the previous checkpoint fails, the new
    one is committed all the same, with one warning."""
    Path(f"{model}.checkpoints").write_text("the user's notes")
    result = _api(f"net = mpinn.Network.open({str(model)!r})\n"
                  f"net.fit({DIGITS_TRAIN!r}, keep=2)\nnet.close()\n")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("mpinn: warning:") == 1, result.stderr
    assert "the previous checkpoint was not kept" in result.stderr
    assert _state(model)["epoch"] == 1


def test_ctrl_c_of_one_rank_is_one_line_and_leaves_no_lock(model, tmp_path):
    """Item 16: SIGINT to rank 1 alone (held at step 3 while rank 0 waits for it in the next
    collective): every rank stops at that step, rank 0 prints one line naming the rank,
    releases the lock and every rank exits with status 130; the model is unchanged."""
    before = digest(model)
    proc = subprocess.Popen(command(2, "train", str(model), "--data", DIGITS_TRAIN, "--epochs",
                                    "5"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**ENV, "MPINN_FAULT": "hold:1:3"}, cwd=ROOT,
                            preexec_fn=_terminal_sigint)
    try:
        for line in proc.stdout:
            if held := re.match(r"MPINN_FAULT: rank 1 \(pid (\d+)\) holds at hold$", line):
                break
        assert held, proc.communicate(timeout=60)
        os.kill(int(held.group(1)), signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    errors = [line for line in err.splitlines() if line.startswith("mpinn: error:")]
    assert proc.returncode == 130, out + err
    # every rank stops at that step (train.StepGuard), naming the rank
    assert len(errors) == 1 and "interrupted (SIGINT on rank 1) at epoch 1, step 3" in errors[0], err
    assert "Traceback" not in err and digest(model) == before
    assert_no_leftovers(tmp_path)


def _preempted(f: h5py.File) -> None:
    """The state a preemption at epoch 2, batch 14 commits (``--resume`` continues there)."""
    state = f.require_group("state")
    state.attrs["epoch"], state.attrs["batch"] = "1", "14"


# item 16's small messages: (nranks, argv builder, message); nothing may change, and no
# warning line may come before the error
CASES_25 = [
    (1, lambda t, m: ["inspect", _model_copy(t, m, lambda f: f.attrs.__setitem__(
        "mpinn_format_version", "1"))], "format version '1' is stored as text, not a number "
     "(this mpinn reads version 1, an integer)"),
    (2, lambda t, m: ["train", str(m), "--data", DIGITS_TRAIN, "--lr", "1e30"],
     "the loss is nan (diverged or bad data)"),
    (1, lambda t, m: ["plot", "partition", str(m), "--out", str(t / "p.png")],
     "plot partition needs --partition NAME (a stored partition) or --ranks N"),
]


@pytest.mark.parametrize("nranks, argv, message", CASES_25,
                         ids=[f"{n}-{m[:32]}" for n, _, m in CASES_25])
def test_a_small_mistake_is_one_clear_line_without_warnings(model, tmp_path, nranks, argv,
                                                            message):
    args = argv(tmp_path, model)
    before = snapshot(tmp_path)
    result = mpinn(nranks, *args, timeout=60)
    refused(result, message)
    assert "Warning" not in result.stderr, result.stderr
    assert snapshot(tmp_path) == before
    assert_no_leftovers(tmp_path)


def test_evaluate_names_its_files_and_inspect_the_stored_batch(model, tmp_path):
    """Item 16: evaluate's line names the model and the data; inspect shows where a
    preempted run stopped inside its epoch."""
    out = ok(mpinn(2, "evaluate", str(model), "--data", DIGITS_TEST))
    assert f"samples 360  model {model}  data {DIGITS_TEST}" in out, out
    out = ok(mpinn(1, "inspect", _model_copy(tmp_path, model, _preempted)))
    assert "training state: epoch 1, batch 14 of epoch 2 done (continue with train --resume), "\
        "step 0" in out, out


def test_train_with_mincut_says_its_partition_is_not_stored(model):
    """Item 16: every later command computes mincut again; train says how to keep it."""
    result = _train(model, "--strategy", "mincut", nranks=2)
    assert result.returncode == 0, result.stderr
    assert f"mpinn: note: this mincut partition is not stored in {model}; store it with mpinn "\
        f"partition {model} --ranks 2 --strategy mincut --name NAME" in result.stderr


def test_a_log_of_two_runs_marks_each_start_and_is_drawn_as_two_runs(model, tmp_path):
    """Item 16: the first record of every run carries run_start, and plot curves draws runs
    apart: by that mark, or in older logs where the epoch does not grow."""
    from mpinn.tools.plot import split_runs

    log = tmp_path / "log.jsonl"
    for _ in range(2):
        ok(_train(model, "--epochs", "2", "--log-json", str(log), "--quiet"))
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["epoch"], r.get("run_start", False)) for r in records] == [
        (1, True), (2, False), (3, True), (4, False)]
    assert [[r["epoch"] for r in run] for run in split_runs(records)] == [[1, 2], [3, 4]]
    old = [{"epoch": e} for e in (1, 2, 3, 1, 2)]  # a model made anew, logged before the mark
    assert [[r["epoch"] for r in run] for run in split_runs(old)] == [[1, 2, 3], [1, 2]]
    ok(mpinn(1, "plot", "curves", str(log), "--out", str(tmp_path / "c.png")))
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
