"""Nothing a user types loses their model: outputs never overwrite inputs or existing files
unless told, one job writes a model at a time, every flag is checked before any work, and
every mistake is one ``mpinn: error:`` line with nothing changed (issue 11's cases)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from mpinn import format as fmt
from mpinn import sparse_dnn
from tests.reference import Reference, assert_close
from tests.test_cli import DIGITS_TEST, DIGITS_TRAIN, ENV, ROOT, command, digest, mpinn, ok

REFUSAL_SECONDS = 20  # generous for 2 busy cores; a refusal takes 1-3 s here


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """The issue's model: ``init M --sizes 64,32,10 --seed 1``."""
    path = tmp_path / "M.h5"
    ok(mpinn(1, "init", str(path), "--sizes", "64,32,10", "--seed", "1"))
    return path


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


def test_a_second_training_of_a_model_is_refused_and_the_first_completes_untouched(model, tmp_path):
    twin = tmp_path / "twin.h5"
    twin.write_bytes(model.read_bytes())
    train = ["--data", DIGITS_TRAIN, "--epochs", "12", "--batch-size", "16", "--seed", "5"]
    first = subprocess.Popen(command(3, "train", str(model), *train), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    lock = Path(f"{model}.lock")
    deadline = time.monotonic() + 60
    while not lock.exists():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.05)
    holder = json.loads(lock.read_text())
    started = time.monotonic()
    second = mpinn(1, "train", str(model), "--data", DIGITS_TRAIN, "--optimizer", "adam",
                   "--epochs", "5")
    refused(second, f"is being trained by pid {holder['pid']} on {socket.gethostname()}")
    assert f"remove {lock} if that job is gone" in second.stderr
    assert time.monotonic() - started < REFUSAL_SECONDS
    # a reader may run beside the training: it sees the last committed checkpoint
    ok(mpinn(1, "evaluate", str(model), "--data", DIGITS_TEST))
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, out + err
    assert first.poll() is not None and not lock.exists()
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
    refused(mpinn(1, "partition", str(model), "--ranks", "3", "--name", "p"),
            "a partition named 'p' is stored already; pass --force")
    ok(mpinn(1, "partition", str(model), "--ranks", "3", "--name", "p", "--force"))
    with h5py.File(model, "r") as f:
        assert fmt.read_partition(f, "p")[1] == 3


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
