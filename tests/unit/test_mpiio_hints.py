"""MPINN_MPIIO_HINTS: the hints reach the MPI-IO open; a malformed list is one clear error."""

from __future__ import annotations

import h5py
import pytest
from mpi4py import MPI

from mpinn.errors import MpinnError
from mpinn.io import hdf5

pytestmark = pytest.mark.skipif(not hdf5.MPI_IO, reason="h5py without MPI-IO")


def test_the_hints_are_passed_to_every_parallel_open(tmp_path, monkeypatch):
    monkeypatch.setenv(hdf5.HINTS_VARIABLE, " cb_nodes=1, romio_cb_write = enable ,")
    path = str(tmp_path / "f.h5")
    with hdf5.open_file(path, "w", MPI.COMM_SELF) as f:
        _, info = f.id.get_access_plist().get_fapl_mpio()
        assert info.Get("cb_nodes") == "1" and info.Get("romio_cb_write") == "enable"
    monkeypatch.delenv(hdf5.HINTS_VARIABLE)
    with hdf5.open_file(path, "r", MPI.COMM_SELF) as f:
        _, info = f.id.get_access_plist().get_fapl_mpio()
        assert info.Get("cb_nodes") is None


@pytest.mark.parametrize("hints", ["cb_nodes", "=2", "cb_nodes=", "cb nodes=2"])
def test_a_malformed_hint_is_refused_naming_it(tmp_path, monkeypatch, hints):
    monkeypatch.setenv(hdf5.HINTS_VARIABLE, hints)
    path = tmp_path / "f.h5"
    with pytest.raises(MpinnError, match=f"MPINN_MPIIO_HINTS: '{hints}' is not KEY=VALUE"):
        hdf5.open_file(str(path), "w", MPI.COMM_SELF)
    assert not path.exists()
    h5py.File(path, "w").close()  # nothing left open
