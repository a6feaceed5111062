"""Data x neuron parallelism (``--replicas R``): R groups of Q ranks, each a copy of the
partitioned model taking a share of every batch, give the single-process reference's
results with the same global batch.

Run under mpirun at 1, 2, 3 and 4 ranks (``make test-mpi``): R x Q covers 1x2, 2x1, 1x3,
3x1, 2x2, 4x1 (and 1x1, 1x4). R = 1 with every strategy is also test_engine_mpi's case.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import time

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from mpinn.api import Network
from mpinn.comm import replicas as comm_replicas
from mpinn.comm.replicas import gradient_buckets, replica_shares
from mpinn.config import TrainConfig
from mpinn.errors import MpinnError
from mpinn.io import schema
from mpinn.io.datafile import load
from mpinn.model import DistributedModel
from mpinn.partition.choice import PartitionChoice
from mpinn.train import evaluate, predict, train
from tests.helpers import ALL_STRATEGIES, dtypes, strategy_params
from tests.mpi.test_engine import (
    BATCH,
    CASES,
    N_SAMPLES,
    _values,
    choice,
    make_files,
    train_and_compare,
)
from tests.reference import Reference, assert_close

REPLICAS = (1, 2, 3, 4)


def layout(replicas: int) -> int:
    """Q, the ranks of a group, or skip where R does not divide this job's ranks."""
    size = MPI.COMM_WORLD.size
    if size % replicas:
        pytest.skip(f"R = {replicas} does not divide {size} ranks")
    return size // replicas


def assert_weights_equal(path: str, ref: Reference, dtype: str, what: str) -> None:
    trained = Reference.from_file(path)
    for i in range(len(ref.weights)):
        assert_close(_values(trained.weights[i]), _values(ref.weights[i]), dtype,
                     f"{what}: layer {i + 1} weight")
        assert_close(trained.biases[i], ref.biases[i], dtype, f"{what}: layer {i + 1} bias")


def train_replicated(tmp, case: str, dtype: str, strategy: str, replicas: int,
                     batch: int = BATCH, micro_batches: int = 1) -> None:
    """Train EPOCHS epochs with R replicas and in the reference; losses and weights agree
    (skipped where R does not divide this job's ranks)."""
    layout(replicas)
    train_and_compare(tmp, case, dtype, strategy, micro_batches, replicas=replicas, batch=batch)


def test_shares_are_contiguous_and_cover_the_batch():
    for n in range(0, 12):
        for r in range(1, 6):
            bounds = replica_shares(n, r)
            assert bounds[0] == 0 and bounds[-1] == n
            sizes = np.diff(bounds)
            assert sizes.min() >= 0 and sizes.max() - sizes.min() <= 1


def test_gradient_buckets_close_at_the_size_and_at_the_first_layer():
    assert gradient_buckets([5, 5, 5, 5], 10) == [2, 0]  # layers 3+2, then 1+0
    assert gradient_buckets([5, 5, 5], 10) == [1, 0]     # 2+1, then 0 alone
    assert gradient_buckets([100, 1, 1], 10) == [0]      # 2+1+0: never 10 before layer 0
    assert gradient_buckets([1, 20, 1], 10) == [1, 0]
    assert gradient_buckets([3, 3, 3], 1) == [2, 1, 0]   # one per layer
    assert gradient_buckets([0, 0], 1) == [0]            # a rank with no rows: one, empty


@pytest.mark.mpi
@pytest.mark.parametrize("bucket_bytes", [1, 300])
@pytest.mark.parametrize("replicas", (2, 3, 4))
def test_gradients_summed_in_several_buckets_train_the_reference(replicas, bucket_bytes,
                                                                 mpi_tmp_path, monkeypatch):
    """One bucket per layer (1 byte) and buckets of some layers (300 bytes: the Iallreduce
    buckets overlapping backward, then the blocking last one), plain and pipelined."""
    monkeypatch.setattr(comm_replicas, "BUCKET_BYTES", bucket_bytes)
    train_replicated(mpi_tmp_path, "mixed", "float64", "ids", replicas)
    train_replicated(mpi_tmp_path, "softmax", "float32", "layers", replicas, micro_batches=2)
    train_replicated(mpi_tmp_path, "softmax", "float64", "balanced", replicas, batch=replicas - 1)


@pytest.mark.mpi
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", dtypes())
@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
@pytest.mark.parametrize("replicas", REPLICAS)
def test_replicated_training_equals_reference_for_every_strategy(replicas, strategy, dtype, case,
                                                                mpi_tmp_path):
    if replicas == 1 and (strategy, case) != ("balanced", "softmax"):
        pytest.skip("R = 1 is the plain layout: tests/mpi/test_engine.py covers every strategy")
    if replicas == MPI.COMM_WORLD.size and strategy != "balanced":
        pytest.skip("R = P: groups of one rank own every neuron whatever the strategy")
    train_replicated(mpi_tmp_path, case, dtype, strategy, replicas)


@pytest.mark.mpi
@pytest.mark.parametrize("replicas", (2, 3, 4))
def test_batches_smaller_than_replicas_leave_groups_idle_and_still_equal_reference(
        replicas, mpi_tmp_path):
    """Batch R - 1: one group has no sample in every batch (zero gradients, still summed)."""
    train_replicated(mpi_tmp_path, "softmax", "float64", "balanced", replicas, batch=replicas - 1)
    train_replicated(mpi_tmp_path, "mixed", "float64", "ids", replicas, batch=replicas - 1)


@pytest.mark.mpi
@pytest.mark.parametrize("micro_batches", [2, 3])
@pytest.mark.parametrize("replicas", (2, 3, 4))
def test_pipelined_replicated_training_equals_reference(replicas, micro_batches, mpi_tmp_path):
    train_replicated(mpi_tmp_path, "softmax", "float64", "layers", replicas,
                     micro_batches=micro_batches)
    train_replicated(mpi_tmp_path, "regression", "float32", "balanced", replicas,
                     micro_batches=micro_batches)
    train_replicated(mpi_tmp_path, "sparse", "float64", "balanced", replicas, batch=3,
                     micro_batches=micro_batches)


@pytest.mark.mpi
@pytest.mark.parametrize("replicas", (2, 3, 4))
def test_every_training_option_agrees_with_one_replica(replicas, mpi_tmp_path):
    """Dropout (masks by global sample index), clipping (the global norm), weight decay,
    a schedule with warmup, validation and patience: R replicas train the same model as
    R = 1 on the same ranks (the reference has no clipping or schedules)."""
    comm = MPI.COMM_WORLD
    q = layout(replicas)
    c = CASES["softmax"]
    model_path, data_path, _, _ = make_files(mpi_tmp_path, c, "float64", comm)
    plain = str(mpi_tmp_path / "plain.h5")
    if comm.rank == 0:
        shutil.copy(model_path, plain)
    comm.Barrier()
    options = dict(epochs=3, batch_size=BATCH, lr=0.2, optimizer="adamw", seed=4,
                   validation_data=data_path, patience=1, schedule="cosine", warmup_steps=3,
                   weight_decay=0.01, clip_norm=0.05, dropout=0.3)
    histories = []
    for path, r, strategy in ((plain, 1, "balanced"), (model_path, replicas, "ids")):
        with Network.open(path, strategy, replicas=r,
                          **_api_params(strategy, c["sizes"], comm.size // r)) as net:
            histories.append(net.fit(data_path, **options))
    plain_h, replicated_h = histories
    assert len(plain_h) == len(replicated_h)
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert_close(np.array(replicated_h[key], dtype=float), np.array(plain_h[key], dtype=float),
                     "float64", key)
    assert replicated_h.stopped_early == plain_h.stopped_early
    assert_weights_equal(model_path, Reference.from_file(plain), "float64", f"R={replicas} Q={q}")
    comm.Barrier()


def _api_params(strategy: str, sizes: list[int], nranks: int) -> dict:
    params = strategy_params(strategy, sizes, nranks)
    return {"ids": params["ids"]} if strategy == "ids" else {}


@pytest.mark.mpi
@pytest.mark.parametrize("replicas", REPLICAS)
def test_resume_from_a_replicated_checkpoint_equals_reference(replicas, mpi_tmp_path):
    """Adam's moments and the counters written by group 0 with R replicas carry a run
    resumed with R replicas and with R = 1 on to the reference's weights."""
    comm = MPI.COMM_WORLD
    q = layout(replicas)
    c = CASES["regression"]
    model_path, data_path, x, y = make_files(mpi_tmp_path, c, "float64", comm)
    ref = Reference.from_file(model_path)
    comm.Barrier()
    ref.train(x, y, 3, BATCH, c["lr"], "adam", seed=11)
    other = str(mpi_tmp_path / "other.h5")
    with DistributedModel(model_path, comm, choice("percentage", c["sizes"], q), BATCH,
                          replicas=replicas) as model:
        data = load(data_path, model.table, model.spec.dtype, comm, model.group)
        train(model, data, TrainConfig(epochs=2, batch_size=BATCH, lr=c["lr"], optimizer="adam",
                                       seed=11))
    if comm.rank == 0:
        shutil.copy(model_path, other)
        with h5py.File(model_path, "r") as f:
            assert schema.read_state_attrs(f)["epoch"] == 2
    comm.Barrier()
    for path, r in ((model_path, replicas), (other, 1)):
        with DistributedModel(path, comm, choice("balanced", c["sizes"], comm.size // r), BATCH,
                              replicas=r) as model:
            data = load(data_path, model.table, model.spec.dtype, comm, model.group)
            train(model, data, TrainConfig(epochs=3, batch_size=BATCH, lr=c["lr"],
                                           optimizer="adam", seed=11, resume=True))
        assert_weights_equal(path, ref, "float64", f"resumed with R={r} from R={replicas}")
    comm.Barrier()


WRITE = 0.5  # seconds a slowed checkpoint write takes on the writing group


@pytest.mark.mpi
@pytest.mark.parametrize("replicas", (2, 3, 4))
def test_every_group_counts_the_checkpoint_it_waits_for_as_io(replicas, mpi_tmp_path):
    """Only group 0 writes; the others wait for it. ``seconds_io`` counts that wait on every
    rank, so a step time without checkpoints (train_mlp's) is not charged the write on the
    groups that do not write, and the gradient sum's wait is the reducer's."""
    comm = MPI.COMM_WORLD
    q = layout(replicas)
    c = CASES["regression"]
    model_path, data_path, _, _ = make_files(mpi_tmp_path, c, "float64", comm)
    with DistributedModel(model_path, comm, choice("balanced", c["sizes"], q), BATCH,
                          replicas=replicas) as model:
        data = load(data_path, model.table, model.spec.dtype, comm, model.group)
        if model.groups.index == 0:  # the writers take WRITE seconds longer than the reopen
            write = model._write_group
            model._write_group = lambda *args: (time.sleep(WRITE), write(*args))[1]
        comm.Barrier()
        train(model, data, TrainConfig(epochs=1, batch_size=BATCH, lr=c["lr"]))
        io, wait = model.seconds_io, model.engine.reducer.seconds_wait
    everyone = comm.allgather((io, wait))
    # before, a group that does not write counted only its reopen (2 ms here) as I/O and
    # its wait went unnamed
    assert all(io >= WRITE and wait > 0 for io, wait in everyone), everyone


@pytest.mark.mpi
@pytest.mark.parametrize("micro_batches", [1, 2])
@pytest.mark.parametrize("replicas", (2, 3, 4))
def test_a_preempted_replicated_run_resumes_bitwise_as_an_uninterrupted_one(
        replicas, micro_batches, mpi_tmp_path):
    """SIGUSR1 on the last rank after epoch 2 stops every group at its next step (the
    pipeline has posted its gradient sums by then: they are completed, unused); --resume
    goes on to the uninterrupted run's weights. Batch 5 leaves a group idle at R = 4
    and in the last, partial batch."""
    import os
    import signal
    comm = MPI.COMM_WORLD
    layout(replicas)
    c = CASES["softmax"]
    paths = {}
    for name in ("whole", "split"):
        (mpi_tmp_path / name).mkdir(exist_ok=True)
        paths[name], data_path, _, _ = make_files(mpi_tmp_path / name, c, "float64", comm)
    options = dict(batch_size=5, lr=0.1, momentum=0.9, seed=11, micro_batches=micro_batches)
    with Network.open(paths["whole"], replicas=replicas) as net:
        uninterrupted = net.fit(data_path, epochs=4, **options)

    def preempt(record: dict) -> None:
        if record["epoch"] == 2 and comm.rank == comm.size - 1:
            os.kill(os.getpid(), signal.SIGUSR1)

    with Network.open(paths["split"], replicas=replicas) as net:
        first = net.fit(data_path, epochs=4, callbacks=[preempt], **options)
    assert first.stopped_by is not None and first.epoch == 2
    with Network.open(paths["split"], replicas=replicas) as net:
        rest = net.fit(data_path, epochs=4, resume=True, **options)
    assert first["loss"] + rest["loss"] == uninterrupted["loss"]
    whole, split = Reference.from_file(paths["whole"]), Reference.from_file(paths["split"])
    for a, b in zip(whole.weights + whole.biases, split.weights + split.biases, strict=True):
        assert np.array_equal(_values(a), _values(b))
    comm.Barrier()


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", dtypes())
@pytest.mark.parametrize("case", ["softmax", "regression", "sparse"])
@pytest.mark.parametrize("replicas", (2, 3, 4))
def test_replicated_evaluate_and_predict_equal_reference(replicas, case, dtype, mpi_tmp_path):
    comm = MPI.COMM_WORLD
    q = layout(replicas)
    c = CASES[case]
    model_path, data_path, x, y = make_files(mpi_tmp_path, c, dtype, comm)
    ref = Reference.from_file(model_path)
    expected_loss, _, _ = ref.loss_and_grads(x, y)
    _, acts = ref.forward(x)
    with DistributedModel(model_path, comm, choice("ids", c["sizes"], q), 7,
                          replicas=replicas) as model:
        data = load(data_path, model.table, model.spec.dtype, comm, model.group)
        loss, accuracy = evaluate(model, data, 7)
        outputs = predict(model, data, 7)
        rows = model.shard.layers[-1].rows
    assert_close(loss, expected_loss, dtype, "evaluate's loss")
    if c["labels"]:
        assert accuracy == np.mean(acts[-1].argmax(axis=1) == y)
    assert outputs.shape == (rows.size, N_SAMPLES)
    assert_close(outputs, acts[-1][:, rows].T, dtype, "my rows of the outputs")
    with Network.open(model_path, "ids", ids=strategy_params("ids", c["sizes"], q)["ids"],
                      replicas=replicas) as net:
        assert_close(net.predict(x), acts[-1], dtype, "Network.predict")
    comm.Barrier()


@pytest.mark.mpi
def test_replicas_that_do_not_divide_the_ranks_are_refused_on_every_rank(mpi_tmp_path):
    comm = MPI.COMM_WORLD
    model_path, _, _, _ = make_files(mpi_tmp_path, CASES["softmax"], "float32", comm)
    with pytest.raises(MpinnError, match=f"--replicas {comm.size + 1} does not divide the "
                                         f"{comm.size} ranks"):
        DistributedModel(model_path, comm, PartitionChoice(), BATCH, replicas=comm.size + 1)
    with pytest.raises(MpinnError, match="open: replicas must be a whole number >= 1, got 0"):
        Network.open(model_path, replicas=0)
    if comm.size % 2 == 0:  # a stored partition must be made for Q ranks, not P
        from mpinn.tools.inspect import store_partition
        store_partition(model_path, comm.size, "balanced", {}, "whole", comm)
        with pytest.raises(MpinnError, match=f"made for {comm.size} ranks but the job has "
                                             f"{comm.size // 2}"):
            DistributedModel(model_path, comm, PartitionChoice("whole"), BATCH, replicas=2)


# ---------------------------------------------------------------- the command line


def test_cli_trains_evaluates_and_predicts_with_replicas_and_refuses_bad_ones(tmp_path):
    """2 ranks: --replicas 2 trains the same file as --replicas 1 (the config-file key too),
    predicts the same outputs; --replicas 0 and 3 are one-line refusals that change nothing."""
    from tests.system.test_cli import digest, mpinn, ok
    from tests.system.test_user_mistakes import refused
    base = tmp_path / "m.h5"
    data = tmp_path / "d.h5"
    ok(mpinn(1, "init", str(base), "--sizes", "12,16,5", "--seed", "2"))
    ok(mpinn(1, "data", "classification", str(data), "--samples", "50", "--features", "12",
             "--outputs", "5", "--seed", "3"))
    paths = {}
    for r in (1, 2):
        path = tmp_path / f"r{r}.h5"
        shutil.copy(base, path)
        config = tmp_path / f"r{r}.toml"
        config.write_text(f"[train]\nreplicas = {r}\nepochs = 2\nbatch-size = 9\nlr = 0.3\n"
                          "momentum = 0.5\n")
        out = ok(mpinn(2, "--config", str(config), "train", str(path), "--data", str(data)))
        assert ("on 2 ranks = 2 replicas x 1" in out) == (r == 2)
        ok(mpinn(2, "predict", str(path), "--data", str(data), "--out",
                 str(tmp_path / f"p{r}.h5"), "--replicas", str(r)))
        paths[r] = path
    assert_weights_equal(str(paths[2]), Reference.from_file(str(paths[1])), "float32", "CLI R=2")
    with h5py.File(tmp_path / "p1.h5") as f1, h5py.File(tmp_path / "p2.h5") as f2:
        assert_close(f2["outputs"][...], f1["outputs"][...], "float32", "predict --replicas 2")
    evaluated = [ok(mpinn(2, "evaluate", str(paths[1]), "--data", str(data), "--replicas", r)).split()
                 for r in ("1", "2")]  # "loss L  accuracy A  samples N"
    assert evaluated[0][2:] == evaluated[1][2:]
    assert_close(float(evaluated[1][1]), float(evaluated[0][1]), "float32", "evaluate --replicas 2")
    before = digest(paths[1])
    refused(mpinn(2, "train", str(paths[1]), "--data", str(data), "--replicas", "0"),
            "--replicas must be at least 1, got 0")
    refused(mpinn(2, "train", str(paths[1]), "--data", str(data), "--replicas", "3"),
            "--replicas 3 does not divide the 2 ranks")
    bad = tmp_path / "bad.toml"
    bad.write_text('[evaluate]\nreplicas = "two"\n')
    result = mpinn(2, "--config", str(bad), "evaluate", str(paths[1]), "--data", str(data))
    assert result.returncode == 1 and "replicas" in result.stderr
    assert digest(paths[1]) == before


def test_replicas_auto_trains_the_layout_it_prints_and_equals_one_replica(tmp_path):
    """2 ranks: --replicas auto probes, prints every candidate with the chosen one marked,
    and trains to the weights of --replicas 1 (any layout equals the reference); "auto" is
    a config value too; a stored partition fixes Q; anything else is a one-line refusal."""
    from tests.system.test_cli import digest, mpinn, ok
    from tests.system.test_user_mistakes import refused
    base = tmp_path / "m.h5"
    data = tmp_path / "d.h5"
    ok(mpinn(1, "init", str(base), "--sizes", "12,16,16,5", "--seed", "4", "--dtype", "float64"))
    ok(mpinn(1, "data", "classification", str(data), "--samples", "40", "--features", "12",
             "--outputs", "5", "--seed", "5", "--dtype", "float64"))
    one, auto = tmp_path / "one.h5", tmp_path / "auto.h5"
    shutil.copy(base, one)
    shutil.copy(base, auto)
    flags = ["--data", str(data), "--epochs", "2", "--batch-size", "8", "--lr", "0.2"]
    ok(mpinn(2, "train", str(one), *flags))
    config = tmp_path / "auto.toml"
    config.write_text('[train]\nreplicas = "auto"\n')
    out = ok(mpinn(2, "--config", str(config), "train", str(auto), *flags))
    assert "--replicas auto:" in out and "<- chosen" in out and "2x1 balanced" in out, out
    chosen = next(line for line in out.splitlines() if line.startswith("chosen:"))
    assert re.match(r"chosen: --replicas [12] --strategy (balanced|layers) --micro-batches \d+",
                    chosen), chosen
    assert_weights_equal(str(auto), Reference.from_file(str(one)), "float64", "--replicas auto")

    ok(mpinn(1, "partition", str(one), "--ranks", "2", "--name", "p2"))
    out = ok(mpinn(2, "evaluate", str(one), "--data", str(data), "--partition", "p2",
                   "--replicas", "auto"))
    assert "chosen: --replicas 1 --strategy balanced" in out, out  # Q = 2 parts: R = 1
    ok(mpinn(1, "partition", str(one), "--ranks", "3", "--name", "p3"))
    before = digest(one)
    refused(mpinn(2, "train", str(one), *flags, "--replicas", "many"),
            "--replicas: takes a whole number or auto, not 'many'")
    refused(mpinn(2, "train", str(one), *flags, "--partition", "p3", "--replicas", "auto"),
            "partition 'p3' has 3 parts, which do not divide the 2 ranks")
    assert digest(one) == before


# ---------------------------------------------------------------- loading: read or broadcast


def _load_both_ways(path: str, sizes: list[int], replicas: int, q: int) -> dict:
    comm = MPI.COMM_WORLD
    shards = {}
    for how in ("read", "bcast"):
        with DistributedModel(path, comm, choice("ids", sizes, q), BATCH, replicas=replicas,
                              replica_load=how) as model:
            shards[how] = model.shard
    return shards


@pytest.mark.mpi
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("replicas", (2, 3, 4))
def test_a_shard_broadcast_from_group_0_is_bitwise_the_one_read_from_the_file(replicas, case,
                                                                             mpi_tmp_path):
    """Every array of every layer (weights in receive order, bias, rows, the CSR blocks)
    that group 0 broadcasts is the one the rank would have read itself; and training from
    either trains bitwise the same weights."""
    comm = MPI.COMM_WORLD
    q = layout(replicas)
    c = CASES[case]
    model_path, data_path, _, _ = make_files(mpi_tmp_path, c, "float32", comm)
    copy = str(mpi_tmp_path / "copy.h5")
    if comm.rank == 0:
        shutil.copy(model_path, copy)
    comm.Barrier()
    shards = _load_both_ways(model_path, c["sizes"], replicas, q)
    read, sent = shards["read"], shards["bcast"]
    assert read.rank == sent.rank == comm.rank % q
    for i, (a, b) in enumerate(zip(read.layers, sent.layers, strict=True)):
        assert type(a) is type(b) and a.spec == b.spec
        for field in dataclasses.fields(a):
            x, y = getattr(a, field.name), getattr(b, field.name)
            if isinstance(x, np.ndarray):
                assert x.dtype == y.dtype and x.shape == y.shape, (i, field.name)
                assert np.array_equal(x, y), f"layer {i + 1} {field.name}"
            else:
                assert x == y, (i, field.name)
    for path, how in ((model_path, "read"), (copy, "bcast")):
        with DistributedModel(path, comm, choice("ids", c["sizes"], q), BATCH, replicas=replicas,
                              replica_load=how) as model:
            data = load(data_path, model.table, model.spec.dtype, comm, model.group)
            train(model, data, TrainConfig(epochs=2, batch_size=BATCH, lr=c["lr"],
                                           optimizer=c["optimizer"], momentum=c["momentum"],
                                           seed=11))
    comm.Barrier()
    one, other = Reference.from_file(model_path), Reference.from_file(copy)
    for a, b in zip(one.weights + one.biases, other.weights + other.biases, strict=True):
        assert np.array_equal(_values(a), _values(b))
    comm.Barrier()


@pytest.mark.mpi
@pytest.mark.parametrize("replicas", (2, 4))
def test_a_broken_file_read_by_group_0_only_is_refused_on_every_rank(replicas, mpi_tmp_path):
    """A CSR layer with an index out of range, found by the rank of group 0 that reads the
    row while the other groups wait to receive: every rank raises it, none hangs."""
    comm = MPI.COMM_WORLD
    q = layout(replicas)
    c = CASES["sparse"]
    model_path, _, _, _ = make_files(mpi_tmp_path, c, "float32", comm)
    if comm.rank == 0:
        with h5py.File(model_path, "r+") as f:
            f["layers/2/indices"][0] = 1000
    comm.Barrier()
    with pytest.raises(MpinnError, match="indices holds 1000, outside 0..12"):
        DistributedModel(model_path, comm, choice("balanced", c["sizes"], q), BATCH,
                         replicas=replicas, replica_load="bcast")
    with pytest.raises(MpinnError, match="replica_load must be one of read, bcast, got 'both'"):
        DistributedModel(model_path, comm, choice("balanced", c["sizes"], q), BATCH,
                         replicas=replicas, replica_load="both")
    comm.Barrier()
