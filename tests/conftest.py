"""Shared test set-up: an MPI test that fails on one rank ends the whole job at once.

Without this, the ranks whose test passed would walk into the next test's collectives
while the failed rank does not, and the run would hang until its time bound.
"""

from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not report.failed or "--with-mpi" not in sys.argv:
        return
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if comm.size == 1:
        return
    sys.stderr.write(f"\n[rank {comm.rank}] {report.nodeid} FAILED in {report.when}:\n"
                     f"{report.longreprtext}\n[rank {comm.rank}] aborting the MPI job\n")
    sys.stderr.flush()
    comm.Abort(1)
