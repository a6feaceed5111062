"""The loop: open a model on every rank, then train, evaluate or predict batch by batch.

One batch goes: ``LocalData.batch`` (this rank's input features) -> ``Engine.forward``
(exchange + kernels per layer) -> ``Engine.loss_and_grad`` -> ``Engine.backward`` ->
``Optimizer.step`` on the rank's own rows. Checkpoints write every rank's rows back into
the model file collectively.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np
from mpi4py import MPI

from mpinn import distributor
from mpinn import format as fmt
from mpinn.data import LocalData
from mpinn.engine import Engine
from mpinn.errors import MpinnError
from mpinn.exchange import SUM, agree, allreduce
from mpinn.metadata import MetadataTable
from mpinn.optim import Optimizer, make_optimizer
from mpinn.shard import Shard


@dataclass
class PartitionChoice:
    """A stored partition by name, or a strategy and its params computed for this job."""

    name: str | None = None
    strategy: str = "balanced"
    params: dict[str, Any] = field(default_factory=dict)


def resolve_owner(f: h5py.File, spec: fmt.ModelSpec, choice: PartitionChoice,
                  nranks: int) -> tuple[np.ndarray, str]:
    """Owner array for this job and a one-line description of where it came from."""
    if choice.name is not None:
        owner, stored_ranks, strategy, _ = fmt.read_partition(f, choice.name)
        if stored_ranks != nranks:
            raise MpinnError(f"partition {choice.name!r} was made for {stored_ranks} ranks but "
                             f"the job has {nranks}")
        return owner, f"partition {choice.name!r} ({strategy})"
    owner = distributor.partition(spec.sizes, nranks, choice.strategy, choice.params)
    return owner, f"strategy {choice.strategy}"


class DistributedModel:
    """A model file opened on every rank: its spec, partition, this rank's shard and engine."""

    def __init__(self, path: str, comm: MPI.Comm, choice: PartitionChoice, max_batch: int,
                 writable: bool = False) -> None:
        self.path = path
        self.comm = comm
        self.file = fmt.open_file(path, "r+" if writable else "r", comm)
        try:
            self.spec = agree(comm, lambda: fmt.read_spec(self.file))
            owner, self.partition_text = agree(
                comm, lambda: resolve_owner(self.file, self.spec, choice, comm.size))
            self.table = agree(comm, lambda: MetadataTable.build(self.spec.sizes, owner, comm.size))
            self.shard = Shard.load(self.file, self.spec, self.table, comm.rank)
            agree(comm, self._check_finite)
            self.engine = Engine(self.shard, comm, max_batch)
        except BaseException:
            self.file.close()
            raise
        self.state = fmt.read_state_attrs(self.file)

    def _check_finite(self) -> None:
        for layer in self.shard.layers:
            for name, values in (("weight", layer.weight), ("bias", layer.bias)):
                if not np.all(np.isfinite(values)):
                    raise MpinnError(f"{self.path}: /layers/{layer.spec.index}/{name} holds a "
                                     "NaN or infinite value")

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> DistributedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ optimizer state

    def _slot_datasets(self, optimizer: Optimizer, create: bool
                       ) -> list[tuple[int, str, list[np.ndarray], h5py.Dataset | None]]:
        out = []
        for i, layer in enumerate(self.shard.layers):
            for j, (param, shape) in enumerate((("weight", (layer.spec.n_out, layer.spec.n_in)),
                                                ("bias", (layer.spec.n_out,)))):
                for slot in optimizer.slots:
                    name = f"{param}_{slot}"
                    if create:
                        dset = fmt.state_dataset(self.file, layer.spec.index, name, shape,
                                                 self.spec.dtype)
                    else:
                        dset = fmt.read_state_slot(self.file, layer.spec.index, name, shape,
                                                   self.spec.dtype)
                    out.append((i, param, [optimizer.state[slot][2 * i + j]], dset))
        return out

    def load_optimizer_state(self, optimizer: Optimizer) -> bool:
        """Restore the optimizer's slots if the file holds state of the same optimizer."""
        saved = self.state.get("optimizer")
        if not saved or saved.get("name") != optimizer.name:
            return False
        slots = self._slot_datasets(optimizer, create=False)
        if any(dset is None for *_, dset in slots):
            return False
        for i, param, (array,), dset in slots:
            layer = self.shard.layers[i]
            values = fmt.read_slice(dset, layer.rows)
            array[...] = layer.from_file_columns(values) if param == "weight" else values
        optimizer.restore(saved)
        return True

    def save(self, optimizer: Optimizer | None = None, **state: Any) -> None:
        """Write my rows, my optimizer state and the training counters (collective)."""
        self.shard.save(self.file)
        if optimizer is not None:
            for i, param, (array,), dset in self._slot_datasets(optimizer, create=True):
                layer = self.shard.layers[i]
                values = layer.to_file_columns(array) if param == "weight" else array
                fmt.write_slice(dset, layer.rows, values)
            state["optimizer"] = optimizer.config()
        self.state.update(state)
        fmt.write_state_attrs(self.file, state)
        self.file.flush()


@dataclass
class EpochStats:
    epoch: int
    loss: float
    accuracy: float | None
    samples_per_second: float


def _run_batches(model: DistributedModel, data: LocalData, order: np.ndarray, batch_size: int,
                 step: Callable[[np.ndarray, np.ndarray], None] | None = None,
                 on_outputs: Callable[[np.ndarray, np.ndarray], None] | None = None
                 ) -> tuple[float, int]:
    """Forward (and ``step``) every batch of ``order``; returns summed loss share and hits."""
    engine = model.engine
    features = np.empty((data.features.shape[0], batch_size), dtype=model.spec.dtype)
    loss_sum, correct = 0.0, 0
    for start in range(0, order.size, batch_size):
        index = order[start:start + batch_size]
        x, labels, targets = data.batch(index, features)
        outputs = engine.forward(x)
        if on_outputs is not None:
            on_outputs(index, outputs)
        if labels is None and targets is None:
            continue
        result = engine.loss_and_grad(outputs, labels, targets)
        loss_sum += result.loss_sum
        correct += result.correct
        if step is not None:
            step(index, outputs)
    return loss_sum, correct


def _totals(model: DistributedModel, data: LocalData, loss_sum: float, correct: int
            ) -> tuple[float, float | None]:
    total = allreduce(model.comm, np.array([loss_sum]), SUM)[0]
    n = max(data.n_samples, 1)
    accuracy = correct / n if data.labels is not None else None
    return float(total / n), accuracy


def train(model: DistributedModel, data: LocalData, *, epochs: int, batch_size: int, lr: float,
          optimizer_name: str = "sgd", momentum: float = 0.0, seed: int = 0,
          shuffle: bool = True, checkpoint_every: int = 0,
          report: Callable[[EpochStats], None] | None = None) -> list[EpochStats]:
    """Train for ``epochs`` more epochs, continuing the counters and optimizer state in the file.

    Epoch e shuffles with a generator seeded by (seed, e), so a run split over several
    invocations visits the samples in the same order as one uninterrupted run.
    """
    if epochs < 0:
        raise MpinnError(f"--epochs must not be negative, got {epochs}")
    if batch_size < 1:
        raise MpinnError(f"--batch-size must be at least 1, got {batch_size}")
    if checkpoint_every < 0:
        raise MpinnError(f"--checkpoint-every must not be negative, got {checkpoint_every}")
    engine = model.engine
    optimizer = make_optimizer(optimizer_name, engine.parameters(), lr, momentum)
    model.load_optimizer_state(optimizer)
    first_epoch = int(model.state.get("epoch", 0))
    step_count = int(model.state.get("step", 0))

    def step(_index: np.ndarray, _outputs: np.ndarray) -> None:
        nonlocal step_count
        engine.backward()
        optimizer.step()
        step_count += 1

    history = []
    for epoch in range(first_epoch + 1, first_epoch + epochs + 1):
        if shuffle:
            order = np.random.default_rng([seed, epoch]).permutation(data.n_samples)
        else:
            order = np.arange(data.n_samples)
        start = time.perf_counter()
        loss_sum, correct = _run_batches(model, data, order, batch_size, step=step)
        loss, accuracy = _totals(model, data, loss_sum, correct)
        if not np.isfinite(loss):
            raise MpinnError(f"epoch {epoch}: the loss is {loss} (diverged); try a smaller --lr")
        stats = EpochStats(epoch, loss, accuracy, data.n_samples / (time.perf_counter() - start))
        history.append(stats)
        if report is not None:
            report(stats)
        last = epoch == first_epoch + epochs
        if last or (checkpoint_every and epoch % checkpoint_every == 0):
            model.save(optimizer, epoch=epoch, step=step_count, seed=seed)
    return history


def evaluate(model: DistributedModel, data: LocalData, batch_size: int) -> tuple[float, float | None]:
    """Mean loss and accuracy (None for float targets) over the whole data set."""
    loss_sum, correct = _run_batches(model, data, np.arange(data.n_samples), batch_size)
    return _totals(model, data, loss_sum, correct)


def predict(model: DistributedModel, data: LocalData, batch_size: int) -> np.ndarray:
    """Last-layer activations of my output neurons for every sample, (owned outputs, samples)."""
    outputs = np.empty((model.shard.layers[-1].rows.size, data.n_samples), dtype=model.spec.dtype)

    def keep(index: np.ndarray, batch_outputs: np.ndarray) -> None:
        outputs[:, index] = batch_outputs

    order = np.arange(data.n_samples)
    stripped = LocalData(data.spec, data.features, None, None)
    _run_batches(model, stripped, order, batch_size, on_outputs=keep)
    return outputs


def print_epoch(stats: EpochStats, total_epochs: int | None = None) -> None:
    acc = f"  accuracy {stats.accuracy:.4f}" if stats.accuracy is not None else ""
    print(f"epoch {stats.epoch}  loss {stats.loss:.6f}{acc}  "
          f"samples/s {stats.samples_per_second:,.0f}", flush=True, file=sys.stdout)
