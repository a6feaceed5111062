"""What a model file holds and what its partitions cost: the ``inspect`` and ``partition`` commands.

The per-rank traffic figures are computed from the metadata table alone (pure), with the
same rule the exchange plans follow; tests check them against the bytes the plans move.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from mpi4py import MPI

from mpinn import distributor
from mpinn import format as fmt
from mpinn.exchange import agree, dense_traffic
from mpinn.metadata import MetadataTable


@dataclass(frozen=True)
class RankTraffic:
    """Per-rank figures of one partition; bytes are per sample."""

    neurons: np.ndarray
    parameters: np.ndarray
    local_inputs: np.ndarray
    remote_inputs: np.ndarray
    forward_send: np.ndarray
    forward_recv: np.ndarray
    backward_send: np.ndarray
    backward_recv: np.ndarray


def rank_traffic(spec: fmt.ModelSpec, table: MetadataTable) -> RankTraffic:
    """Neurons, parameters, inputs read and bytes moved by each rank for one sample."""
    p = table.nranks
    item = spec.dtype.itemsize
    neurons = np.bincount(table.owner, minlength=p)
    parameters = np.zeros(p, dtype=np.int64)
    local = np.zeros(p, dtype=np.int64)
    fwd_send = np.zeros(p, dtype=np.int64)
    fwd_recv = np.zeros(p, dtype=np.int64)
    bwd_send = np.zeros(p, dtype=np.int64)
    bwd_recv = np.zeros(p, dtype=np.int64)
    remote = np.zeros(p, dtype=np.int64)
    for ly in spec.layers:
        rows = table.counts(ly.index)
        parameters += rows * (ly.n_in + 1)
        reads = rows > 0
        own_prev = table.counts(ly.index - 1)
        local += np.where(reads, own_prev, 0)
        remote += np.where(reads, ly.n_in - own_prev, 0)
        traffic = dense_traffic(table, ly.index)
        fwd_send += traffic.sum(axis=1) * item
        fwd_recv += traffic.sum(axis=0) * item
        if ly.index > 1:  # input features get no gradient, so layer 1 sends nothing back
            bwd_send += traffic.sum(axis=0) * item
            bwd_recv += traffic.sum(axis=1) * item
    return RankTraffic(neurons, parameters, local, remote, fwd_send, fwd_recv, bwd_send, bwd_recv)


def _table_text(traffic: RankTraffic) -> list[str]:
    head = (f"  {'rank':>4} {'neurons':>9} {'params':>12} {'local-in':>9} {'remote-in':>9} "
            f"{'fwd send':>10} {'fwd recv':>10} {'bwd send':>10} {'bwd recv':>10}")
    lines = [head, "  " + " " * 59 + "(bytes per sample)"]
    for r in range(traffic.neurons.size):
        lines.append(
            f"  {r:>4} {traffic.neurons[r]:>9,} {traffic.parameters[r]:>12,} "
            f"{traffic.local_inputs[r]:>9,} {traffic.remote_inputs[r]:>9,} "
            f"{traffic.forward_send[r]:>10,} {traffic.forward_recv[r]:>10,} "
            f"{traffic.backward_send[r]:>10,} {traffic.backward_recv[r]:>10,}")
    return lines


def describe(path: str, comm: MPI.Comm) -> str:
    """The text ``mpinn inspect`` prints (collective: every rank opens the file)."""
    with fmt.opened(path, "r", comm) as f:
        spec = agree(comm, lambda: fmt.read_spec(f))
        state = fmt.read_state_attrs(f)
        partitions = [(name, *fmt.read_partition(f, name)) for name in fmt.list_partitions(f)]
    nbytes = spec.n_parameters * spec.dtype.itemsize
    lines = [f"{path}: mpinn format {fmt.FORMAT_VERSION}, {spec.dtype}, {len(spec.layers)} layers, "
             f"{spec.n_parameters:,} parameters ({nbytes / 2**20:.2f} MiB)",
             f"  {'layer':>5} {'neurons':>9} {'inputs':>9} {'activation':>10} {'storage':>8} "
             f"{'parameters':>12}",
             f"  {0:>5} {spec.sizes[0]:>9,} {'-':>9} {'(inputs)':>10}"]
    for ly in spec.layers:
        lines.append(f"  {ly.index:>5} {ly.n_out:>9,} {ly.n_in:>9,} {ly.activation:>10} "
                     f"{ly.storage:>8} {ly.n_out * (ly.n_in + 1):>12,}")
    opt = state.get("optimizer")
    opt_text = f", optimizer {json.dumps(opt)}" if opt else ""
    lines.append(f"training state: epoch {state.get('epoch', 0)}, step {state.get('step', 0)}"
                 f"{opt_text}")
    lines.append(f"partitions: {len(partitions) or 'none stored'}")
    for name, owner, nranks, strategy, params in partitions:
        lines.append(f"partition {name!r}: strategy {strategy}, {nranks} ranks, "
                     f"params {json.dumps(params)}")
        try:
            table = MetadataTable.build(spec.sizes, owner, nranks)
        except Exception as exc:  # noqa: BLE001 - a broken stored partition is reported, not fatal
            lines.append(f"  unusable: {exc}")
            continue
        lines.extend(_table_text(rank_traffic(spec, table)))
    return "\n".join(lines)


def store_partition(path: str, nranks: int, strategy: str, params: dict[str, Any], name: str,
                    comm: MPI.Comm) -> MetadataTable:
    """Compute a partition for ``nranks`` ranks and store it in the model file (collective)."""
    with fmt.opened(path, "r", comm) as f:
        spec = agree(comm, lambda: fmt.read_spec(f))

    def build() -> MetadataTable:
        owner = distributor.partition(spec.sizes, nranks, strategy, params)
        return MetadataTable.build(spec.sizes, owner, nranks)

    table = agree(comm, build)
    if fmt.MPI_IO:
        with fmt.opened(path, "r+", comm) as f:
            agree(comm, lambda: fmt.write_partition(f, name, table.owner, nranks, strategy, params,
                                                    comm))
    else:  # serial HDF5: rank 0 alone writes the small partition group
        def write() -> None:
            if comm.rank == 0:
                with fmt.opened(path, "r+", MPI.COMM_SELF) as f:
                    fmt.write_partition(f, name, table.owner, nranks, strategy, params, MPI.COMM_SELF)

        agree(comm, write)
    if comm.rank == 0:
        print(f"{path}: stored partition {name!r} ({strategy}, {nranks} ranks)")
        print("\n".join(_table_text(rank_traffic(spec, table))))
    return table
