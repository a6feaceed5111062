"""Never silently stale (issue 28): every model file carries a commit id, ranks that open
different commits stop with one agreed line, and a stale file handle is tried again before
it is an error that names the filesystem's caching, not a lock."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from mpinn.config import TrainConfig
from mpinn.errors import MpinnError
from mpinn.io import checkpoint, create, datafile, schema
from mpinn.model import DistributedModel
from mpinn.partition.choice import PartitionChoice
from mpinn.train import train

SIZES = [6, 5, 3]


def _model(tmp, comm: MPI.Comm) -> str:
    path = str(tmp / "model.h5")
    create.create_model(path, SIZES, ["relu", "softmax"], "float64", seed=3, comm=comm)
    return path


def _ident(path: str) -> str | None:
    with h5py.File(path, "r") as f:
        return schema.read_checkpoint_id(f)


@pytest.mark.mpi
def test_every_commit_has_a_new_id_the_same_on_every_rank(mpi_tmp_path):
    comm = MPI.COMM_WORLD
    path = _model(mpi_tmp_path, comm)
    data = str(mpi_tmp_path / "data.h5")
    if comm.rank == 0:
        rng = np.random.default_rng(1)
        datafile.write_data(data, rng.normal(size=(12, 6)), rng.integers(0, 3, 12))
    comm.Barrier()
    first = _ident(path)
    assert first is not None and len(set(comm.allgather(first))) == 1
    with DistributedModel(path, comm, PartitionChoice(), 4) as model:
        train(model, datafile.load(data, model.table, model.spec.dtype, comm, model.group),
              TrainConfig(epochs=2, batch_size=4, checkpoint_every=1))
    second = _ident(path)
    assert second not in (None, first) and len(set(comm.allgather(second))) == 1


@pytest.mark.mpi(min_size=2)
def test_ranks_that_open_different_commits_stop_with_one_agreed_line(mpi_tmp_path):
    """Rank 1 opens an older commit (as a node whose client cached the replaced file)."""
    comm = MPI.COMM_WORLD
    path = _model(mpi_tmp_path, comm)
    old = str(mpi_tmp_path / "old.h5")
    if comm.rank == 0:
        shutil.copyfile(path, old)
        with h5py.File(old, "r+") as f:
            f.attrs[schema.CHECKPOINT_ID] = "0ld0ld0ld0ld0ld0"
    comm.Barrier()
    mine = old if comm.rank == 1 else path
    with h5py.File(mine, "r") as f, pytest.raises(MpinnError) as raised:
        checkpoint.check_same_commit(f, path, comm)
    message = str(raised.value)
    assert raised.value.agreed and message.startswith(f"{path}: the ranks opened different")
    assert "rank 1 read 0ld0ld0ld0ld0ld0" in message and "client caching" in message, message
    assert len(set(comm.allgather(message))) == 1  # the same line on every rank
    with h5py.File(path, "r") as f:  # the same commit everywhere: nothing to say
        checkpoint.check_same_commit(f, path, comm)


@pytest.mark.mpi(min_size=2)
def test_a_rank_that_cannot_read_the_id_stops_every_rank(mpi_tmp_path, monkeypatch):
    """A stale handle mid-read makes HDF5 report garbage ("bad global heap collection
    signature"): that rank's read counts as a mismatch, not as an internal error."""
    comm = MPI.COMM_WORLD
    path = _model(mpi_tmp_path, comm)
    if comm.rank == 1:
        def unreadable(f: h5py.File) -> str:
            raise OSError("Unable to read attribute (bad global heap collection signature)")
        monkeypatch.setattr(checkpoint, "read_checkpoint_id", unreadable)
    with h5py.File(path, "r") as f, pytest.raises(MpinnError) as raised:
        checkpoint.check_same_commit(f, path, comm)
    message = str(raised.value)
    assert raised.value.agreed and "rank 1 read nothing readable (Unable to read attribute" in message
    assert "client caching" in message and len(set(comm.allgather(message))) == 1


def _train(path: str, data: str, comm: MPI.Comm) -> None:
    with DistributedModel(path, comm, PartitionChoice(), 4) as model:
        train(model, datafile.load(data, model.table, model.spec.dtype, comm, model.group),
              TrainConfig(epochs=2, batch_size=4, checkpoint_every=1))


def _data(tmp, comm: MPI.Comm) -> str:
    data = str(tmp / "data.h5")
    if comm.rank == 0:
        rng = np.random.default_rng(1)
        datafile.write_data(data, rng.normal(size=(12, 6)), rng.integers(0, 3, 12))
    comm.Barrier()
    return data


@pytest.mark.mpi(min_size=2)
def test_a_new_checkpoint_some_rank_reads_otherwise_is_never_committed(mpi_tmp_path, monkeypatch):
    """Rank 1 finds another id in the new file before its rename (as a node whose cache
    resolved the name to another file, where its rows went): the model stays byte for byte
    as it was, the unfinished file is removed, and every rank says why."""
    comm = MPI.COMM_WORLD
    path, data = _model(mpi_tmp_path, comm), _data(mpi_tmp_path, comm)
    with open(path, "rb") as fh:
        before = fh.read()
    comm.Barrier()
    if comm.rank == 1:  # the new file reads otherwise there (the model opened as usual)
        real = checkpoint.read_checkpoint_id
        monkeypatch.setattr(checkpoint, "read_checkpoint_id", lambda f: "0ld0ld0ld0ld0ld0"
                            if f.filename.endswith(".partial") else real(f))
    with pytest.raises(MpinnError) as raised:
        _train(path, data, comm)
    message = str(raised.value)
    assert "the ranks opened different or old commits of the new checkpoint" in message, message
    assert "rank 1 read 0ld0ld0ld0ld0ld0" in message and "was not committed" in message
    assert len(set(comm.allgather(message))) == 1
    with open(path, "rb") as fh:
        assert fh.read() == before
    assert not checkpoint.leftovers(path)


@pytest.mark.mpi
def test_each_checkpoint_is_written_under_a_new_name_and_leftovers_are_removed(mpi_tmp_path,
                                                                               monkeypatch):
    """A name never used before (a cache cannot map it to the model itself), and the
    unfinished files killed jobs left beside the model go with the next checkpoint."""
    comm = MPI.COMM_WORLD
    path, data = _model(mpi_tmp_path, comm), _data(mpi_tmp_path, comm)
    killed = [f"{path}.0123456789abcdef.partial", f"{path}.partial"]  # today's, and older mpinn's
    other = f"{path}.preds.h5.partial"  # another command's output: not a checkpoint
    if comm.rank == 0:
        for name in (*killed, other):
            with open(name, "w") as fh:
                fh.write("left by a killed job")
    comm.Barrier()
    assert sorted(checkpoint.leftovers(path)) == sorted(killed)
    names = []
    real = checkpoint.Checkpoint.__enter__

    def noting(self: checkpoint.Checkpoint) -> h5py.File:
        names.append(self.partial)
        return real(self)
    monkeypatch.setattr(checkpoint.Checkpoint, "__enter__", noting)
    _train(path, data, comm)
    assert len(names) == 2 and len(set(names)) == 2, names
    assert all(name.startswith(f"{path}.") and name.endswith(".partial") for name in names)
    assert not checkpoint.leftovers(path)
    assert (mpi_tmp_path / "model.h5.preds.h5.partial").exists()
