"""Shared test set-up: an MPI test that fails on one rank ends the whole job at once, the
MPI passes import only the files that have MPI tests, and the longest files run first.

Without the first, the ranks whose test passed would walk into the next test's collectives
while the failed rank does not, and the run would hang until its time bound.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

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


# The serial stage (pytest -n 3 --dist loadfile) hands whole files to its workers in the
# order collected; alphabetically, long files came last and one worker ran on alone for a
# minute while the others had finished (per-file wall times of 2026-12-05, 2 cores). The
# longest first, the rest as collected: a file missing here only runs later.
LONGEST_FIRST = ("system/test_benchmarks.py", "system/test_user_mistakes.py",
                 "system/test_docs.py", "system/test_no_hangs.py", "system/test_slurm.py",
                 "system/test_sparse.py", "system/test_cli.py", "system/test_nothing_lost.py",
                 "system/test_api_promises.py", "system/test_cli_property.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.nodeid.partition("::")[0]
        return next((i for i, name in enumerate(LONGEST_FIRST) if path.endswith(name)),
                    len(LONGEST_FIRST))
    items.sort(key=rank)  # stable: the same order on every rank and every worker


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """In the MPI passes (``--with-mpi -m mpi``) a test file without an MPI test is not
    imported: every rank of the five passes imported all 35 files to deselect most of them,
    torch with test_torch_io among them (3.2 of each rank's 3.6 CPU-s before its first test).
    An MPI test carries ``pytest.mark.mpi`` in its file's text."""
    if (not config.getoption("with_mpi", False) or config.getoption("markexpr") != "mpi"
            or collection_path.suffix != ".py" or not collection_path.name.startswith("test_")):
        return None
    return "mark.mpi" not in collection_path.read_text() or None
