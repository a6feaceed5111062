"""Each rank reads only its own rows, measured by the kernel rather than by the package.

``/proc/self/io``'s ``rchar`` counts the bytes every read call of a process returned, from
whatever code made it (mpinn, h5py, HDF5, MPI-IO). Each rank reads it before and after
opening a model and its data, and compares the difference with its rows' bytes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.system.test_cli import ENV, ROOT

SIZES = [256, 1024, 512, 16]  # 3.2 MB of float32 rows: a rank's share dwarfs HDF5's own reads
SAMPLES = 40
SLACK = 64 * 1024  # HDF5's superblock, object headers and B-trees (seen: about 21 KB a rank)


def rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar")).split()[1])


def measure(directory: str, storages: str) -> None:
    """Run under mpirun: write a model and data, load them, and print one JSON line with
    each rank's bytes read while loading and the bytes of its own rows and data columns."""
    from mpi4py import MPI

    from mpinn.io import create, datafile
    from mpinn.io.datafile import load
    from mpinn.model import DistributedModel
    from mpinn.partition.choice import PartitionChoice

    comm = MPI.COMM_WORLD
    model, data = f"{directory}/model.h5", f"{directory}/data.h5"
    layers = storages.split(",")
    create.create_model(model, SIZES, ["relu", "relu", "softmax"], "float32", seed=1, comm=comm,
                     storages=layers, sparse=create.SparseInit(density=0.3) if "csr" in layers else None)
    if comm.rank == 0:
        rng = np.random.default_rng(2)
        datafile.write_data(data, rng.normal(size=(SAMPLES, SIZES[0])).astype(np.float32),
                       rng.integers(0, SIZES[-1], SAMPLES))
    comm.Barrier()
    before = rchar()
    with DistributedModel(model, comm, PartitionChoice(), 8, training=False) as dm:
        load(data, dm.table, dm.spec.dtype, comm)
        read = rchar() - before
        rows = [dm.table.rows(layer, comm.rank) for layer in range(len(SIZES))]
    mine = rows[0].size * SAMPLES * 4 + SAMPLES * 8  # my features of every sample, every label
    with h5py.File(model, "r") as f:  # counted from the file's layout and the partition
        for layer in range(1, len(SIZES)):
            group, n = f[f"layers/{layer}"], rows[layer].size
            if group.attrs["storage"] == "csr":
                indptr = group["indptr"][...]
                # data (float32) and indices (int32) of my rows, their starts and ends (int64)
                mine += int((indptr[rows[layer] + 1] - indptr[rows[layer]]).sum()) * 8 + n * 16
            else:
                mine += n * SIZES[layer - 1] * 4
            mine += n * 4  # biases
    ranks = comm.gather({"rank": comm.rank, "read": read, "mine": mine})
    if comm.rank == 0:  # one line: the ranks' own lines could interleave
        print(json.dumps(ranks), flush=True)


def run_ranks(tmp_path: Path, nranks: int, storages: str, env: dict[str, str]) -> list[dict]:
    code = f"from tests.system.test_reads import measure; measure({str(tmp_path)!r}, {storages!r})"
    result = subprocess.run(["mpirun", "--oversubscribe", "-n", str(nranks), sys.executable, "-c", code],
                            capture_output=True, text=True, timeout=120, env={**ENV, **env}, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    ranks = next(json.loads(line) for line in result.stdout.splitlines() if line.startswith("[{"))
    assert sorted(r["rank"] for r in ranks) == list(range(nranks))
    return ranks


@pytest.mark.parametrize(("nranks", "storages"), [(2, "dense,dense,dense"), (3, "csr,dense,csr"),
                                                  (4, "dense,dense,dense")])
def test_each_rank_reads_only_its_own_rows_measured_by_the_kernel(tmp_path, nranks, storages):
    """With independent MPI-IO (fcoll individual), the bytes a rank's read calls returned are
    its own rows and data columns, plus HDF5's metadata: no rank reads another's rows."""
    for rank in run_ranks(tmp_path, nranks, storages, {"OMPI_MCA_fcoll": "individual"}):
        assert rank["mine"] <= rank["read"] <= rank["mine"] + SLACK, rank


def test_with_collective_io_the_ranks_read_the_model_once_in_all(tmp_path):
    """Open MPI's default collective reads let aggregator ranks read for the others (at 4
    ranks on one node, rank 0 reads every rank's rows and hands them out): per rank the
    bound above does not hold there, but all ranks together still read each row once."""
    ranks = run_ranks(tmp_path, 4, "dense,dense,dense", {})
    assert sum(r["mine"] for r in ranks) <= sum(r["read"] for r in ranks) <= \
        sum(r["mine"] for r in ranks) + 4 * SLACK, ranks
