"""Every kind of exchange gives the single-process reference's results, at 1 to 4 ranks.

The rest of the suite runs ``auto`` (the allgather where every rank reads a layer whole,
else the Alltoallv); here the allgather (Iallgatherv forward, Alltoallv backward), the
collective pair (Iallgatherv forward, Ireduce_scatter backward) and the neighbourhood
Alltoallv are forced and run training (plain and pipelined) and prediction on dense, sparse
and mixed models.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mpi4py import MPI

from mpinn.errors import MpinnError
from mpinn.model import DistributedModel
from tests.helpers import dtypes
from tests.mpi.test_engine import (
    BATCH,
    CASES,
    check_prediction,
    choice,
    make_files,
    train_and_compare,
)

pytestmark = pytest.mark.mpi

# auto (allgather or alltoallv per layer) is what every other test of the suite runs
KINDS = ("allgather", "collective", "neighbor")
# contiguous blocks, scattered owners, and whole layers on one rank (ranks without rows)
STRATEGIES = ("balanced", "ids", "layers")
# one rank has nothing to exchange: every kind's plans are the plain one tests/mpi/test_engine.py
# runs, so the equivalence tests below start at 2 ranks
MORE_THAN_ONE_RANK = pytest.mark.skipif(MPI.COMM_WORLD.size == 1,
                                        reason="one rank: every kind is the plain plan")


@MORE_THAN_ONE_RANK
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", dtypes())
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("exchange", KINDS)
def test_trained_weights_equal_reference_for_every_exchange(exchange, strategy, dtype, case,
                                                            mpi_tmp_path):
    train_and_compare(mpi_tmp_path, case, dtype, strategy, exchange=exchange)


@MORE_THAN_ONE_RANK
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("strategy", ["balanced", "layers"])
@pytest.mark.parametrize("exchange", KINDS)
def test_pipelined_training_equals_reference_for_every_exchange(exchange, strategy, case,
                                                                mpi_tmp_path):
    train_and_compare(mpi_tmp_path, case, "float64", strategy, 3, exchange=exchange)


@MORE_THAN_ONE_RANK
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", dtypes())
@pytest.mark.parametrize("strategy", ["balanced", "ids"])
@pytest.mark.parametrize("exchange", KINDS)
def test_predict_equals_reference_for_every_exchange(exchange, strategy, dtype, case,
                                                     mpi_tmp_path):
    """Inference engines share one pair of buffers between all layers' plans."""
    check_prediction(mpi_tmp_path, case, dtype, strategy, training=False, exchange=exchange)


@pytest.mark.parametrize("exchange", ["alltoallv", *KINDS, "auto"])
def test_each_layer_runs_the_kind_asked_for_where_it_applies(exchange, mpi_tmp_path):
    """Dense layers read whole by every rank take the allgather or the collective pair when
    asked (the allgather under auto from 3 ranks on); these sparse ones never do; one rank
    exchanges nothing."""
    comm = MPI.COMM_WORLD
    c = CASES["mixed"]  # csr, dense, csr
    model_path, _, _, _ = make_files(mpi_tmp_path, c, "float64", comm)
    with DistributedModel(model_path, comm, choice("balanced", c["sizes"], comm.size), BATCH,
                          exchange=exchange) as model:
        kinds = [plan.kind for plan in model.engine.plans]
    if comm.size == 1 or exchange == "alltoallv" or (exchange == "auto" and comm.size == 2):
        expected = ["alltoallv"] * 3
    elif exchange == "neighbor":
        expected = ["neighbor"] * 3
    else:
        expected = ["alltoallv", "collective" if exchange == "collective" else "allgather",
                    "alltoallv"]
    assert kinds == expected


def test_an_unknown_exchange_is_refused(mpi_tmp_path):
    comm = MPI.COMM_WORLD
    c = CASES["softmax"]
    model_path, _, _, _ = make_files(mpi_tmp_path, c, "float64", comm)
    before = Path(model_path).read_bytes()
    with pytest.raises(MpinnError, match="--exchange must be one of"):
        DistributedModel(model_path, comm, choice("balanced", c["sizes"], comm.size), BATCH,
                         exchange="smoke-signals")
    comm.Barrier()  # every rank refused (none is left in a collective) and the file is as it was
    assert Path(model_path).read_bytes() == before
