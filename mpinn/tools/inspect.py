"""What a model file holds and what its partitions cost: the ``inspect`` and ``partition`` commands.

The per-rank traffic figures are computed from the metadata table alone (pure), with the
same rule the exchange plans follow; tests check them against the bytes the plans move.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mpinn.partition.traffic import rank_traffic

if TYPE_CHECKING:
    from mpinn.partition.traffic import LayerEdges, RankTraffic

import json
from collections.abc import Callable
from typing import Any

import numpy as np
from mpi4py import MPI

from mpinn.comm import topology
from mpinn.comm.collectives import agree, on_root
from mpinn.errors import MpinnError
from mpinn.io import hdf5, schema
from mpinn.partition import costmodel, strategies
from mpinn.partition.choice import owner_for_strategy
from mpinn.partition.metadata import MetadataTable


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


def _summary(traffic: RankTraffic) -> str:
    """One line: total and max-per-rank bytes per sample, imbalance, local connections."""
    return (f"fwd {traffic.forward_send.sum():>12,} B (max/rank {traffic.forward_recv.max():>10,})  "
            f"bwd {traffic.backward_send.sum():>12,} B (max/rank {traffic.backward_send.max():>10,})  "
            f"imbalance {traffic.imbalance:5.2f}  local edges {100 * traffic.local_fraction:5.1f}%")


def _node_summary(traffic: RankTraffic, node: np.ndarray) -> str:
    """One line: the bytes per sample that cross between nodes and those that stay inside one."""
    fwd_between, fwd_inside = topology.split_by_node(traffic.forward_matrix, node)
    bwd_between, bwd_inside = topology.split_by_node(traffic.backward_matrix, node)
    total = fwd_between + fwd_inside + bwd_between + bwd_inside
    share = (fwd_between + bwd_between) / total if total else 0.0
    return (f"between nodes fwd {fwd_between:>12,} B  bwd {bwd_between:>12,} B ({share:6.1%})  "
            f"inside nodes fwd {fwd_inside:>12,} B  bwd {bwd_inside:>12,} B")


def partition_nodes(comm: MPI.Comm, nranks: int, ranks_per_node: int | None) -> np.ndarray | None:
    """The node of each of a partition's ranks (collective): ``ranks_per_node`` consecutive
    ranks per node when given, else this job's own placement when it has ``nranks`` ranks,
    else unknown (None)."""
    job = topology.job_nodes(comm)
    if ranks_per_node is not None:
        return topology.block_nodes(nranks, ranks_per_node)
    return job if comm.size == nranks else None


def _nodes_line(node: np.ndarray | None, ranks_per_node: int | None) -> str:
    if node is None:
        return ("nodes: not known (run with the partition's rank count, or give "
                "--ranks-per-node)")
    how = "as given by --ranks-per-node" if ranks_per_node is not None else "this job's placement"
    return f"nodes: {topology.describe_nodes(node)} ({how})"


def describe(path: str, comm: MPI.Comm, ranks_per_node: int | None = None) -> str:
    """The text ``mpinn inspect`` prints (collective: every rank opens the file; rank 0
    reads the wiring of sparse layers, one layer at a time, for the traffic figures).
    Bytes crossing between nodes are shown apart for a partition whose ranks' nodes are
    known (``partition_nodes``)."""
    job = topology.job_nodes(comm)
    with hdf5.opened(path, "r", comm) as f:
        spec = agree(comm, lambda: schema.read_spec(f))
        state = schema.read_state_attrs(f)
        partitions = [(name, *schema.read_partition(f, name)) for name in schema.list_partitions(f)]
        wiring = schema.wiring_reader(f, spec)

        def nodes(nranks: int) -> np.ndarray | None:
            if ranks_per_node is not None:
                return topology.block_nodes(nranks, ranks_per_node)
            return job if comm.size == nranks else None

        return on_root(comm, lambda: "\n".join(_describe_lines(path, spec, state, partitions,
                                                               wiring, nodes, ranks_per_node)))


def _describe_lines(path: str, spec: schema.ModelSpec, state: dict[str, Any], partitions: list,
                    wiring: LayerEdges, nodes: Callable[[int], np.ndarray | None],
                    ranks_per_node: int | None) -> list[str]:
    nbytes = spec.n_parameters * spec.dtype.itemsize
    dropout = any(ly.dropout for ly in spec.layers)  # a column only for models that train with it
    lines = [f"{path}: mpinn format {schema.FORMAT_VERSION}, {spec.dtype}, {len(spec.layers)} layers, "
             f"{spec.n_parameters:,} parameters ({nbytes / 2**20:.2f} MiB)",
             f"  {'layer':>5} {'neurons':>9} {'inputs':>9} {'activation':>10} {'storage':>8} "
             f"{'parameters':>12} {'fill':>7}" + (f" {'dropout':>7}" if dropout else ""),
             f"  {0:>5} {spec.sizes[0]:>9,} {'-':>9} {'(inputs)':>10}"]
    for ly in spec.layers:
        act = f"{ly.activation}({ly.cap:g})" if ly.cap is not None else ly.activation
        rate = f" {ly.dropout:>7g}" if dropout else ""
        lines.append(f"  {ly.index:>5} {ly.n_out:>9,} {ly.n_in:>9,} {act:>10} "
                     f"{ly.storage:>8} {ly.nnz + ly.n_out:>12,} {ly.nnz / (ly.n_in * ly.n_out):>7.2%}"
                     f"{rate}")
    opt = state.get("optimizer")
    opt_text = f", optimizer {json.dumps(opt)}" if opt else ""
    batch = state.get("batch", 0)
    # a preempted run stopped inside its next epoch: where train --resume will continue
    batch_text = (f", batch {batch} of epoch {state.get('epoch', 0) + 1} done (continue with "
                  "train --resume)" if batch else ", batch 0")
    lines.append(f"training state: epoch {state.get('epoch', 0)}{batch_text}, step "
                 f"{state.get('step', 0)}{opt_text}")
    lines.append(f"partitions: {len(partitions) or 'none stored'}")
    for name, owner, nranks, strategy, params in partitions:
        lines.append(f"partition {name!r}: strategy {strategy}, {nranks} ranks, "
                     f"params {json.dumps(params)}")
        try:
            table = MetadataTable.build(spec.sizes, owner, nranks)
        except Exception as exc:  # noqa: BLE001 - a broken stored partition is reported, not fatal
            lines.append(f"  unusable: {exc}")
            continue
        traffic = rank_traffic(spec, table, wiring)
        lines.extend(_table_text(traffic))
        lines.append("  per sample: " + _summary(traffic))
        lines.append("  " + _memory_text(spec, table, traffic))
        node = nodes(nranks)
        lines.append("  " + _nodes_line(node, ranks_per_node))
        if node is not None:
            lines.append("  per sample: " + _node_summary(traffic, node))
    return lines


def rows_bytes(spec: schema.ModelSpec, traffic: RankTraffic) -> np.ndarray:
    """Bytes of each rank's rows: weights and biases, and a column index per CSR weight."""
    sparse = sum(traffic.layer_nnz[ly.index - 1] for ly in spec.layers if ly.sparse)
    return traffic.parameters * spec.dtype.itemsize + 4 * np.asarray(sparse)


def _memory_text(spec: schema.ModelSpec, table: MetadataTable, traffic: RankTraffic) -> str:
    """The replicated metadata table beside the rows it routes, per rank."""
    rows = rows_bytes(spec, traffic)
    return (f"memory per rank: metadata table {table.nbytes:,} B "
            f"({table.nbytes / max(sum(table.sizes), 1):.3g} B per neuron), "
            f"rows {rows.min():,} to {rows.max():,} B "
            f"(metadata / rows {table.nbytes / max(int(rows.min()), 1):.3g})")


def compare(path: str, nranks: int, comm: MPI.Comm, params: dict[str, Any] | None = None,
            ranks_per_node: int | None = None) -> str:
    """``partition --compare``: what every strategy would cost this model on ``nranks`` ranks.

    Strategies that need parameters are compared with the ones given on the command line
    (``layers`` without them gets contiguous groups of layers balanced by stored weights).
    Where the ranks' nodes are known (``partition_nodes``), each strategy's bytes between
    nodes and inside nodes follow on a second line.
    """
    node = partition_nodes(comm, nranks, ranks_per_node)
    with hdf5.opened(path, "r", comm) as f:
        spec = agree(comm, lambda: schema.read_spec(f))
        row_nnz = schema.read_row_nnz(f, spec)
        wiring = schema.wiring_reader(f, spec)
        rows = []
        for strategy in strategies.STRATEGIES:
            given = dict(params or {})
            if strategy == "layers" and "layer_ranks" not in given:
                given["layer_ranks"] = strategies.layer_blocks(spec.sizes, nranks, row_nnz)
            try:
                owner = owner_for_strategy(f, spec, nranks, strategy, given, comm, node)
                table = MetadataTable.build(spec.sizes, owner, nranks)
            except MpinnError as exc:
                rows.append((strategy, None, str(exc)))
                continue
            rows.append((strategy, table, ""))

        def text() -> str:
            lines = [f"{path}: {nranks} ranks, bytes exchanged per sample (forward: activations "
                     "sent; backward: partial sums sent)", _nodes_line(node, ranks_per_node)]
            for strategy, table, why in rows:
                if table is None:
                    lines.append(f"  {strategy:<10} not compared: {why}")
                    continue
                traffic = rank_traffic(spec, table, wiring)
                lines.append(f"  {strategy:<10} " + _summary(traffic))
                if node is not None:
                    lines.append(f"  {'':<10} " + _node_summary(traffic, node))
            return "\n".join(lines)

        return on_root(comm, text)


def store_partition(path: str, nranks: int, strategy: str, params: dict[str, Any], name: str,
                    comm: MPI.Comm, force: bool = False, ranks_per_node: int | None = None
                    ) -> MetadataTable:
    """Compute a partition for ``nranks`` ranks and store it in the model file (collective);
    a stored partition of the same name is replaced only with ``force``. ``mincut`` places
    its parts on the nodes where they are known (``partition_nodes``)."""
    node = partition_nodes(comm, nranks, ranks_per_node)
    with hdf5.opened(path, "r", comm) as f:
        spec = agree(comm, lambda: schema.read_spec(f))

        def check_name() -> None:
            if name in schema.list_partitions(f) and not force:
                raise MpinnError(f"{path}: a partition named {name!r} is stored already; pass "
                                 "--force to replace it, or --name to store this one beside it")

        agree(comm, check_name)

        def build() -> MetadataTable:
            owner = owner_for_strategy(f, spec, nranks, strategy, params, comm, node)
            return MetadataTable.build(spec.sizes, owner, nranks)

        table = agree(comm, build)
        wiring = schema.wiring_reader(f, spec)
        report = on_root(comm, lambda: _table_text(rank_traffic(spec, table, wiring)))
    if hdf5.MPI_IO:
        with hdf5.opened(path, "r+", comm) as f:
            agree(comm, lambda: schema.write_partition(f, name, table.owner, nranks, strategy, params,
                                                    comm))
    else:  # serial HDF5: rank 0 alone writes the small partition group
        # serial HDF5 locks the file against a writer while any rank still has it open
        comm.Barrier()

        def write() -> None:
            if comm.rank == 0:
                with hdf5.opened(path, "r+", MPI.COMM_SELF) as f:
                    schema.write_partition(f, name, table.owner, nranks, strategy, params, MPI.COMM_SELF)

        agree(comm, write)
    if comm.rank == 0:
        print(f"{path}: stored partition {name!r} ({strategy}, {nranks} ranks)")
        print("\n".join(report))
    return table


def layout_table(path: str, nranks: int, batch: int, comm: MPI.Comm,
                 seconds: float | None = None) -> str:
    """``partition --plan``: the cost model's prediction for every layout of ``nranks`` ranks
    (R replicas x Q ranks, strategy, micro-batches) of this model at ``batch``, with the
    machine measured by a few seconds of probing on this job's ranks (collective)."""
    return choose_layout(path, nranks, batch, comm, seconds=seconds)[1]


def choose_layout(path: str, nranks: int, batch: int, comm: MPI.Comm, *,
                  pipelines: bool = True, partition: str | None = None,
                  seconds: float | None = None) -> tuple[Any, str, list[int] | None]:
    """The cost model's fastest layout of ``nranks`` ranks for this model at ``batch``, the
    table of every candidate beside it, and for a ``layers`` layout its ``layer_ranks``
    (collective: it probes the job's ranks).

    ``pipelines=False`` leaves out the ``layers`` strategy's micro-batch pipelines (for
    inference, or when the user fixed the partition), so only R varies; a stored
    ``partition`` of Q parts leaves only R = nranks / Q.
    ``--replicas auto`` and ``partition --plan`` both come here."""
    from mpinn.io import hdf5, schema

    with hdf5.opened(path, "r", comm) as f:
        spec = agree(comm, lambda: schema.read_spec(f))
        parts = None if partition is None else agree(
            comm, lambda: schema.read_partition(f, partition)[1])
    candidates = costmodel.candidates(nranks, spec.sizes, batch)  # refuses a bad count before probing
    if not pipelines:
        candidates = [c for c in candidates if c.strategy == "balanced"]
    if parts is not None:
        candidates = [c for c in candidates if c.group == parts]
        if not candidates:
            raise MpinnError(f"{path}: partition {partition!r} has {parts} parts, which do not "
                             f"divide the {nranks} ranks into replicas", agreed=True)
    if seconds is None:  # rank 0's setting: the probe's rounds must be the same everywhere
        seconds = on_root(comm, costmodel.probe_seconds)
    machine = costmodel.probe(comm, spec.sizes, batch, spec.dtype.name, seconds)
    chosen, table = costmodel.choose(spec.sizes, batch, nranks, machine, spec.dtype.itemsize,
                                  layouts=candidates)
    table = costmodel.time_small(comm, spec.sizes, batch, spec.dtype.name, table,
                                  seconds * costmodel.TIME_SHARE)
    chosen = table[0]

    def text() -> str:
        links = (f"links {machine.bandwidth / 1e9:.2f} GB/s, latency {1e6 * machine.latency:.1f} us "
                 f"(alltoall on {comm.size} ranks)" if machine.measured_links else
                 f"links assumed {machine.bandwidth / 1e9:.2f} GB/s, {1e6 * machine.latency:.1f} us "
                 "(one rank: run under mpirun -n P to measure them)")
        lines = [f"{path}: {nranks} ranks, batch {batch}; measured GEMM {machine.gflops:.1f} "
                 f"GFLOP/s per rank (half of it at {machine.d_half:.0f} columns), {links}"]
        if any(ly.storage == "csr" for ly in spec.layers):
            lines.append("  (CSR layers are costed as dense: their exchange is at most this)")
        lines.append(costmodel.format_table(chosen, table, batch))
        lines.append(f"chosen: --replicas {chosen.layout.replicas} --strategy "
                     f"{chosen.layout.strategy} --micro-batches {chosen.layout.micro_batches}, "
                     f"predicted {1e3 * chosen.step:.1f} ms per step"
                     + (" (timed)" if chosen.timed is not None else ""))
        return "\n".join(lines)

    layer_ranks = None
    if chosen.layout.strategy == "layers":  # costed as dense layers: placed as dense layers
        layer_ranks = costmodel.layer_ranks(spec.sizes, chosen.layout.group)
    return chosen.layout, on_root(comm, text), layer_ranks
