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
