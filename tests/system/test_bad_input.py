"""Bad input gets a clear error and changes nothing: property-based mutations of valid model,
partition and data files. Each mutated file must give an MpinnError with a message or the
correct result, never another exception, a hang or a modified file."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mpi4py import MPI

from mpinn.config import TrainConfig
from mpinn.errors import MpinnError
from mpinn.io import create, datafile, hdf5
from mpinn.io.datafile import load
from mpinn.model import DistributedModel
from mpinn.optim import make_optimizer
from mpinn.partition.choice import PartitionChoice
from mpinn.train import evaluate, predict, train
from tests.reference import Reference, assert_close

SIZES = [6, 9, 4]
EXAMPLES = int(os.environ.get("MPINN_HYPOTHESIS_EXAMPLES", 60))  # raise it to search harder
SEARCH = "MPINN_HYPOTHESIS_EXAMPLES" in os.environ  # random examples; else a fixed set for CI
MPI_EXAMPLES = max(EXAMPLES // 3, 10)  # per rank count, under make test-mpi
FIXTURES = [HealthCheck.function_scoped_fixture]  # each example copies into its own file
ACTS = ["relu", "softmax"]
STORAGES = ["csr", "dense"]  # the first layer's wiring is in the file too (indptr, indices)


def build_pristine(tmp: Path, nranks: int) -> dict[str, Path]:
    """A trained model (a CSR layer, Adam's state in /state) with a stored partition for
    ``nranks`` ranks, and its data; written by this process alone."""
    from mpinn.tools.inspect import store_partition
    model, data = tmp / "model.h5", tmp / "data.h5"
    create.create_model(str(model), SIZES, ACTS, "float64", seed=1, comm=MPI.COMM_SELF,
                     storages=STORAGES, sparse=create.SparseInit(density=0.5))
    rng = np.random.default_rng(0)
    datafile.write_data(str(data), rng.random((12, 6)), rng.integers(0, 4, 12))
    with DistributedModel(str(model), MPI.COMM_SELF, PartitionChoice(), 4) as dm:
        train(dm, load(str(data), dm.table, dm.spec.dtype, MPI.COMM_SELF),
              TrainConfig(epochs=1, batch_size=4, lr=0.01, optimizer="adam"))
    store_partition(str(model), nranks, "balanced", {}, "p", MPI.COMM_SELF)
    with h5py.File(model, "r") as f:  # what the mutations below aim at is really there
        assert "state/layers/1/weight_m" in f and "layers/1/indptr" in f, list(f["state/layers/1"])
    return {"model": model, "data": data}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, Path]:
    return build_pristine(tmp_path_factory.mktemp("pristine"), 1)


@pytest.fixture(scope="module")
def pristine_world(tmp_path_factory) -> dict[str, Path]:
    """``pristine`` for the ranks of COMM_WORLD: rank 0 writes it where every rank reads it."""
    comm = MPI.COMM_WORLD
    files = build_pristine(tmp_path_factory.mktemp("pristine"), comm.size) if comm.rank == 0 else None
    return comm.bcast(files)


VALUES = st.one_of(
    st.integers(-(2**62), 2**62), st.floats(allow_nan=True), st.text(max_size=8),
    st.lists(st.integers(-3, 2**45), min_size=0, max_size=4), st.sampled_from(
        ["relu", "softmax", "tanh", "dense", "csr", "identity", "sigmoid"]))

MODEL_ATTRS = ["mpinn_format_version", "sizes", "layers/1:activation", "layers/2:activation",
               "layers/1:storage", "layers/2:storage", "partitions/p:nranks", "partitions/p:strategy",
               "partitions/p:params", "state:epoch", "state:batch", "state:optimizer",
               "layers/1:dropout", "layers/2:dropout"]  # 2 is the output layer: refused
OBJECTS = ["layers", "layers/1", "layers/2/weight", "layers/1/bias", "layers/1/indices",
           "partitions/p/owner", "state", "state/layers/2/weight_v", "state/layers/1/weight_m"]
DATASETS = ["layers/1/data", "layers/1/indices", "layers/1/indptr", "layers/2/weight",
            "layers/2/bias", "partitions/p/owner", "state/layers/1/weight_m", "state/layers/2/weight_v",
            "state/layers/2/bias_m"]
SHAPES = st.lists(st.integers(0, 12), min_size=0, max_size=3).map(tuple)
DTYPES = st.sampled_from(["f4", "f8", "i4", "i8", "f2", "u1"])


@st.composite
def model_mutations(draw):
    kind = draw(st.sampled_from(["attr", "delete", "reshape", "nonfinite", "owner", "wiring"]))
    if kind == "attr":
        return kind, draw(st.sampled_from(MODEL_ATTRS)), draw(VALUES)
    if kind == "delete":
        return kind, draw(st.sampled_from(OBJECTS + MODEL_ATTRS)), None
    if kind == "reshape":
        return kind, draw(st.sampled_from(DATASETS)), (draw(SHAPES), draw(DTYPES))
    if kind == "nonfinite":
        return kind, draw(st.sampled_from(["layers/1/data", "layers/2/weight", "layers/2/bias",
                                           "state/layers/2/weight_v"])), \
            draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    if kind == "wiring":  # one entry of the CSR index arrays set to any value
        return kind, draw(st.sampled_from(["layers/1/indptr", "layers/1/indices"])), \
            (draw(st.integers(0, 40)), draw(st.integers(-3, 40)))
    return kind, "partitions/p/owner", draw(st.lists(st.integers(-2, 3), min_size=19, max_size=19))


def apply(path: Path, mutation) -> None:
    kind, target, value = mutation
    with h5py.File(path, "r+") as f:
        obj_path, _, attr = target.partition(":")
        holder, key = (f[obj_path], attr) if attr else (f, obj_path)
        if kind == "attr":
            # a value h5py cannot store as an attribute leaves the file as it was
            with contextlib.suppress(TypeError, ValueError, OverflowError):
                holder.attrs[key] = value
        elif kind == "delete":
            if target in OBJECTS:
                del f[target]
            elif key in holder.attrs:
                del holder.attrs[key]
        elif kind == "reshape":
            shape, dtype = value
            del f[target]
            f.create_dataset(target, shape=shape, dtype=dtype)
        elif kind == "nonfinite":
            dset = f[target]
            flat = dset[...].reshape(-1)
            flat[len(flat) // 2] = value
            dset[...] = flat.reshape(dset.shape)
        elif kind == "wiring":
            position, entry = value
            dset = f[target]
            dset[position % dset.shape[0]] = entry
        else:
            f[target][...] = np.asarray(value, dtype=np.int32)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


Outcome = tuple[np.ndarray, float, float] | str  # (outputs, loss, accuracy), or an error message


def run_model(model: Path, data: Path, partition: str | None, comm: MPI.Comm) -> Outcome:
    """Load the model and its training state, evaluate and predict with the library on the
    ranks of ``comm``; every rank returns all outputs, or the MpinnError's message."""
    try:
        with DistributedModel(str(model), comm, PartitionChoice(partition), 5) as dm:
            dm.load_optimizer_state(make_optimizer("adam", dm.engine.parameters(), 0.01))
            local = load(str(data), dm.table, dm.spec.dtype, comm)
            loss, accuracy = evaluate(dm, local, 5)
            mine = dm.shard.layers[-1].rows, predict(dm, local, 5)
    except MpinnError as exc:
        assert str(exc).strip(), "an error without a message"
        return str(exc)
    pieces = comm.allgather(mine)
    outputs = np.empty((local.n_samples, dm.spec.sizes[-1]), dtype=dm.spec.dtype)
    for rows, values in pieces:
        outputs[:, rows] = values.T
    return outputs, loss, accuracy


def assert_correct(outcome: Outcome, model: Path, data: Path) -> None:
    """An accepted file gives the reference's outputs, loss and accuracy for what it holds."""
    if isinstance(outcome, str):
        return
    outputs, loss, accuracy = outcome
    with h5py.File(data, "r") as f:
        x, y = f["X"][...].astype(outputs.dtype), f["y"][...].astype(np.int64)
    zs, acts = Reference.from_file(str(model)).forward(x)
    assert_close(outputs, acts[-1], outputs.dtype, "outputs of an accepted file")
    # cross-entropy from the logits (log-softmax): -log(p) overflows to inf where a huge
    # input drives p to 0, while the true loss, and mpinn's, is large but finite
    z = zs[-1] - zs[-1].max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    assert_close(loss, -log_p[np.arange(len(y)), y].mean(), outputs.dtype, "loss")
    assert accuracy == np.mean(acts[-1].argmax(axis=1) == y)


def agreed(outcome: Outcome, comm: MPI.Comm) -> None:
    """Every rank refused with the same message, or every rank accepted."""
    messages = comm.allgather(outcome if isinstance(outcome, str) else None)
    assert len(set(messages)) == 1, f"ranks disagree: {messages}"


def check_model_mutation(files: dict[str, Path], work: Path, mutation, use_partition: bool,
                         comm: MPI.Comm) -> None:
    model = work / "model.h5"
    if comm.rank == 0:
        shutil.copy(files["model"], model)
        apply(model, mutation)
    comm.Barrier()
    before = digest(model)
    outcome = run_model(model, files["data"], "p" if use_partition else None, comm)
    agreed(outcome, comm)
    assert digest(model) == before
    assert_correct(outcome, model, files["data"])
    comm.Barrier()  # before rank 0 writes the next example's file


def check_data_mutation(files: dict[str, Path], work: Path, mutation, comm: MPI.Comm) -> None:
    data = work / "data.h5"
    if comm.rank == 0:
        shutil.copy(files["data"], data)
        kind, value = mutation
        with h5py.File(data, "r+") as f:
            if kind in ("x_shape", "y_shape"):
                name = kind[0].upper() if kind == "x_shape" else "y"
                del f[name]
                f.create_dataset(name, shape=value[0], dtype=value[1])
            elif kind == "labels":
                f["y"][...] = np.asarray(value)
            elif kind == "x_values":
                f["X"][3, 2] = value
            else:
                del f[value]
    comm.Barrier()
    before_model, before_data = digest(files["model"]), digest(data)
    outcome = run_model(files["model"], data, None, comm)
    agreed(outcome, comm)
    assert digest(files["model"]) == before_model and digest(data) == before_data
    assert_correct(outcome, files["model"], data)
    comm.Barrier()


@st.composite
def data_mutations(draw):
    kind = draw(st.sampled_from(["x_shape", "y_shape", "labels", "x_values", "missing"]))
    if kind in ("x_shape", "y_shape"):
        return kind, (draw(SHAPES), draw(DTYPES))
    if kind == "labels":
        return kind, draw(st.lists(st.integers(-5, 9), min_size=12, max_size=12))
    if kind == "x_values":
        return kind, draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e300]))
    return kind, draw(st.sampled_from(["X", "y"]))


@pytest.mark.parametrize("use_partition", [False, True])
def test_the_unmutated_files_are_accepted_with_correct_results(pristine, use_partition):
    """The oracle of the mutations below is only as good as this: a library that refused
    every file would pass them all."""
    outcome = run_model(pristine["model"], pristine["data"], "p" if use_partition else None,
                        MPI.COMM_SELF)
    assert not isinstance(outcome, str), outcome
    assert_correct(outcome, pristine["model"], pristine["data"])


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=FIXTURES,
          derandomize=not SEARCH)
@given(mutation=model_mutations(), use_partition=st.booleans())
def test_mutated_model_gives_clear_error_or_correct_result(pristine, tmp_path, mutation,
                                                          use_partition):
    check_model_mutation(pristine, tmp_path, mutation, use_partition, MPI.COMM_SELF)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=FIXTURES,
          derandomize=not SEARCH)
@given(mutation=data_mutations())
def test_mutated_data_gives_clear_error_or_correct_result(pristine, tmp_path, mutation):
    check_data_mutation(pristine, tmp_path, mutation, MPI.COMM_SELF)


# Under mpirun every rank draws the same examples (derandomized, no example database) and
# takes rank 0's anyway; rank 0 writes each mutated file where every rank reads it.
MPI_SETTINGS = settings(max_examples=MPI_EXAMPLES, deadline=None, suppress_health_check=FIXTURES,
                        derandomize=True, database=None)


@pytest.mark.mpi(min_size=2)
@MPI_SETTINGS
@given(mutation=model_mutations(), use_partition=st.booleans())
def test_mutated_model_is_refused_by_every_rank_or_gives_correct_results(pristine_world, mpi_tmp_path,
                                                                         mutation, use_partition):
    comm = MPI.COMM_WORLD
    mutation, use_partition, work = comm.bcast((mutation, use_partition, mpi_tmp_path))
    check_model_mutation(pristine_world, work, mutation, use_partition, comm)


@pytest.mark.mpi(min_size=2)
@MPI_SETTINGS
@given(mutation=data_mutations())
def test_mutated_data_is_refused_by_every_rank_or_gives_correct_results(pristine_world, mpi_tmp_path,
                                                                        mutation):
    comm = MPI.COMM_WORLD
    mutation, work = comm.bcast((mutation, mpi_tmp_path))
    check_data_mutation(pristine_world, work, mutation, comm)


def declared_only(path: Path, sizes: list[int]) -> Path:
    """A model file that declares ``sizes`` with chunked, never-written (so empty) datasets."""
    with h5py.File(path, "w") as f:
        f.attrs["mpinn_format_version"] = 1
        f.attrs["sizes"] = np.array(sizes)
        for i in range(1, len(sizes)):
            n_in, n_out = sizes[i - 1], sizes[i]
            g = f.create_group(f"layers/{i}")
            g.attrs["activation"] = "softmax" if i == len(sizes) - 1 else "relu"
            g.attrs["storage"] = "dense"
            g.create_dataset("weight", shape=(n_out, n_in), dtype="f4", chunks=(1, min(n_in, 4096)))
            g.create_dataset("bias", shape=(n_out,), dtype="f4", chunks=(min(n_out, 4096),))
    return path


def test_hostile_sizes_are_refused_before_allocation(tmp_path):
    path = declared_only(tmp_path / "huge.h5", [2**38, 2**38, 10])
    with pytest.raises(MpinnError, match="exceeds this machine's memory"):
        DistributedModel(str(path), MPI.COMM_SELF, PartitionChoice(), 5)


def test_large_share_is_refused_before_allocation(tmp_path):
    path = declared_only(tmp_path / "big.h5", [2**21, 2**21, 2])
    with pytest.raises(MpinnError, match="needs about .* GiB but only"):
        DistributedModel(str(path), MPI.COMM_SELF, PartitionChoice(), 5)


def test_a_locked_file_names_the_lock_and_the_way_out(tmp_path, monkeypatch):
    """Serial HDF5 refuses a file another process writes; the message says what to do."""
    path = tmp_path / "m.h5"
    h5py.File(path, "w").close()
    holder = subprocess.Popen([sys.executable, "-c", "import h5py, sys, time\n"
                               "f = h5py.File(sys.argv[1], 'r+', driver='sec2'); print(flush=True)\n"
                               "time.sleep(60)", str(path)], stdout=subprocess.PIPE, text=True)
    try:
        holder.stdout.readline()  # the other process holds its write lock now
        monkeypatch.setattr(hdf5, "MPI_IO", False)
        with pytest.raises(MpinnError, match="cannot open .*lock.*HDF5_USE_FILE_LOCKING=FALSE"):
            hdf5.open_file(str(path), "r", MPI.COMM_SELF)
    finally:
        holder.kill()
        holder.wait()
