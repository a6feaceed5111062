"""A reopen that reads the commit a checkpoint replaced, and a stale file handle, on one
process (issue 28; the agreement across ranks is in tests/mpi/test_commits.py)."""

from __future__ import annotations

import errno
import os

import h5py
import pytest
from mpi4py import MPI

from mpinn.errors import MpinnError
from mpinn.io import checkpoint, create, hdf5

SIZES = [6, 5, 3]


def _model(tmp, comm: MPI.Comm) -> str:
    path = str(tmp / "model.h5")
    create.create_model(path, SIZES, ["relu", "softmax"], "float64", seed=3, comm=comm)
    return path


def test_a_reopen_that_reads_the_replaced_commit_is_an_error(tmp_path):
    path = _model(tmp_path, MPI.COMM_SELF)
    with h5py.File(path, "r") as f, pytest.raises(MpinnError, match="not the commit abc just "
                                                  "written.*docs/filesystems.md"):
        checkpoint.check_same_commit(f, path, MPI.COMM_SELF, expected="abc")


def test_a_stale_handle_is_tried_again_then_named_apart_from_a_lock(tmp_path, monkeypatch):
    path = _model(tmp_path, MPI.COMM_SELF)
    real_open, calls = os.open, []

    def stale_twice(name, flags, *args):
        calls.append(name)
        if name == path and len(calls) <= 2:
            raise OSError(errno.ESTALE, "Stale file handle")
        return real_open(name, flags, *args)

    monkeypatch.setattr(hdf5.time, "sleep", lambda _s: None)
    monkeypatch.setattr(hdf5.os, "open", stale_twice)
    hdf5.open_file(path, "r", MPI.COMM_SELF).close()  # the third try gets through
    assert calls[:3] == [path] * 3

    def always_stale(name, flags, *args):
        if name == path:
            raise OSError(errno.ESTALE, "Stale file handle")
        return real_open(name, flags, *args)

    monkeypatch.setattr(hdf5.os, "open", always_stale)
    with pytest.raises(MpinnError) as raised:
        hdf5.open_file(path, "r", MPI.COMM_SELF)
    message = str(raised.value)
    assert "stale file handle (ESTALE)" in message and "not a lock" in message
    assert "HDF5_USE_FILE_LOCKING" not in message
    # HDF5's own words for it (a lock taken on a stale handle) are recognised too
    assert hdf5.is_stale(OSError("unable to lock file, errno = 116, error message = 'Stale "
                                 "file handle'"))
    assert not hdf5.is_stale(OSError("unable to lock file, errno = 11, error message = "
                                     "'Resource temporarily unavailable'"))
