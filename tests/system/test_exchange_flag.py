"""The ``--exchange`` flag and the API's ``exchange=``: every kind trains the same weights
from the command line, and a kind that does not exist is refused before anything runs."""

from __future__ import annotations

import numpy as np
import pytest

from mpinn.api import Network
from mpinn.cli import parser as mpinn_parser
from mpinn.comm import exchange
from mpinn.errors import MpinnError
from tests.reference import Reference, assert_close
from tests.system.test_cli import DIGITS_TRAIN, mpinn, ok


def test_cli_offers_the_kinds_the_exchange_knows():
    assert ("auto", *exchange.PLANS) == mpinn_parser.EXCHANGES
    parser = mpinn_parser.build_parser()
    for command in ("train", "evaluate", "predict"):
        assert parser.parse_args([command, "m.h5", "--exchange", "neighbor"]).exchange == "neighbor"
        assert parser.parse_args([command, "m.h5"]).exchange == "auto"
    assert parser.parse_args(["bench", "sparse-dnn", "--exchange", "collective"]).exchange \
        == "collective"
    with pytest.raises(MpinnError, match="smoke-signals"):
        parser.parse_args(["train", "m.h5", "--exchange", "smoke-signals"])


def test_api_refuses_an_unknown_exchange(tmp_path):
    path = tmp_path / "model.h5"
    Network.create(path, [8, 6, 3]).close()
    with pytest.raises(MpinnError, match="exchange must be one of"):
        Network.open(path, exchange="smoke-signals")


@pytest.mark.timeout(1440)  # twelve runs of at most 120 s each
def test_every_exchange_trains_the_weights_of_alltoallv_from_the_cli(tmp_path):
    """Dense layers (digits, 64-32-32-10) at 3 ranks. The allgather and the neighbourhood
    Alltoallv move the same values and sum them in the same order: bitwise the Alltoallv's
    weights. The reduce-scatter sums in MPI's order: equal within float32 rounding, also
    pipelined."""
    trained = {}
    for name, flags in (("alltoallv", ["--exchange", "alltoallv"]),
                        ("auto", []),
                        ("allgather", ["--exchange", "allgather"]),
                        ("neighbor", ["--exchange", "neighbor"]),
                        ("collective", ["--exchange", "collective"]),
                        ("collective-pipelined", ["--exchange", "collective", "--micro-batches",
                                                  "3"])):
        model = tmp_path / f"{name}.h5"
        ok(mpinn(1, "init", str(model), "--sizes", "64,32,32,10", "--seed", "2"))
        ok(mpinn(3, "train", str(model), "--data", DIGITS_TRAIN, "--epochs", "1",
                 "--batch-size", "32", "--lr", "0.05", "--quiet", *flags))
        trained[name] = Reference.from_file(str(model))
    base = trained.pop("alltoallv")
    for name, ref in trained.items():
        for i, (w, b) in enumerate(zip(ref.weights, ref.biases, strict=True)):
            if name.startswith("collective"):
                assert_close(np.asarray(w), np.asarray(base.weights[i]), "float32",
                             f"{name} layer {i + 1}")
                assert_close(b, base.biases[i], "float32", f"{name} layer {i + 1} bias")
            else:
                assert np.array_equal(w, base.weights[i]), f"{name} layer {i + 1}"
                assert np.array_equal(b, base.biases[i]), f"{name} layer {i + 1} bias"
