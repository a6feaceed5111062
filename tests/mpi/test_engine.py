"""The invariant that carries everything: distributed results equal the single-process reference.

Run under mpirun at 1, 2, 3 and 4 ranks (``make test-mpi``); every strategy, both dtypes.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import scipy.sparse as sp
from mpi4py import MPI

from mpinn.comm.plans import ExchangePlan
from mpinn.config import TrainConfig
from mpinn.errors import MpinnError
from mpinn.io import create, datafile, hdf5, schema
from mpinn.io.datafile import load
from mpinn.model import DistributedModel
from mpinn.optim import SGD
from mpinn.partition.choice import PartitionChoice
from mpinn.partition.traffic import rank_traffic
from mpinn.train import evaluate, predict, train
from tests.helpers import (
    ALL_STRATEGIES,
    classification_data,
    dtypes,
    regression_data,
    strategy_params,
)
from tests.reference import Reference, assert_close

pytestmark = pytest.mark.mpi

CASES = {
    # softmax output split over ranks, cross-entropy, SGD with momentum
    "softmax": dict(sizes=[7, 13, 11, 5], acts=["relu", "tanh", "softmax"], labels=True,
                    optimizer="sgd", momentum=0.9, lr=0.05),
    # float targets, squared error, Adam
    "regression": dict(sizes=[6, 9, 4], acts=["sigmoid", "identity"], labels=False,
                       optimizer="adam", momentum=0.0, lr=0.01),
    # every layer sparse, relu_cap hitting its cap, softmax split over ranks
    "sparse": dict(sizes=[7, 13, 11, 5], acts=["relu", "relu_cap", "softmax"], labels=True,
                   optimizer="sgd", momentum=0.9, lr=0.05, storage=["csr"] * 3,
                   sparse=create.SparseInit(density=0.4), cap=0.6),
    # dense and sparse layers mixed, Adam
    "mixed": dict(sizes=[6, 9, 8, 4], acts=["tanh", "relu", "identity"], labels=False,
                  optimizer="adam", momentum=0.0, lr=0.01, storage=["csr", "dense", "csr"],
                  sparse=create.SparseInit(fan_in=3)),
}
# plain SGD (no momentum, no decay), which train steps inside backward; dense and CSR layers
TRAINING_ONLY = {
    "plain_sgd": dict(sizes=[7, 13, 11, 5], acts=["relu", "relu", "softmax"], labels=True,
                      optimizer="sgd", momentum=0.0, lr=0.1, storage=["dense", "csr", "dense"],
                      sparse=create.SparseInit(density=0.5)),
}
N_SAMPLES, BATCH, EPOCHS = 30, 8, 2  # 30 = 3 full batches and a partial one


def make_files(tmp, case: dict, dtype: str, comm: MPI.Comm) -> tuple[str, str, np.ndarray, np.ndarray]:
    model, data = str(tmp / "model.h5"), str(tmp / "data.h5")
    sizes = case["sizes"]
    create.create_model(model, sizes, case["acts"], dtype, seed=3, comm=comm,
                     storages=case.get("storage"), sparse=case.get("sparse"), cap=case.get("cap"))
    make = classification_data if case["labels"] else regression_data
    x, y = make(N_SAMPLES, sizes[0], sizes[-1], seed=5, dtype=dtype)
    if comm.rank == 0:
        datafile.write_data(data, x, y)
    comm.Barrier()
    return model, data, x, y


def choice(strategy: str, sizes: list[int], nranks: int) -> PartitionChoice:
    return PartitionChoice(None, strategy, strategy_params(strategy, sizes, nranks))


def train_and_compare(tmp, case: str, dtype: str, strategy: str, micro_batches: int = 1, *,
                      exchange: str = "auto", replicas: int = 1, batch: int = BATCH,
                      nodes: np.ndarray | None = None, dropout: float = 0.0) -> None:
    """Train 2 epochs distributed and in the reference; losses and weights must agree.

    ``exchange``: the kind of every layer's exchange; ``replicas`` R: R contiguous groups of
    Q = P / R ranks, each holding a Q-rank partition (R must divide the job's ranks);
    ``nodes``: a node map for the exchange (default: this job's)."""
    comm = MPI.COMM_WORLD
    q = comm.size // replicas
    c = {**CASES, **TRAINING_ONLY}[case]
    model_path, data_path, x, y = make_files(tmp, c, dtype, comm)
    ref = Reference.from_file(model_path)
    comm.Barrier()  # every rank has read the initial weights before anyone writes
    ref_losses = ref.train(x, y, EPOCHS, batch, c["lr"], c["optimizer"], c["momentum"], seed=11,
                           dropout=dropout)

    with DistributedModel(model_path, comm, choice(strategy, c["sizes"], q), batch,
                          replicas=replicas, exchange=exchange, nodes=nodes) as model:
        assert model.group.size == q and model.groups.index == comm.rank // q  # contiguous
        data = load(data_path, model.table, model.spec.dtype, comm, model.group)
        history = train(model, data, TrainConfig(
            epochs=EPOCHS, batch_size=batch, lr=c["lr"], optimizer=c["optimizer"],
            momentum=c["momentum"], seed=11, micro_batches=micro_batches,
            dropout=dropout or None))
    assert_close([h.loss for h in history.history], ref_losses, dtype, "epoch losses")
    trained = Reference.from_file(model_path)
    for i in range(len(ref.weights)):
        if hasattr(ref.weights[i], "indptr"):  # the pattern is kept, only values change
            assert np.array_equal(trained.weights[i].indices, ref.weights[i].indices)
            assert np.array_equal(trained.weights[i].indptr, ref.weights[i].indptr)
        assert_close(_values(trained.weights[i]), _values(ref.weights[i]), dtype,
                     f"{case} layer {i + 1} weight")
        assert_close(trained.biases[i], ref.biases[i], dtype, f"{case} layer {i + 1} bias")
    comm.Barrier()  # nobody rewrites the files while another rank still reads them


def _values(weight) -> np.ndarray:
    return weight.data if hasattr(weight, "indptr") else weight


def _rows_of(values: np.ndarray, weight, rows: np.ndarray) -> np.ndarray:
    """The entries of ``rows`` of a weight-shaped array (a CSR layer's: its stored weights)."""
    if not hasattr(weight, "indptr"):
        return values[rows]
    return np.concatenate([values[weight.indptr[r]:weight.indptr[r + 1]] for r in rows] + [[]])


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", dtypes())
@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_trained_weights_equal_reference_for_every_strategy(strategy, dtype, case, mpi_tmp_path):
    train_and_compare(mpi_tmp_path, case, dtype, strategy)


@pytest.mark.parametrize("dtype", dtypes())
@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_plain_sgd_steps_inside_backward_and_equals_reference(strategy, dtype, mpi_tmp_path,
                                                              monkeypatch):
    """With no momentum, decay, clipping or replicas the update happens in the weight-gradient
    GEMMs (CSR layers: right after their gradients): the optimizer's own pass never runs."""
    def own_pass(self) -> None:
        raise AssertionError("plain SGD made a pass of its own over the parameters")

    monkeypatch.setattr(SGD, "step", own_pass)
    train_and_compare(mpi_tmp_path, "plain_sgd", dtype, strategy)


@pytest.mark.parametrize("case, dropout", [("softmax", 0.0), ("regression", 0.0),
                                           ("softmax", 0.3)])
@pytest.mark.parametrize("dtype", dtypes())
@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_the_output_layers_exchange_in_parts_equals_reference(strategy, dtype, case, dropout,
                                                              mpi_tmp_path, monkeypatch):
    """Across nodes the GEMMs run in parts and the output layer's exchange moves in parts of
    the batch, posted and taken as the layer below computes (``Engine.split_output``);
    forced here on one host. The parts must be used wherever there is more than one rank."""
    monkeypatch.setenv("MPINN_OVERLAP_PARTS", "4")
    posted: list[slice] = []
    post = ExchangePlan.start_forward_part

    def counted(self, local, columns):
        posted.append(columns)
        return post(self, local, columns)

    monkeypatch.setattr(ExchangePlan, "start_forward_part", counted)
    train_and_compare(mpi_tmp_path, case, dtype, strategy, exchange="alltoallv",
                      dropout=dropout)
    assert bool(posted) == (MPI.COMM_WORLD.size > 1)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", dtypes())
@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_predict_equals_reference_for_every_strategy(strategy, dtype, case, mpi_tmp_path):
    check_prediction(mpi_tmp_path, case, dtype, strategy)


def check_prediction(mpi_tmp_path, case: str, dtype: str, strategy: str, **options) -> None:
    """Outputs written by ``predict`` (batches of 7) equal the reference; ``options`` go to
    DistributedModel (exchange=, nodes=, training=)."""
    comm = MPI.COMM_WORLD
    c = CASES[case]
    model_path, data_path, x, _ = make_files(mpi_tmp_path, c, dtype, comm)
    out_path = str(mpi_tmp_path / "preds.h5")
    with DistributedModel(model_path, comm, choice(strategy, c["sizes"], comm.size), 7,
                          **options) as model:
        data = load(data_path, model.table, model.spec.dtype, comm)
        outputs = predict(model, data, 7)
        datafile.write_outputs(out_path, N_SAMPLES, c["sizes"][-1], model.shard.layers[-1].rows,
                          outputs, comm)
    with h5py.File(out_path, "r") as f:
        written = f["outputs"][...]
    _, acts = Reference.from_file(model_path).forward(x)
    assert written.dtype == np.dtype(dtype)
    assert_close(written, acts[-1], dtype, "outputs")


@pytest.mark.parametrize("case", ["softmax", "sparse"])
@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_gradients_of_owned_rows_equal_reference(strategy, case, mpi_tmp_path):
    check_gradients(mpi_tmp_path, case, strategy, with_targets=False)


def check_gradients(mpi_tmp_path, case: str, strategy: str, with_targets: bool,
                    **options) -> None:
    """Each rank's weight and bias gradients of one float64 batch equal the reference's rows;
    ``with_targets`` passes the data's targets to the loss; ``options`` go to DistributedModel."""
    comm = MPI.COMM_WORLD
    c = CASES[case]
    model_path, data_path, x, y = make_files(mpi_tmp_path, c, "float64", comm)
    ref = Reference.from_file(model_path)
    _, gw, gb = ref.loss_and_grads(x[:BATCH], y[:BATCH])
    with DistributedModel(model_path, comm, choice(strategy, c["sizes"], comm.size), BATCH,
                          **options) as model:
        data = load(data_path, model.table, model.spec.dtype, comm)
        xb, labels, targets = data.batch(np.arange(BATCH))
        engine = model.engine
        engine.loss_and_grad(engine.forward(xb), labels, targets if with_targets else None)
        engine.backward()
        for i, layer in enumerate(model.shard.layers):
            with layer.file_order(engine.grad_weight[i]) as grad_weight:
                assert_close(grad_weight, _rows_of(gw[i], ref.weights[i], layer.rows), "float64",
                             f"layer {i + 1} weight gradient")
            assert_close(engine.grad_bias[i], gb[i][layer.rows], "float64", f"layer {i + 1} bias grad")


@pytest.mark.parametrize("case", ["softmax", "mixed"])
@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_each_rank_reads_only_its_own_rows(strategy, case, mpi_tmp_path):
    comm = MPI.COMM_WORLD
    c = CASES[case]
    model_path, data_path, _, _ = make_files(mpi_tmp_path, c, "float32", comm)
    ref = Reference.from_file(model_path)
    comm.Barrier()
    hdf5.READ_STATS.clear()
    with DistributedModel(model_path, comm, choice(strategy, c["sizes"], comm.size), BATCH) as model:
        load(data_path, model.table, model.spec.dtype, comm)
        share = 0
        for ly, weight in zip(model.spec.layers, ref.weights, strict=True):
            rows = model.table.rows(ly.index, comm.rank)
            group = f"/layers/{ly.index}"
            if ly.sparse:
                entries = int(np.diff(weight.indptr)[rows].sum())
                assert hdf5.READ_STATS[f"{group}/data"] == entries
                assert hdf5.READ_STATS[f"{group}/indices"] == entries
                assert hdf5.READ_STATS[f"{group}/indptr"] == 2 * rows.size  # starts and ends
            else:
                entries = rows.size * ly.n_in
                assert hdf5.READ_STATS[f"{group}/weight"] == entries
            assert hdf5.READ_STATS[f"{group}/bias"] == rows.size
            share += entries + rows.size
        assert hdf5.READ_STATS["/X"] == model.table.rows(0, comm.rank).size * N_SAMPLES
        assert model.shard.nbytes == share * 4  # its rows and nothing more


@pytest.mark.parametrize("case", ["softmax", "sparse", "mixed"])
@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_exchanged_bytes_equal_the_partition_report(strategy, case, mpi_tmp_path):
    comm = MPI.COMM_WORLD
    c = CASES[case]
    model_path, data_path, x, y = make_files(mpi_tmp_path, c, "float32", comm)
    with DistributedModel(model_path, comm, choice(strategy, c["sizes"], comm.size), BATCH) as model:
        data = load(data_path, model.table, model.spec.dtype, comm)
        xb, labels, targets = data.batch(np.arange(BATCH))
        model.engine.loss_and_grad(model.engine.forward(xb), labels, targets)
        model.engine.backward()
        with h5py.File(model_path, "r") as f:
            expected = rank_traffic(model.spec, model.table, schema.wiring_reader(f, model.spec))
        sent = sum(p.bytes_sent for p in model.engine.plans)
        received = sum(p.bytes_received for p in model.engine.plans)
        owners = [model.table.layer_owner(i) for i in range(len(c["sizes"]))]
    r = comm.rank
    assert sent == (expected.forward_send[r] + expected.backward_send[r]) * BATCH
    assert received == (expected.forward_recv[r] + expected.backward_recv[r]) * BATCH
    # and counted here from the partition and the wiring alone, without the package
    counted_sent, counted_received = counted_traffic(Reference.from_file(model_path), owners, r, comm.size)
    assert (sent, received) == (counted_sent * BATCH * 4, counted_received * BATCH * 4)


def counted_traffic(ref: Reference, owners: list[np.ndarray], me: int, nranks: int
                    ) -> tuple[int, int]:
    """Values per sample that rank ``me`` sends and receives in one forward and backward
    pass: a rank receives each input that one of its rows reads and another rank owns
    (forward), and sends back its partial sums for those inputs (backward, not for the
    data's features, which need no gradient)."""
    sent = received = 0
    for layer, weight in enumerate(ref.weights, start=1):
        inputs_owner = owners[layer - 1]
        for rank in range(nranks):
            rows = np.flatnonzero(owners[layer] == rank)
            if sp.issparse(weight):
                needed = np.unique(weight[rows].indices)
            else:
                needed = np.arange(weight.shape[1]) if rows.size else np.zeros(0, dtype=np.int64)
            remote = needed[inputs_owner[needed] != rank]
            both_ways = 2 if layer > 1 else 1
            if rank == me:
                received += remote.size
                sent += remote.size * (both_ways - 1)
            mine = int(np.count_nonzero(inputs_owner[remote] == me))
            sent += mine
            received += mine * (both_ways - 1)
    return sent, received


@pytest.mark.parametrize("case", ["softmax", "regression", "sparse"])
@pytest.mark.parametrize("dtype", dtypes())
@pytest.mark.parametrize("strategy", ["balanced", "ids", "layers"])
def test_evaluate_loss_and_accuracy_equal_reference(strategy, dtype, case, mpi_tmp_path):
    """Cross-entropy (softmax with labels) or squared error (float targets) and accuracy over
    30 samples in batches of 8: the last batch is partial."""
    comm = MPI.COMM_WORLD
    c = CASES[case]
    model_path, data_path, x, y = make_files(mpi_tmp_path, c, dtype, comm)
    with DistributedModel(model_path, comm, choice(strategy, c["sizes"], comm.size), BATCH) as model:
        loss, accuracy = evaluate(model, load(data_path, model.table, model.spec.dtype, comm), BATCH)
    ref = Reference.from_file(model_path)
    expected, _, _ = ref.loss_and_grads(x, y)  # the mean over all samples in one batch
    assert_close(loss, expected, dtype, "evaluate's loss")
    if c["labels"]:
        assert accuracy == np.mean(ref.forward(x)[1][-1].argmax(axis=1) == y)
        assert 0 < accuracy < 1  # a number that can be wrong
    else:
        assert accuracy is None


def test_stored_partition_for_another_rank_count_is_refused_on_every_rank(mpi_tmp_path):
    comm = MPI.COMM_WORLD
    c = CASES["softmax"]
    model_path, _, _, _ = make_files(mpi_tmp_path, c, "float32", comm)
    from mpinn.tools.inspect import store_partition
    store_partition(model_path, comm.size + 1, "balanced", {}, "wrong", comm)
    with pytest.raises(MpinnError, match=f"made for {comm.size + 1} ranks but the job has {comm.size}"):
        DistributedModel(model_path, comm, PartitionChoice("wrong"), BATCH)


@pytest.mark.parametrize("micro_batches", [2, 3, 8])
@pytest.mark.parametrize("strategy", ["layers", "balanced", "ids"])
def test_pipelined_training_equals_reference(strategy, micro_batches, mpi_tmp_path):
    train_and_compare(mpi_tmp_path, "softmax", "float64", strategy, micro_batches)
    train_and_compare(mpi_tmp_path, "regression", "float32", strategy, micro_batches)
    train_and_compare(mpi_tmp_path, "mixed", "float64", strategy, micro_batches)
    train_and_compare(mpi_tmp_path, "sparse", "float32", strategy, micro_batches)


@pytest.mark.parametrize("case", ["sparse", "mixed"])
@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_sparse_exchange_moves_only_the_remote_inputs_rows_name(strategy, case, mpi_tmp_path):
    """Forward volume = (remote input, reading rank) pairs x batch, counted from the wiring."""
    comm = MPI.COMM_WORLD
    c = CASES[case]
    model_path, data_path, _, _ = make_files(mpi_tmp_path, c, "float64", comm)
    ref = Reference.from_file(model_path)
    with DistributedModel(model_path, comm, choice(strategy, c["sizes"], comm.size), BATCH) as model:
        data = load(data_path, model.table, model.spec.dtype, comm)
        xb, _, _ = data.batch(np.arange(BATCH))
        model.engine.forward(xb)
        table = model.table
        for ly, weight, plan in zip(model.spec.layers, ref.weights, model.engine.plans, strict=True):
            mine = np.isin(np.arange(ly.n_out), table.rows(ly.index, comm.rank))
            named = (np.unique(weight[mine].indices) if ly.sparse  # inputs my rows name
                     else np.arange(ly.n_in) if mine.any() else np.zeros(0, int))
            remote = np.count_nonzero(table.layer_owner(ly.index - 1)[named] != comm.rank)
            assert plan.bytes_received == remote * BATCH * 8, f"layer {ly.index}"


@pytest.mark.parametrize("strategy", ["balanced", "mincut"])
def test_dropping_dead_samples_keeps_the_live_outputs_and_checks_less_once_none_die(
        strategy, mpi_tmp_path):
    """RadiX-Net of 40 layers, 64 samples, most dying out within the first ten layers: the
    outputs of the samples the engine keeps equal the reference's, every sample it dropped
    is zero at the end in the reference, and the ranks check for dead samples after every
    layer while samples die, then after 2, 4, ... up to 16 layers while none does."""
    longest_gap = 16  # the documented schedule: checks every 1, 2, 4, ... up to 16 layers
    from mpinn.tools.graphchallenge import make_challenge

    comm = MPI.COMM_WORLD
    n, n_layers, samples = 1024, 40, 64
    model_path, data_path = str(mpi_tmp_path / "m.h5"), str(mpi_tmp_path / "d.h5")
    make_challenge(model_path, data_path, n, n_layers, samples, comm=comm)
    with h5py.File(data_path, "r") as f:
        x = f["X"][...]
    _, acts = Reference.from_file(model_path).forward(x)
    dead_after = [np.flatnonzero(~a.any(axis=1)) for a in acts[1:]]  # per layer, in order
    with DistributedModel(model_path, comm, choice(strategy, [n] * (n_layers + 1), comm.size),
                          samples, training=False) as model:
        data = load(data_path, model.table, model.spec.dtype, comm)
        xb, _, _ = data.batch(np.arange(samples))
        engine = model.engine
        checked: list[int] = []  # the live batch before each check
        drop = engine._drop_dead
        engine._drop_dead = lambda a: (checked.append(a.shape[1]), drop(a))[1]
        outputs = engine.forward(xb, drop_dead=True)
    rows = model.shard.layers[-1].rows
    assert_close(outputs.T, acts[-1][np.ix_(engine.live, rows)], "float32", "live outputs")
    assert np.all(acts[-1][np.setdiff1d(np.arange(samples), engine.live)] == 0)
    assert 0 < engine.live.size < samples
    # the schedule, replayed from the reference's dead samples: the live batch at each check
    expected, live, check_at, interval = [], samples, 0, 1
    for i in range(n_layers - 1):
        if i < check_at:
            continue
        expected.append(live)
        after = samples - dead_after[i].size
        interval = 1 if after < live else min(2 * interval, longest_gap)
        live, check_at = after, i + interval
    assert checked == expected
    assert len(checked) < n_layers // 2, "checks should thin out once no sample dies"
