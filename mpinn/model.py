"""``DistributedModel``: a model file opened on every rank as its shard, metadata
table and engine; saved back collectively."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mpinn.partition.choice import resolve_owner
from mpinn.train import BEST_OF, best_path

if TYPE_CHECKING:
    from mpinn.partition.choice import PartitionChoice

import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
from mpi4py import MPI

from mpinn.comm.collectives import agree
from mpinn.comm.replicas import ReplicaGroups
from mpinn.comm.topology import job_nodes
from mpinn.engine.engine import Engine
from mpinn.errors import MpinnError
from mpinn.io import checkpoint, hdf5, schema
from mpinn.optim import (
    OPTIMIZERS,
    Optimizer,
    make_optimizer,
)
from mpinn.partition.metadata import MetadataTable
from mpinn.shard import LayerShard, Shard
from mpinn.trace import NULL, NullTracer

REPLICA_LOADS = ("read", "bcast")
REPLICA_LOAD = "read"  # how groups other than 0 get their rows: see docs/scaling.md


class DistributedModel:
    """A model file opened on every rank: its spec, partition, this rank's shard and engine."""

    def __init__(self, path: str, comm: MPI.Comm, choice: PartitionChoice, max_batch: int,
                 training: bool = True, replicas: int = 1,
                 exchange: str = "auto", nodes: np.ndarray | None = None,
                 replica_load: str = REPLICA_LOAD) -> None:
        """``replicas`` R: the P ranks of ``comm`` are R groups of Q = P / R contiguous ranks,
        each holding the whole model partitioned over its Q ranks (``ReplicaGroups``), each
        taking a share of every batch. ``replica_load``: ``read``, every group reads its own
        rows from the file; ``bcast``, group 0 reads and broadcasts them to the other groups
        (``Shard.load_from_first_group``); ``REPLICA_LOAD`` is the faster measured."""
        self.path = path
        self.comm = comm
        self.exchange = exchange  # the kind of every layer's exchange (comm.exchange.make_plans)
        self.nodes = nodes  # the node of every rank of the group (None: asked of MPI)
        if replica_load not in REPLICA_LOADS:
            raise MpinnError(f"replica_load must be one of {', '.join(REPLICA_LOADS)}, "
                             f"got {replica_load!r}")
        self.replicas = agree(comm, lambda: ReplicaGroups.check(replicas, comm.size))
        self.groups = ReplicaGroups(comm, self.replicas)
        group = self.group = self.groups.group  # the neuron partition lives here
        # what the file was when loaded (taken before opening it: a commit in between makes
        # it look changed, never unchanged), so a writer can tell a model committed since
        self.committed = hdf5.file_identity(path)
        # opened read-only: saves write a new file and swap it in (io.checkpoint.Checkpoint)
        self.file = hdf5.open_file(path, "r", group)
        try:
            checkpoint.check_same_commit(self.file, path, comm)
            self.spec = agree(comm, lambda: schema.read_spec(self.file))
            nodes_of_comm = job_nodes(comm)
            ranks_here = int(np.count_nonzero(nodes_of_comm == nodes_of_comm[comm.rank]))
            agree(comm, lambda: Shard.check_table_fits(self.spec, group.size, ranks_here))
            # the owners come from world rank 0 where a strategy is not a pure function
            # (mincut, placed on the nodes of rank 0's group), so every group holds the
            # same partition
            node = None
            if choice.name is None and choice.strategy == "mincut":
                node = nodes if nodes is not None else job_nodes(group)
            owner, self.partition_text = agree(
                comm, lambda: resolve_owner(self.file, self.spec, choice, group.size, comm, node))
            self.table = agree(comm, lambda: MetadataTable.build(self.spec.sizes, owner, group.size))
            agree(comm, lambda: Shard.check_fits(self.spec, self.table, group.rank, max_batch))
            if self.replicas > 1 and replica_load == "bcast":
                self.shard = Shard.load_from_first_group(self.file, self.spec, self.table,
                                                         self.groups)
            else:
                self.shard = Shard.load(self.file, self.spec, self.table, group)
            agree(comm, self._check_finite)
            self.engine = self._engine(max_batch, training)
            self.state = agree(comm, lambda: schema.read_state_attrs(self.file))
            self.partitions = agree(comm, lambda: schema.read_partitions(self.file))
        except BaseException as exc:
            if hdf5.safe_to_close(exc):
                self.file.close()
            raise
        self.seconds_io = 0.0  # spent writing checkpoints and reopening the file after them
        self.tracer: NullTracer = NULL  # a traced run's (train): checkpoints are spans too

    def _engine(self, max_batch: int, training: bool) -> Engine:
        engine = Engine(self.shard, self.group, max_batch, training, self.exchange, self.nodes)
        if training:
            engine.set_replicas(self.groups.across)
        return engine

    def _check_finite(self) -> None:
        for layer in self.shard.layers:
            weight = "data" if layer.spec.sparse else "weight"
            for name, values in ((weight, layer.weight), ("bias", layer.bias)):
                if not np.all(np.isfinite(values)):
                    raise MpinnError(f"{self.path}: /layers/{layer.spec.index}/{name} holds a "
                                     "NaN or infinite value")

    def close(self) -> None:
        """Close the file and free the communicators (collective)."""
        if getattr(self, "engine", None) is not None:
            self.engine.close()
        self.file.close()
        self.groups.free()

    def __enter__(self) -> DistributedModel:
        return self

    def __exit__(self, _type: type | None, exc: BaseException | None, _tb: object) -> None:
        if hdf5.safe_to_close(exc):
            self.close()

    # ------------------------------------------------------------ optimizer state

    def _slots(self, optimizer: Optimizer) -> Iterator[tuple[LayerShard, str, tuple[int, ...], np.ndarray]]:
        """(layer, dataset name, file shape, my array) of every optimizer-state slot."""
        for i, layer in enumerate(self.shard.layers):
            shapes = {"weight": layer.weight_file_shape(), "bias": (layer.spec.n_out,)}
            for j, param in enumerate(("weight", "bias")):
                for slot in optimizer.slots:
                    yield layer, f"{param}_{slot}", shapes[param], optimizer.state[slot][2 * i + j]

    def load_optimizer_state(self, optimizer: Optimizer) -> bool:
        """Restore the optimizer's slots if the file holds state of the same optimizer."""
        saved = self.state.get("optimizer")
        if not saved or saved.get("name") != optimizer.name:
            return False
        slots = [(layer, name, schema.read_state_slot(self.file, layer.spec.index, name, shape,
                                                   self.spec.dtype), array)
                 for layer, name, shape, array in self._slots(optimizer)]
        if any(dset is None for _, _, dset, _ in slots):
            return False
        for layer, name, dset, array in slots:
            if name.startswith("weight"):
                array[...] = layer.read_weight_like(dset)
            else:
                array[...] = hdf5.read_slice(dset, layer.rows)
        optimizer.restore(saved)
        return True

    def stored_optimizer(self) -> Optimizer | None:
        """The optimizer whose state the file holds, restored, or None (for ``save`` outside
        ``train``: a rewrite must not drop Adam's moments)."""
        saved = self.state.get("optimizer")
        if not saved or saved.get("name") not in OPTIMIZERS:
            return None
        # never stepped: each parameter stands in for its own gradient buffer
        pairs = [(p, p) for layer in self.shard.layers for p in (layer.weight, layer.bias)]
        optimizer = make_optimizer(saved["name"], pairs, float(saved.get("lr", 0.1)),
                                   float(saved.get("momentum", 0.0)),
                                   float(saved.get("weight_decay", 0.0)))
        return optimizer if self.load_optimizer_state(optimizer) else None

    def use_engine(self, max_batch: int, training: bool) -> Engine:
        """An engine for batches of up to ``max_batch``: the current one, or a new one
        (collective) when it is too small or cannot train."""
        current = self.engine
        if current.max_batch >= max_batch and (current.training or not training):
            return current
        agree(self.comm, lambda: Shard.check_fits(self.spec, self.table, self.group.rank,
                                                  max_batch))
        current.close()
        self.engine = None  # type: ignore[assignment] - the old buffers go before the new come
        self.engine = self._engine(max_batch, training)
        return self.engine

    def save(self, optimizer: Optimizer | None = None, keep: int = 1, **state: Any) -> None:
        """Commit my rows, my optimizer state and the training counters (collective).

        Written as a whole new file swapped in atomically (``io.checkpoint.Checkpoint``), so a
        job killed mid-write leaves the previous checkpoint intact. The model file is then
        reopened, so later reads (the optimizer state of the next ``train``) see this one.
        """
        # the file being replaced is kept (keep > 1) under the name of the state it holds
        label = f"epoch{self.state.get('epoch', 0)}-step{self.state.get('step', 0)}.h5"
        self.state.update(state)
        ident = schema.new_checkpoint_id(self.comm)
        self._write(self.path, optimizer, keep, label, ident)
        started = time.perf_counter()  # part of the checkpoint's I/O too
        self.committed = hdf5.file_identity(self.path)  # ours: the lock keeps other writers out
        self.file.close()
        self.file = hdf5.open_file(self.path, "r", self.group)
        checkpoint.check_same_commit(self.file, self.path, self.comm, expected=ident)
        self.seconds_io += time.perf_counter() - started

    def save_best(self, optimizer: Optimizer | None, **state: Any) -> str:
        """Write the current rows and state to ``MODEL.best.h5`` (complete, then renamed),
        its state naming the model it is the best of (``check_best`` recognises it so)."""
        path = best_path(self.path)
        saved = self.state
        self.state = {**saved, **state, BEST_OF: os.path.basename(self.path)}
        try:
            self._write(path, optimizer, 1, "")
        finally:
            self.state = saved
        return path

    def _write(self, path: str, optimizer: Optimizer | None, keep: int, label: str,
               ident: str | None = None) -> None:
        """Only group 0 writes (every group holds the same rows and optimizer state: the file
        is the one R = 1 writes); the other groups wait, and fail with it if it fails. Every
        rank counts the time in ``seconds_io``, waiting for the writers included, so that a
        step time without the checkpoints is the same sum on every rank."""
        started = time.perf_counter()
        try:
            with self.tracer.span("checkpoint", "io", {"file": os.path.basename(path)}):
                if self.replicas > 1:
                    agree(self.comm, lambda: self._write_group(path, optimizer, keep, label, ident)
                          if self.groups.index == 0 else None)
                    if optimizer is not None:
                        self.state["optimizer"] = optimizer.config()
                else:
                    self._write_group(path, optimizer, keep, label, ident)
        finally:
            self.seconds_io += time.perf_counter() - started

    def _write_group(self, path: str, optimizer: Optimizer | None, keep: int, label: str,
                     ident: str | None = None) -> None:
        with checkpoint.Checkpoint(path, self.spec, self.partitions, self.group, keep, label,
                                   ident) as f:
            self.shard.save(f)
            if optimizer is not None:
                for layer, name, shape, array in self._slots(optimizer):
                    dset = schema.state_dataset(f, layer.spec.index, name, shape, self.spec.dtype)
                    if name.startswith("weight"):
                        layer.write_weight_like(dset, array)
                    else:
                        hdf5.write_slice(dset, layer.rows, array)
                self.state["optimizer"] = optimizer.config()
            schema.write_state_attrs(f, self.state)
