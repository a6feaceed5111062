"""Learning-rate schedules, weight decay, AdamW, gradient clipping, validation with
patience and keep-best, dropout, and the gelu, silu and leaky_relu activations against
PyTorch; resuming a run preempted in the middle of an epoch.

PyTorch is the oracle: the same initial weights (``torch_io.to_torch``), the same batches,
torch's own optimizers, schedulers and ``clip_grad_norm_``, mpinn's dropout masks fed in
place of ``nn.Dropout``'s, float64; mpinn's weights after ``Network.fit`` must agree within
1e-10 at every rank count (``make test-mpi``) and for every partition strategy. Skipped
where torch is not installed. The pure parts (the schedule's formulas, the clip factor)
are checked without MPI.
"""

from __future__ import annotations

import json
import math
import os
import signal
from collections.abc import Callable
from importlib.util import find_spec
from typing import TypeVar

import h5py
import numpy as np
import pytest

from mpinn.errors import MpinnError
from mpinn.optim import Schedule, clip_coefficient
from tests.helpers import (
    ALL_STRATEGIES,
    assert_same_checkpoint,
    classification_data,
    regression_data,
    strategy_params,
)
from tests.reference import assert_close

N_SAMPLES, BATCH, EPOCHS = 30, 8, 3  # 4 steps per epoch, the last batch partial

FEATURES = {
    "sgd-momentum-decay-step": dict(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=0.1,
                                    schedule="step", step_size=1, gamma=0.5),
    "adam-decay-cosine": dict(optimizer="adam", lr=0.02, weight_decay=0.1, schedule="cosine",
                              min_lr=0.001),
    "adamw-warmup": dict(optimizer="adamw", lr=0.02, weight_decay=0.5, warmup_steps=5),
    "sgd-clip-cosine-warmup": dict(optimizer="sgd", lr=0.2, clip_norm=0.05, schedule="cosine",
                                   warmup_steps=3),
    "adam-clip": dict(optimizer="adam", lr=0.02, clip_norm=0.05),
}
CASES = {  # (sizes, hidden, output, labels)
    "softmax": ([7, 13, 11, 5], ["relu", "tanh"], "softmax", True),
    "regression": ([6, 9, 4], ["sigmoid"], "identity", False),
    # the smooth and leaky activations, a leaky output on float targets
    "activations": ([7, 13, 11, 9, 5], ["gelu", "silu", "leaky_relu"], "leaky_relu", False),
}
SLOPE = 0.2  # leaky_relu's negative slope in these tests (torch's default is 0.01)
T = TypeVar("T")


def torch_run(path: str, x: np.ndarray, y: np.ndarray, labels: bool, epochs: int, seed: int,
              optimizer: str = "sgd", lr: float = 0.1, momentum: float = 0.0,
              weight_decay: float = 0.0, schedule: str = "constant", step_size: int = 1,
              gamma: float = 0.1, min_lr: float = 0.0, warmup_steps: int = 0,
              clip_norm: float = 0.0, dropout: bool | float = False,
              on_epoch=None) -> tuple[list[np.ndarray], float]:
    """Weights then biases after training with torch, and the largest gradient norm seen.

    ``dropout``: True trains with the file's dropout rates, a number with that rate on
    every hidden layer, with mpinn's masks (``fed_masks``). ``on_epoch(model)`` runs after
    each epoch (the model in eval mode); returning False stops training."""
    torch = pytest.importorskip("torch")
    from mpinn.io.pytorch import to_torch
    model = fed_masks(to_torch(path), seed, dropout).train()
    if labels:
        model = model[:-1]  # cross-entropy takes the logits
    params = list(model.parameters())
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    elif optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    per_batch, per_epoch = [], []
    steps = epochs * math.ceil(len(x) / BATCH)
    if schedule == "cosine":
        per_batch.append(torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps,
                                                                    eta_min=min_lr))
    elif schedule == "step":
        per_epoch.append(torch.optim.lr_scheduler.StepLR(opt, step_size=step_size, gamma=gamma))
    if warmup_steps:
        per_batch.append(torch.optim.lr_scheduler.LinearLR(
            opt, start_factor=1 / warmup_steps, end_factor=1.0, total_iters=warmup_steps - 1))
    largest = 0.0
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    step = 0
    for epoch in range(1, epochs + 1):
        order = np.random.default_rng([seed, epoch]).permutation(len(x))
        for start in range(0, len(x), BATCH):
            idx = torch.from_numpy(order[start:start + BATCH])
            for module in model:
                if hasattr(module, "draw"):
                    module.draw(step, order[start:start + BATCH])
            step += 1
            opt.zero_grad()
            out = model(xt[idx])
            if labels:
                loss = torch.nn.functional.cross_entropy(out, yt[idx])
            else:
                loss = 0.5 * ((out - yt[idx]) ** 2).sum() / len(idx)
            loss.backward()
            if clip_norm:
                largest = max(largest, float(torch.nn.utils.clip_grad_norm_(params, clip_norm)))
            opt.step()
            for scheduler in per_batch:
                scheduler.step()
        for scheduler in per_epoch:
            scheduler.step()
        if on_epoch is not None:
            stop = on_epoch(model.eval()) is False
            model.train()
            if stop:
                break
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    return ([m.weight.detach().numpy() for m in linears]
            + [m.bias.detach().numpy() for m in linears]), largest


def fed_masks(model, seed: int, dropout: bool | float):
    """``model`` with mpinn's dropout masks of each step (``kernels.dropout_mask``) where
    mpinn drops: with ``dropout`` True, in place of each ``nn.Dropout`` (the file's stored
    rates); with a number P, after every hidden layer (``fit(dropout=P)``); else nowhere.
    torch's own generator would draw other masks than nn.Dropout's."""
    torch = pytest.importorskip("torch")
    from mpinn.kernels import dropout_mask

    class FedMask(torch.nn.Module):
        def __init__(self, p: float, gids: np.ndarray) -> None:
            super().__init__()
            self.p, self.gids, self.mask = p, gids, None

        def draw(self, step: int, samples: np.ndarray) -> None:
            self.mask = torch.from_numpy(dropout_mask(
                seed, step, self.gids, samples, self.p,
                np.empty((self.gids.size, samples.size))).T.copy())

        def forward(self, a):
            return a * self.mask if self.training else a

    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    sizes = [linears[0].in_features] + [m.out_features for m in linears]
    starts = np.cumsum([0] + sizes)

    def gids(layer: int) -> np.ndarray:
        return np.arange(starts[layer], starts[layer + 1])

    override = dropout if not isinstance(dropout, bool) else 0.0
    modules, layer = [], 0
    for module in model:
        if isinstance(module, torch.nn.Linear):
            if layer and override:
                modules.append(FedMask(override, gids(layer)))
            layer += 1
        if isinstance(module, torch.nn.Dropout):
            if dropout is True:
                modules.append(FedMask(module.p, gids(layer)))
            continue
        modules.append(module)
    return torch.nn.Sequential(*modules)


def _weights(path: str) -> list[np.ndarray]:
    with h5py.File(path, "r") as f:
        n = len(f.attrs["sizes"]) - 1
        return [f[f"layers/{i}/{name}"][...] for name in ("weight", "bias") for i in range(1, n + 1)]


def _setup(tmp, case: str) -> tuple[str, np.ndarray, np.ndarray, bool, list[int]]:
    from mpinn import Network
    sizes, hidden, output, labels = CASES[case]
    path = str(tmp / "model.h5")
    Network.create(path, sizes, hidden, output, seed=3, dtype="float64", negative_slope=SLOPE,
                   force=True)
    make = classification_data if labels else regression_data
    x, y = make(N_SAMPLES, sizes[0], sizes[-1], seed=5, dtype="float64")
    return path, x, y, labels, sizes


NO_TORCH = pytest.mark.skipif(find_spec("torch") is None, reason="torch is not installed")


def on_rank0(comm, compute: Callable[[], T]) -> T:
    """``compute()`` (the torch oracle) on rank 0, its result on every rank once rank 0 has
    built its torch model from the initial file. Every rank ran it, and imported torch for
    it: 1.6 s of CPU each, on 2 cores shared by 4 ranks. A failure on rank 0 ends the job
    (tests/conftest.py) rather than leave the others in the broadcast."""
    return comm.bcast(compute() if comm.rank == 0 else None, root=0)


@pytest.mark.mpi
@NO_TORCH
@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
@pytest.mark.parametrize("feature", FEATURES)
def test_training_features_equal_torch_for_every_strategy(feature, strategy, mpi_tmp_path):
    from mpi4py import MPI

    from mpinn import Network
    comm = MPI.COMM_WORLD
    case = "regression" if "adam-clip" in feature else "softmax"
    if feature == "adamw-warmup":
        case = "activations"
    path, x, y, labels, sizes = _setup(mpi_tmp_path, case)
    options = FEATURES[feature]
    expected, largest = on_rank0(comm, lambda: torch_run(path, x, y, labels, EPOCHS, seed=11,
                                                         **options))
    if options.get("clip_norm"):
        assert largest > options["clip_norm"], "clipping must be active for the test to mean it"
    with Network.open(path, strategy, **strategy_params(strategy, sizes, comm.size)) as net:
        net.fit(x, y, epochs=EPOCHS, batch_size=BATCH, seed=11, **options)
    for i, (got, want) in enumerate(zip(_weights(path), expected, strict=True)):
        assert_close(got, want, "float64", f"{feature} parameter {i}")


def _whole_and_split(tmp) -> tuple[dict[str, str], np.ndarray, np.ndarray]:
    """The same softmax model twice: for an uninterrupted run ("whole") and one interrupted
    and resumed ("split"); and its data."""
    paths = {}
    for name in ("whole", "split"):
        os.makedirs(tmp / name, exist_ok=True)
        paths[name], x, y, _, _ = _setup(tmp / name, "softmax")
    return paths, x, y


@pytest.mark.mpi
@pytest.mark.parametrize("feature", ["sgd-momentum-decay-step", "sgd-clip-cosine-warmup"])
def test_a_preempted_schedule_resumes_bitwise_as_an_uninterrupted_run(feature, mpi_tmp_path):
    """SIGUSR1 on one rank after epoch 2 stops the run at its next step; --resume goes on."""
    from mpi4py import MPI

    from mpinn import Network
    comm = MPI.COMM_WORLD
    options = {**FEATURES[feature], "batch_size": BATCH, "seed": 11}
    paths, x, y = _whole_and_split(mpi_tmp_path)
    with Network.open(paths["whole"]) as net:
        uninterrupted = net.fit(x, y, epochs=5, **options)

    def preempt(record: dict) -> None:
        if record["epoch"] == 2 and comm.rank == comm.size - 1:
            os.kill(os.getpid(), signal.SIGUSR1)

    with Network.open(paths["split"]) as net:
        first = net.fit(x, y, epochs=5, callbacks=[preempt], **options)
    assert first.stopped_by is not None and first.epoch == 2
    with Network.open(paths["split"]) as net:
        rest = net.fit(x, y, epochs=5, resume=True, **options)
    assert first["loss"] + rest["loss"] == uninterrupted["loss"]
    assert all(np.array_equal(a, b) for a, b in
               zip(_weights(paths["split"]), _weights(paths["whole"]), strict=True))
    with h5py.File(paths["split"], "r") as f:
        assert '"name": "' + FEATURES[feature]["schedule"] + '"' in f["state"].attrs["schedule"]


# interrupted in the middle of an epoch: schedules stepped per batch and per epoch, and
# early stopping with its best file, whose counters must carry over the interruption
MID_EPOCH = {
    "cosine-warmup": dict(optimizer="adam", lr=0.02, schedule="cosine", min_lr=0.001,
                          warmup_steps=6, epochs=4),
    "step": dict(optimizer="sgd", lr=0.1, momentum=0.9, schedule="step", step_size=2,
                 gamma=0.5, epochs=4),
    "early-stopping": dict(optimizer="adam", lr=0.08, patience=2, keep_best=True, epochs=12,
                           dropout=0.3),
}


@pytest.mark.mpi
@pytest.mark.parametrize("feature, step", [  # 4 steps per epoch: step 6 is epoch 2's second
    ("cosine-warmup", 6), ("cosine-warmup", 11), ("step", 6), ("step", 11),
    # validation losses of the run: 3 new bests, then 2 worse: patience stops it after epoch
    # 5. Step 11 is in epoch 3 (a best to come); step 18 in epoch 5, one bad epoch counted
    ("early-stopping", 11), ("early-stopping", 18)])
def test_a_run_preempted_mid_epoch_resumes_bitwise_as_an_uninterrupted_run(feature, step,
                                                                            mpi_tmp_path,
                                                                            monkeypatch):
    """SIGUSR1 reaches the last rank at the start of optimizer step ``step``, in the middle
    of an epoch: the run commits the state before that step and ``resume`` goes on. The
    model file (weights, optimizer state, schedule, early-stopping counters: every dataset
    and attribute) and MODEL.best.h5 equal those of an uninterrupted run, bit for bit."""
    from mpi4py import MPI

    from mpinn import Network, train
    from mpinn.train import best_path
    comm = MPI.COMM_WORLD
    options = {**MID_EPOCH[feature], "batch_size": BATCH, "seed": 11}
    paths, x, y = _whole_and_split(mpi_tmp_path)
    xv, yv = classification_data(12, x.shape[1], 5, seed=9, dtype="float64")
    if options.get("patience"):
        options["validation_data"] = (xv, yv)
    with Network.open(paths["whole"]) as net:
        uninterrupted = net.fit(x, y, **options)
    if options.get("patience"):  # the run the test means: a best, then patience runs out
        assert uninterrupted.stopped_early == "patience"
        assert len(uninterrupted) >= (step - 1) // 4 + 1  # it reached the step

    steps = 0

    def signal_at_step(point: str, rank: int) -> bool:
        nonlocal steps
        steps += point == "hold"
        if point == "hold" and steps == step and rank == comm.size - 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        return False

    with monkeypatch.context() as patch:
        patch.setattr(train, "inject_fault", signal_at_step)
        with Network.open(paths["split"]) as net:
            first = net.fit(x, y, **options)
    assert first.stopped_by is not None
    assert (first.epoch, first.batch) == divmod(step - 1, 4)  # mid-epoch: batch > 0
    if options.get("patience"):  # the counters the interrupted run committed
        losses = uninterrupted["val_loss"][:first.epoch]
        with h5py.File(paths["split"], "r") as f:
            assert json.loads(f["state"].attrs["best_val_loss"]) == min(losses)
            assert json.loads(f["state"].attrs["bad_epochs"]) == \
                len(losses) - 1 - losses.index(min(losses)) == (step == 18)
    with Network.open(paths["split"]) as net:
        rest = net.fit(x, y, resume=True, **options)
    assert rest.stopped_early == uninterrupted.stopped_early
    assert rest["val_loss"] == uninterrupted["val_loss"][first.epoch:]
    comm.Barrier()  # every rank's files are closed
    assert_same_checkpoint(paths["split"], paths["whole"])
    if options.get("keep_best"):
        assert_same_checkpoint(best_path(paths["split"]), best_path(paths["whole"]))


@pytest.mark.mpi
@NO_TORCH
@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_validation_patience_and_keep_best_equal_torch_for_every_strategy(strategy,
                                                                          mpi_tmp_path):
    """Validation losses and accuracies after every epoch, the epoch patience stops at, the
    final and the best weights (MODEL.best.h5) against torch; with dropout=P given to fit
    (torch with mpinn's masks), which validation runs without."""
    from mpi4py import MPI

    from mpinn import Network
    from mpinn.train import best_path
    comm = MPI.COMM_WORLD
    path, x, y, labels, sizes = _setup(mpi_tmp_path, "softmax")
    xv, yv = classification_data(12, sizes[0], sizes[-1], seed=9, dtype="float64")
    options = dict(optimizer="adam", lr=0.08)  # overfits the 30 samples: patience stops it
    patience, epochs = 2, 12

    def oracle() -> tuple[list[np.ndarray], list[tuple[float, float, list[np.ndarray]]]]:
        """torch's final weights, and its (loss, accuracy, weights) after every epoch."""
        import torch
        seen: list[tuple[float, float, list[np.ndarray]]] = []

        def validate(model) -> bool:
            with torch.no_grad():
                logits = model(torch.from_numpy(xv))
                loss = float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(yv)))
                accuracy = float((logits.argmax(dim=1).numpy() == yv).mean())
            linears = [m for m in model if isinstance(m, torch.nn.Linear)]
            seen.append((loss, accuracy, [m.weight.detach().numpy().copy() for m in linears]
                         + [m.bias.detach().numpy().copy() for m in linears]))
            losses = [v for v, _, _ in seen]
            return len(losses) - 1 - losses.index(min(losses)) < patience

        final, _ = torch_run(path, x, y, labels, epochs, seed=11, dropout=0.2,
                             on_epoch=validate, **options)
        return final, seen

    final, seen = on_rank0(comm, oracle)
    assert len(seen) < epochs, "patience must stop the run for the test to mean it"
    best = min(range(len(seen)), key=lambda e: seen[e][0])
    with Network.open(path, strategy, **strategy_params(strategy, sizes, comm.size)) as net:
        history = net.fit(x, y, epochs=epochs, batch_size=BATCH, seed=11, dropout=0.2,
                          validation_data=(xv, yv), patience=patience, keep_best=True,
                          **options)
    assert history.stopped_early == "patience" and len(history) == len(seen)
    assert_close(history["val_loss"], [v for v, _, _ in seen], "float64", "validation losses")
    assert history["val_accuracy"] == [a for _, a, _ in seen]
    for i, (got, want) in enumerate(zip(_weights(path), final, strict=True)):
        assert_close(got, want, "float64", f"final parameter {i}")
    for i, (got, want) in enumerate(zip(_weights(best_path(path)), seen[best][2], strict=True)):
        assert_close(got, want, "float64", f"best parameter {i}")


@pytest.mark.mpi
@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_gelu_silu_leaky_relu_train_as_the_reference_for_every_strategy(strategy, mpi_tmp_path):
    """The new activations through the engine (forward, backward, micro-batches) against the
    plain numpy reference, at every rank count."""
    from mpi4py import MPI

    from mpinn import Network
    from tests.reference import Reference
    comm = MPI.COMM_WORLD
    path, x, y, _, sizes = _setup(mpi_tmp_path, "activations")
    ref = Reference.from_file(path)
    comm.Barrier()
    losses = ref.train(x, y, 2, BATCH, 0.05, "sgd", 0.9, seed=4)
    with Network.open(path, strategy, **strategy_params(strategy, sizes, comm.size)) as net:
        history = net.fit(x, y, epochs=2, batch_size=BATCH, lr=0.05, momentum=0.9, seed=4,
                          micro_batches=2)
        probs = net.predict(x)
    assert_close(history["loss"], losses, "float64", "epoch losses")
    for i, (got, want) in enumerate(zip(_weights(path), ref.weights + ref.biases, strict=True)):
        assert_close(got, want, "float64", f"parameter {i}")
    assert_close(probs, ref.forward(x)[1][-1], "float64", "predict")


@pytest.mark.mpi
@pytest.mark.parametrize("micro_batches", [1, 3])
@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_dropout_trains_as_the_reference_whatever_the_rank_count(strategy, micro_batches,
                                                                 mpi_tmp_path):
    """The masks depend on (seed, step, gid, sample) only: every partition and rank count
    gives the weights of the single-process reference run with the same masks."""
    from mpi4py import MPI

    from mpinn import Network
    from tests.reference import Reference
    comm = MPI.COMM_WORLD
    path, x, y, _, sizes = _setup(mpi_tmp_path, "softmax")  # relu, then tanh: a and z both used
    ref = Reference.from_file(path)
    comm.Barrier()
    losses = ref.train(x, y, 3, BATCH, 0.05, "sgd", 0.9, seed=4, dropout=0.3)
    with Network.open(path, strategy, **strategy_params(strategy, sizes, comm.size)) as net:
        history = net.fit(x, y, epochs=3, batch_size=BATCH, lr=0.05, momentum=0.9, seed=4,
                          dropout=0.3, micro_batches=micro_batches, validation_data=(x, y))
        probs = net.predict(x)
    assert_close(history["loss"], losses, "float64", "epoch losses")
    for i, (got, want) in enumerate(zip(_weights(path), ref.weights + ref.biases, strict=True)):
        assert_close(got, want, "float64", f"parameter {i}")
    # inference and validation run without dropout
    assert_close(probs, ref.forward(x)[1][-1], "float64", "predict")
    assert_close(history["val_loss"][-1], ref.loss_and_grads(x, y)[0], "float64", "val loss")


@pytest.mark.mpi
@NO_TORCH
@pytest.mark.parametrize("given, strategy", [  # the override under one uneven partition
    *(("stored", strategy) for strategy in ALL_STRATEGIES), ("override", "count")])
def test_dropout_imported_from_torch_trains_as_torch_with_the_same_masks(given, strategy,
                                                                         mpi_tmp_path):
    """A torch Sequential's nn.Dropout layers become the file's per-layer rates; ``fit``
    without ``dropout`` trains with them (torch with mpinn's masks fed in place of
    nn.Dropout's is the oracle), ``fit(dropout=0)`` overrides them (plain torch is)."""
    from mpi4py import MPI

    from mpinn import Network
    comm = MPI.COMM_WORLD
    path = str(mpi_tmp_path / "model.h5")
    sizes = [7, 13, 11, 9, 5]
    x, y = classification_data(N_SAMPLES, sizes[0], sizes[-1], seed=5, dtype="float64")
    options = dict(optimizer="sgd", lr=0.1, momentum=0.9)

    def oracle() -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The model file, from torch; torch's weights trained with mpinn's masks and without."""
        import torch

        from mpinn.io.pytorch import from_torch
        nn = torch.nn
        torch.manual_seed(6)
        from_torch(nn.Sequential(nn.Linear(7, 13), nn.ReLU(), nn.Dropout(0.3),
                                 nn.Linear(13, 11), nn.Tanh(),  # no dropout here
                                 nn.Linear(11, 9), nn.Sigmoid(), nn.Dropout(0.5),
                                 nn.Linear(9, 5), nn.Softmax(dim=-1)).double(), path)
        return (torch_run(path, x, y, True, EPOCHS, seed=11, dropout=True, **options)[0],
                torch_run(path, x, y, True, EPOCHS, seed=11, **options)[0])

    with_masks, without = on_rank0(comm, oracle)
    assert not np.allclose(with_masks[0], without[0], rtol=1e-6), "dropout must change the run"
    with Network.open(path, strategy, **strategy_params(strategy, sizes, comm.size)) as net:
        net.fit(x, y, epochs=EPOCHS, batch_size=BATCH, seed=11,
                **({} if given == "stored" else {"dropout": 0.0}), **options)
    expected = with_masks if given == "stored" else without
    for i, (got, want) in enumerate(zip(_weights(path), expected, strict=True)):
        assert_close(got, want, "float64", f"{given} dropout, parameter {i}")
    with h5py.File(path, "r") as f:  # the checkpoints keep the rates
        assert [f[f"layers/{i}"].attrs.get("dropout", 0.0) for i in range(1, 5)] == [0.3, 0, 0.5, 0]


# ---------------------------------------------------------------- pure parts


def test_dropout_rates_are_stored_per_hidden_layer_and_older_files_have_none(tmp_path):
    """create/init store a rate per hidden layer (the ``dropout`` attribute); a file
    without it (written before it existed) reads as 0; a bad rate is refused by name."""
    from mpi4py import MPI

    from mpinn import Network
    from mpinn.io.hdf5 import opened
    from mpinn.io.schema import read_spec
    from tests.system.test_cli import mpinn, ok

    def rates(path) -> list[float]:
        with opened(str(path), "r", MPI.COMM_SELF) as f:
            return [ly.dropout for ly in read_spec(f).layers]

    path = tmp_path / "m.h5"
    Network.create(path, [4, 6, 5, 3], seed=1, dropout=[0.25, 0.0])
    assert rates(path) == [0.25, 0.0, 0.0]
    with h5py.File(path, "r") as f:
        assert ["dropout" in f[f"layers/{i}"].attrs for i in (1, 2, 3)] == [True, False, False]
    with pytest.raises(MpinnError, match="dropout gives 1 rates for 2 hidden layers"):
        Network.create(path, [4, 6, 5, 3], dropout=[0.25], force=True)
    with pytest.raises(MpinnError, match=r"create: dropout must be in \[0, 1\), or a list of such"):
        Network.create(path, [4, 6, 5, 3], dropout=[0.25, 1], force=True)
    with h5py.File(path, "r+") as f:
        del f["layers/1"].attrs["dropout"]  # as every file before the attribute
    assert rates(path) == [0.0, 0.0, 0.0]
    for layer, value, problem in ((3, 0.5, "dropout 0.5 on the output layer"),
                                  (1, -0.1, "dropout must be a number in"),
                                  (2, "0.5", "dropout must be a number in")):
        with h5py.File(path, "r+") as f:
            f[f"layers/{layer}"].attrs["dropout"] = value
        with pytest.raises(MpinnError, match=f"/layers/{layer}: {problem}"):
            rates(path)
        with h5py.File(path, "r+") as f:
            del f[f"layers/{layer}"].attrs["dropout"]
    # the command line: init --dropout, shown by inspect
    cli = tmp_path / "cli.h5"
    ok(mpinn(1, "init", str(cli), "--sizes", "4,6,5,3", "--dropout", "0.2"))
    assert rates(cli) == [0.2, 0.2, 0.0]
    text = ok(mpinn(1, "inspect", str(cli)))
    header = next(line for line in text.splitlines() if "activation" in line)
    assert header.split()[-1] == "dropout"
    assert [line.split()[-1] for line in text.splitlines()
            if line.split()[:1] in (["1"], ["2"], ["3"])][:3] == ["0.2", "0.2", "0"]


def test_dropout_masks_depend_only_on_seed_step_gid_and_sample():
    from mpinn.kernels import dropout_mask
    gids, samples = np.arange(100, 400), np.arange(1000)
    mask = dropout_mask(7, 3, gids, samples, 0.25, np.empty((300, 1000)))
    assert set(np.unique(mask)) == {0.0, 1 / 0.75}
    assert abs(np.mean(mask == 0) - 0.25) < 0.01
    # any subset of neurons and samples, in any order, draws the same entries
    rows, cols = np.array([250, 3, 77]), np.array([999, 0, 512, 40])
    part = dropout_mask(7, 3, gids[rows], samples[cols], 0.25, np.empty((3, 4), np.float32))
    assert np.array_equal(part, mask[np.ix_(rows, cols)].astype(np.float32))
    other_step = dropout_mask(7, 4, gids, samples, 0.25, np.empty((300, 1000)))
    other_seed = dropout_mask(8, 3, gids, samples, 0.25, np.empty((300, 1000)))
    assert np.mean(other_step != mask) > 0.3 and np.mean(other_seed != mask) > 0.3
    # neighbouring neurons and samples are not correlated
    kept = mask > 0
    assert abs(np.corrcoef(kept[:-1].ravel(), kept[1:].ravel())[0, 1]) < 0.02
    assert abs(np.corrcoef(kept[:, :-1].ravel(), kept[:, 1:].ravel())[0, 1]) < 0.02


@pytest.mark.parametrize("name", ["gelu", "silu", "leaky_relu"])
def test_activation_and_derivative_equal_torch(name):
    torch = pytest.importorskip("torch")
    from mpinn import kernels
    z = np.linspace(-6, 6, 240).reshape(3, -1)
    z[1, 40] = 0.0  # the kink of leaky_relu
    module = {"gelu": torch.nn.GELU(), "silu": torch.nn.SiLU(),
              "leaky_relu": torch.nn.LeakyReLU(SLOPE)}[name]
    zt = torch.from_numpy(z.copy()).requires_grad_()
    at = module(zt)
    upstream = np.cos(z)  # any dL/da
    at.backward(torch.from_numpy(upstream))
    a = kernels.activate(name, z, slope=SLOPE)
    assert_close(a, at.detach().numpy(), "float64", f"{name}")
    grad = kernels.activation_grad(name, z, a, upstream.copy(), slope=SLOPE)
    assert_close(grad, zt.grad.numpy(), "float64", f"{name} derivative")
    a32 = kernels.activate(name, z.astype(np.float32), slope=SLOPE)
    assert a32.dtype == np.float32
    assert_close(a32, a, "float32", f"{name} float32")


def test_torch_models_with_the_new_activations_convert_both_ways(tmp_path):
    torch = pytest.importorskip("torch")
    from mpinn.io.pytorch import from_torch, load_torch_file, save_torch_file, to_torch
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.GELU(), torch.nn.Linear(8, 7),
                                torch.nn.SiLU(), torch.nn.Linear(7, 6), torch.nn.LeakyReLU(0.3),
                                torch.nn.Linear(6, 3)).double()
    pt, h5 = str(tmp_path / "m.pt"), str(tmp_path / "m.h5")
    save_torch_file(model, pt)
    from_torch(load_torch_file(pt), h5)
    with h5py.File(h5, "r") as f:
        assert [f[f"layers/{i}"].attrs["activation"] for i in (1, 2, 3, 4)] == \
            ["gelu", "silu", "leaky_relu", "identity"]
        assert f["layers/3"].attrs["negative_slope"] == 0.3
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(4, 5)))
    assert torch.equal(to_torch(h5)(x), model(x))
    with pytest.raises(MpinnError, match="approximate='tanh'"):
        from_torch(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.GELU("tanh")),
                   str(tmp_path / "tanh.h5"))


def test_a_leaky_relu_slope_must_be_a_number(tmp_path):
    from mpi4py import MPI

    from mpinn.io import create
    with pytest.raises(MpinnError, match="negative_slope"):
        create.create_model(str(tmp_path / "m.h5"), [3, 2], ["leaky_relu"], "float64", 0,
                         MPI.COMM_SELF, negative_slope=float("nan"))


def test_schedule_formulas():
    cosine = Schedule("cosine", lr=1.0, min_lr=0.1, t_max=10)
    assert cosine.rate(0, 1) == 1.0
    assert cosine.rate(5, 2) == pytest.approx(0.55)
    assert cosine.rate(10, 3) == pytest.approx(0.1)
    step = Schedule("step", lr=1.0, step_size=2, gamma=0.5)
    assert [step.rate(0, e) for e in (1, 2, 3, 4, 5)] == [1.0, 1.0, 0.5, 0.5, 0.25]
    warm = Schedule("constant", lr=1.0, warmup_steps=4)
    assert [warm.rate(t, 1) for t in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_clip_coefficient_is_torchs():
    assert clip_coefficient(2.0, 1.0) == 1.0 / (2.0 + 1e-6)
    assert clip_coefficient(0.5, 1.0) == 1.0


@pytest.mark.parametrize("bad,match", [
    (dict(name="linear"), "unknown schedule"), (dict(step_size=0), "--step-size"),
    (dict(gamma=0.0), "--gamma"), (dict(min_lr=2.0), "--min-lr"),
    (dict(warmup_steps=-1), "--warmup-steps")])
def test_bad_schedules_are_refused(bad, match):
    with pytest.raises(MpinnError, match=match):
        Schedule(**{"lr": 1.0, **bad})


def test_a_plain_state_dict_imports_with_the_activations_given(tmp_path):
    torch = pytest.importorskip("torch")
    from mpinn.io.pytorch import from_torch, load_torch_file, to_torch
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 6),
                                torch.nn.ReLU(), torch.nn.Linear(6, 3), torch.nn.Softmax(dim=-1))
    sd, h5 = str(tmp_path / "sd.pt"), str(tmp_path / "m.h5")
    torch.save(model.state_dict(), sd)
    with pytest.raises(MpinnError, match="bare state_dict: it has no activations"):
        load_torch_file(sd)
    from_torch(load_torch_file(sd, activation="relu", output="softmax"), h5)
    x = torch.randn(4, 5)
    assert torch.allclose(to_torch(h5)(x), model(x), rtol=1e-6, atol=0)
    # a Sequential inside a module: one common prefix
    wrapped = str(tmp_path / "wrapped.pt")
    torch.save({f"net.{k}": v for k, v in model.state_dict().items()}, wrapped)
    assert len(load_torch_file(wrapped, "relu", "softmax")) == 6
    with pytest.raises(MpinnError, match="only allowed on the last layer"):
        load_torch_file(sd, activation="softmax", output="softmax")
    broken = str(tmp_path / "broken.pt")
    torch.save({**model.state_dict(), "1.running_mean": torch.zeros(8)}, broken)
    with pytest.raises(MpinnError, match="'1.running_mean' is not '<position>.weight'"):
        load_torch_file(broken, "relu", "softmax")
    torch.save({**model.state_dict(), "1.weight": torch.ones(8)}, broken)  # a LayerNorm's
    with pytest.raises(MpinnError, match="position 1 has no 2-D float weight"):
        load_torch_file(broken, "relu", "softmax")
