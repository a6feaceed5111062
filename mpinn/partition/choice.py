"""One place that resolves which partition a job runs with: a stored one, a
strategy with its parameters, or the default; every rank alike."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np
from mpi4py import MPI

from mpinn.comm.collectives import on_root
from mpinn.errors import MpinnError
from mpinn.io import schema
from mpinn.partition import strategies


@dataclass
class PartitionChoice:
    """A stored partition by name, or a strategy and its params computed for this job."""

    name: str | None = None
    strategy: str = "balanced"
    params: dict[str, Any] = field(default_factory=dict)


def resolve_owner(f: h5py.File, spec: schema.ModelSpec, choice: PartitionChoice, nranks: int,
                  comm: MPI.Comm, node: np.ndarray | None = None) -> tuple[np.ndarray, str]:
    """Owner array for this job and a one-line description of where it came from
    (``node``: the node of each of the ``nranks`` ranks, for ``owner_for_strategy``)."""
    if choice.name is not None:
        owner, stored_ranks, strategy, _ = schema.read_partition(f, choice.name)
        if stored_ranks != nranks:
            raise MpinnError(f"partition {choice.name!r} was made for {stored_ranks} ranks but "
                             f"the job has {nranks}")
        return owner, f"partition {choice.name!r} ({strategy})"
    owner = owner_for_strategy(f, spec, nranks, choice.strategy, choice.params, comm, node)
    return owner, f"strategy {choice.strategy}"


def owner_for_strategy(f: h5py.File, spec: schema.ModelSpec, nranks: int, strategy: str,
                       params: dict[str, Any], comm: MPI.Comm,
                       node: np.ndarray | None = None) -> np.ndarray:
    """Owner array of ``strategy`` for this model (collective for the wiring-aware ones).

    ``nnz`` reads every layer's indptr (one integer per neuron). ``mincut`` partitions the
    wiring graph on rank 0, which reads the connections (never the weights) one layer at a
    time, and hands the owners to every rank; given ``node`` (the node of each of the
    ``nranks`` ranks) it places the parts that exchange the most on the same node.
    """
    if strategy not in strategies.WIRED:
        return strategies.partition(spec.sizes, nranks, strategy, params)
    wiring = strategies.Wiring(schema.read_row_nnz(f, spec), schema.wiring_reader(f, spec))
    if strategy == "nnz":
        return strategies.partition(spec.sizes, nranks, strategy, params, wiring)
    strategies.require_pymetis()  # on every rank: the same answer everywhere, before any wait
    return on_root(comm, lambda: strategies.partition(spec.sizes, nranks, strategy, params, wiring,
                                                       node))

# each strategy parameter and the strategy it belongs to
STRATEGY_OF = {"counts": "count", "percentages": "percentage", "ids": "ids",
               "layer_ranks": "layers"}


def partition_choice(strategy: str | None = None, *, counts: Any = None, percentages: Any = None,
                     ids: Any = None, layer_ranks: Any = None,
                     partition: str | None = None) -> PartitionChoice:
    """A stored ``partition`` by name, or a strategy with its parameters.

    Parameters are lists (``counts=[10, 20]``) or the command line's text (``"10,20"``);
    ``ids`` a dict {rank: [gid or [start, stop)]} or the path of such a JSON file. The
    strategy may be left out when one parameter names it (``counts`` -> count).
    """
    given = {key: value for key, value in (("counts", counts), ("percentages", percentages),
                                           ("ids", ids), ("layer_ranks", layer_ranks))
             if value is not None}
    if partition is not None:
        if strategy is not None or given:
            raise MpinnError("give partition= (a stored partition) or strategy= with its "
                             "parameters, not both")
        return PartitionChoice(str(partition))
    if strategy is None:
        implied = {STRATEGY_OF[key] for key in given}
        strategy = implied.pop() if len(implied) == 1 else "balanced"
    if strategy not in strategies.STRATEGIES:
        raise MpinnError(f"unknown partition strategy {strategy!r} "
                         f"(known: {', '.join(strategies.STRATEGIES)})")
    for key in given:
        if STRATEGY_OF[key] != strategy:
            raise MpinnError(f"{key}= applies to strategy={STRATEGY_OF[key]!r}, not {strategy!r}")
    if isinstance(ids, dict):
        params: dict[str, Any] = {"ids": {str(rank): spec for rank, spec in ids.items()}}
    else:
        params = strategies.params_from_flags(
            strategy, counts, percentages, None if ids is None else os.fspath(ids), layer_ranks)
    return PartitionChoice(None, strategy, params)
