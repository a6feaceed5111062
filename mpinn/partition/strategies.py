"""The Neuron Distributor: partition strategies that map every global neuron id to a rank.

Every function here is pure: it takes layer sizes and a rank count and returns the
``owner`` array (int32, one entry per global id, layer 0 = the input features included).
All ranks compute it identically, so no communication is needed to agree on it.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mpinn.errors import MpinnError

STRATEGIES = ("balanced", "count", "percentage", "ids", "layers", "nnz", "mincut")
WIRED = ("nnz", "mincut")  # strategies that look at the wiring, not only at the layer sizes
EXHAUSTIVE_PARTS = 8  # onto_nodes tries every placement of up to this many parts (8! = 40,320)


@dataclass
class Wiring:
    """What the wiring-aware strategies look at: stored weights per neuron of every layer
    and, for ``mincut``, the connections of each CSR layer (None for a dense layer)."""

    row_nnz: list[np.ndarray]
    layer_edges: Callable[[int], tuple[np.ndarray, np.ndarray] | None] | None = None


def blockdist(n: int, size: int, rank: int) -> tuple[int, int]:
    """Length and start of ``rank``'s contiguous block when ``n`` items are split ``size`` ways.

    The first ``n % size`` ranks get one item more, as in mpi4py-fft's ``_blockdist``.
    """
    q, r = divmod(n, size)
    length = q + (1 if rank < r else 0)
    start = rank * q + min(rank, r)
    return length, start


def _check_nranks(nranks: int, sizes: Sequence[int] | None = None) -> None:
    if nranks < 1:
        raise MpinnError(f"rank count must be at least 1, got {nranks}")
    if sizes is not None and nranks > sum(sizes):
        raise MpinnError(f"{nranks} ranks for a model of {sum(sizes)} neurons: some ranks would "
                         "own no neuron at all; use at most as many ranks as neurons")


def balanced(sizes: Sequence[int], nranks: int) -> np.ndarray:
    """Every layer split into contiguous, near-equal blocks across all ranks."""
    _check_nranks(nranks)
    ranks = np.arange(nranks)
    parts = []
    for n in sizes:
        lengths = n // nranks + (ranks < n % nranks)  # blockdist for every rank at once
        parts.append(np.repeat(ranks.astype(np.int32), lengths))
    return np.concatenate(parts)


def by_count(sizes: Sequence[int], nranks: int, counts: Sequence[int]) -> np.ndarray:
    """``counts[r]`` neurons to rank r, taken in global-id order."""
    _check_nranks(nranks)
    total = int(sum(sizes))
    counts = [int(c) for c in counts]
    if len(counts) != nranks:
        raise MpinnError(f"--counts gives {len(counts)} entries but the job has {nranks} ranks")
    if any(c < 0 for c in counts):
        raise MpinnError(f"--counts must not be negative: {counts}")
    if sum(counts) != total:
        raise MpinnError(f"--counts sum to {sum(counts)} but the model has {total} neurons "
                         f"(sizes {','.join(map(str, sizes))})")
    return np.repeat(np.arange(nranks, dtype=np.int32), counts)


def by_percentage(sizes: Sequence[int], nranks: int, percentages: Sequence[float]) -> np.ndarray:
    """``percentages[r]`` % of all neurons to rank r, in global-id order (largest remainder)."""
    _check_nranks(nranks)
    pct = np.asarray([float(p) for p in percentages], dtype=np.float64)
    if len(pct) != nranks:
        raise MpinnError(f"--percentages gives {len(pct)} entries but the job has {nranks} ranks")
    if np.any(~np.isfinite(pct)) or np.any(pct < 0):
        raise MpinnError(f"--percentages must be finite and not negative: {list(percentages)}")
    if abs(pct.sum() - 100.0) > 1e-6:
        raise MpinnError(f"--percentages sum to {pct.sum():g}, not 100")
    total = int(sum(sizes))
    exact = pct / 100.0 * total
    counts = np.floor(exact).astype(np.int64)
    short = total - int(counts.sum())
    # hand the neurons lost to rounding to the largest remainders, lowest rank first on ties
    order = np.lexsort((np.arange(nranks), -(exact - counts)))
    counts[order[:short]] += 1
    return by_count(sizes, nranks, counts.tolist())


def by_ids(sizes: Sequence[int], nranks: int, spec: dict[str, Any]) -> np.ndarray:
    """Explicit ownership: ``{"rank": [gid, [start, stop], ...]}``; every id exactly once."""
    _check_nranks(nranks)
    total = int(sum(sizes))
    if not isinstance(spec, dict):
        raise MpinnError("--ids file must hold a JSON object mapping each rank to a list of ids")
    owner = np.full(total, -1, dtype=np.int32)
    for key, items in spec.items():
        try:
            rank = int(key)
        except (TypeError, ValueError):
            raise MpinnError(f"--ids: key {key!r} is not a rank number") from None
        if not 0 <= rank < nranks:
            raise MpinnError(f"--ids: rank {rank} is outside 0..{nranks - 1} for a {nranks}-rank job")
        if not isinstance(items, list):
            raise MpinnError(f"--ids: rank {rank} must map to a list of ids or [start, stop) ranges")
        for item in items:
            ids = _id_range(item, rank, total)
            taken = owner[ids] >= 0
            if taken.any():
                gid = int(ids[np.argmax(taken)])
                raise MpinnError(f"--ids: global id {gid} is given to rank {owner[gid]} "
                                 f"and to rank {rank} (overlap)")
            owner[ids] = rank
    missing = np.flatnonzero(owner < 0)
    if missing.size:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if missing.size > 10 else "")
        raise MpinnError(f"--ids: {missing.size} global ids are given to no rank (gap): {shown}")
    return owner


def _id_range(item: Any, rank: int, total: int) -> np.ndarray:
    """The ids one entry names, its bounds checked before it is expanded."""
    whole = (int, np.integer)
    if isinstance(item, whole) and not isinstance(item, bool):
        start, stop = int(item), int(item) + 1
    elif (isinstance(item, list) and len(item) == 2
          and all(isinstance(v, whole) and not isinstance(v, bool) for v in item)):
        start, stop = int(item[0]), int(item[1])
        if stop < start:
            raise MpinnError(f"--ids: rank {rank} has range [{start}, {stop}) with stop < start")
    else:
        shown = json.dumps(item) if len(repr(item)) < 80 else repr(item)[:80] + "..."
        raise MpinnError(f"--ids: rank {rank} has entry {shown}; expected a global id "
                         "or a [start, stop) pair")
    if stop > start and (start < 0 or stop > total):
        bad = start if start < 0 else stop - 1
        raise MpinnError(f"--ids: global id {bad} of rank {rank} is out of range 0..{total - 1}")
    return np.arange(start, stop)


def by_layers(sizes: Sequence[int], nranks: int, layer_ranks: Sequence[int]) -> np.ndarray:
    """Whole layers to ranks: layer l (0 = inputs) goes to ``layer_ranks[l]``."""
    _check_nranks(nranks)
    layer_ranks = [int(r) for r in layer_ranks]
    if len(layer_ranks) != len(sizes):
        raise MpinnError(f"--layer-ranks gives {len(layer_ranks)} entries but the model has "
                         f"{len(sizes)} layers counting the inputs (sizes {','.join(map(str, sizes))})")
    for layer, rank in enumerate(layer_ranks):
        if not 0 <= rank < nranks:
            raise MpinnError(f"--layer-ranks: layer {layer} goes to rank {rank}, "
                             f"outside 0..{nranks - 1} for a {nranks}-rank job")
    return np.repeat(np.asarray(layer_ranks, dtype=np.int32), list(sizes))


def by_nnz(sizes: Sequence[int], nranks: int, row_nnz: Sequence[np.ndarray]) -> np.ndarray:
    """Every layer split into contiguous blocks of near-equal stored weights (the work of a
    sparse layer), rather than of near-equal neuron counts. Inputs are split by count."""
    _check_nranks(nranks)
    parts = [balanced(sizes[:1], nranks)]
    for n, weights in zip(sizes[1:], row_nnz, strict=True):
        total = int(weights.sum())
        if total == 0:
            parts.append(balanced([n], nranks))
            continue
        # a neuron goes to the block its weight's midpoint falls in: contiguous, monotone
        middle = np.cumsum(weights) - weights / 2.0
        parts.append(np.minimum(middle * nranks // total, nranks - 1).astype(np.int32))
    return np.concatenate(parts)


def layer_blocks(sizes: Sequence[int], nranks: int, row_nnz: Sequence[np.ndarray]) -> list[int]:
    """``layer_ranks`` for the layers strategy: contiguous groups of layers of near-equal
    stored weights, the inputs with the first layer (a pipeline's stages)."""
    work = np.array([float(w.sum()) for w in row_nnz])
    middle = np.cumsum(work) - work / 2.0
    ranks = np.minimum(middle * nranks // max(work.sum(), 1.0), nranks - 1).astype(int).tolist()
    return ranks[:1] + ranks


def by_mincut(sizes: Sequence[int], nranks: int, wiring: Wiring, seed: int = 0,
              node: np.ndarray | None = None) -> np.ndarray:
    """Per-layer METIS partitions, chained so that neurons land where their inputs live.

    For each layer in turn: the layer's neurons form a graph whose edge weights count the
    inputs two neurons share (B B^T for the layer's pattern B); METIS splits it into
    ``nranks`` parts of near-equal stored weights (balance weight = each neuron's nnz), so
    neurons that read the same inputs share a rank and each input travels to few ranks.
    The parts are then matched to ranks (an assignment problem) to maximise the inputs
    each rank already owns. Inputs go to the rank that reads them most.

    Per layer, not one partition of the whole network: pymetis exposes one balance
    constraint, and under one constraint the best cut of a deep network runs between
    layers, which leaves all but one rank idle at every layer of an SPMD pass (that
    partition is what ``layers`` with ``--micro-batches`` is for). Dense layers, whose
    every split cuts the same connections, are split evenly.

    Node-aware with ``node`` (the node of each rank): the parts are then placed on ranks so
    that the parts exchanging the most values share a node (``onto_nodes``, the same
    relabelling for every layer, so the chaining holds): the bytes crossing the slow links
    are minimised over placements, never more than without.
    """
    _check_nranks(nranks)
    pymetis = require_pymetis()
    import scipy.sparse as sp
    from scipy.optimize import linear_sum_assignment

    owners: list[np.ndarray | None] = [None] * len(sizes)
    traffic = np.zeros((nranks, nranks), dtype=np.int64)  # values per sample, part to part
    dense = []
    for layer in range(1, len(sizes)):
        n_out, n_in = sizes[layer], sizes[layer - 1]
        edges = wiring.layer_edges(layer) if wiring.layer_edges is not None else None
        if edges is None or nranks == 1:
            owners[layer] = balanced([n_out], nranks)
            dense.append(layer)
            continue
        indptr, indices = edges
        pattern = sp.csr_matrix((np.ones(indices.size, np.int64), indices, indptr), (n_out, n_in))
        shared = (pattern @ pattern.T).tocsr()
        shared.setdiag(0)
        shared.eliminate_zeros()
        shared.sort_indices()
        weights = np.maximum(wiring.row_nnz[layer - 1], 1).astype(np.int64)
        if shared.nnz == 0 or n_out < nranks:
            parts = balanced([n_out], nranks)
        else:
            _, parts = pymetis.part_graph(
                nranks, pymetis.CSRAdjacency(shared.indptr, shared.indices), vweights=weights,
                eweights=shared.data.astype(np.int64), options=pymetis.Options(seed=seed))
            parts = np.asarray(parts, dtype=np.int64)
        previous = owners[layer - 1]
        if previous is not None:
            # affinity[k, r]: connections of part k's neurons to inputs rank r owns
            rows = np.repeat(np.arange(n_out), np.diff(indptr))
            affinity = np.zeros((nranks, nranks), dtype=np.int64)
            np.add.at(affinity, (parts[rows], previous[indices]), 1)
            part_of, rank_of = linear_sum_assignment(-affinity)
            mapping = np.empty(nranks, dtype=np.int64)
            mapping[part_of] = rank_of
            parts = mapping[parts]
        owners[layer] = parts.astype(np.int32)
        if layer == 1:
            owners[0] = _inputs_to_readers(n_in, nranks, indptr, indices, owners[1])
        if node is not None:
            rows = np.repeat(np.arange(n_out), np.diff(indptr))
            read = np.unique(indices.astype(np.int64) * nranks + owners[layer][rows])
            np.add.at(traffic, (owners[layer - 1][read // nranks], read % nranks), 1)
    if owners[0] is None:
        owners[0] = balanced(sizes[:1], nranks)
    owner = np.concatenate(owners).astype(np.int32)
    if node is None:
        return owner
    for layer in dense:  # every rank with rows reads the whole layer below
        readers = np.bincount(owners[layer], minlength=nranks) > 0
        traffic += np.outer(np.bincount(owners[layer - 1], minlength=nranks), readers)
    return onto_nodes(traffic, node)[owner].astype(np.int32)


def onto_nodes(traffic: np.ndarray, node: np.ndarray) -> np.ndarray:
    """The rank each part goes to (parts numbered as ranks): the parts that exchange the
    most values share a node. ``traffic[s, d]``: values sent from part s to part d;
    ``node``: the node of each rank. Pure.

    Up to ``EXHAUSTIVE_PARTS`` parts every placement is tried. Beyond, greedy, then refined:
    each node (largest first) is filled from the free part with the most traffic, adding
    the free part most connected to those placed; then the best swap of two parts on
    different nodes is made while it lowers the values between nodes (Kernighan-Lin's
    move, O(P^2) a pass). Parts keep their order inside a node. The identity is kept unless
    the result sends strictly fewer values between nodes.
    """
    p = traffic.shape[0]
    node = np.asarray(node, dtype=np.int64)
    if node.shape != (p,):
        raise MpinnError(f"the node list names {node.size} ranks, the partition has {p}")
    groups = [np.flatnonzero(node == n) for n in np.unique(node)]
    if len(groups) in (1, p):  # one node, or a rank per node: every placement is alike
        return np.arange(p)
    w = (traffic + traffic.T).astype(np.float64)
    np.fill_diagonal(w, 0)

    def between(rank: np.ndarray) -> np.ndarray:
        """Values between nodes of each placement (rows of ``rank``: part -> rank)."""
        on = node[rank]
        return (w * (on[..., :, None] != on[..., None, :])).sum(axis=(-2, -1))

    identity = np.arange(p)
    if p <= EXHAUSTIVE_PARTS:
        every = np.array(list(itertools.permutations(range(p))), dtype=np.int64)
        cost = between(every)
        best = every[np.argmin(cost)]
        return best if cost.min() < between(identity) else identity
    on = np.full(p, -1, dtype=np.int64)  # node index of each part
    for g in sorted(range(len(groups)), key=lambda g: -groups[g].size):
        free = np.flatnonzero(on < 0)
        first = free[np.argmax(w[np.ix_(free, free)].sum(axis=1))]
        on[first] = g
        for _ in range(groups[g].size - 1):
            free = np.flatnonzero(on < 0)
            on[free[np.argmax(w[np.ix_(on == g, free)].sum(axis=0))]] = g
    for _ in range(p * p):
        conn = w @ (on[:, None] == np.arange(len(groups))[None, :])  # (part, node) values
        own = conn[np.arange(p), on]
        across = conn[:, on]  # across[a, b]: a's connections to b's node
        delta = own[:, None] - across + own[None, :] - across.T + 2 * w
        delta[on[:, None] == on[None, :]] = np.inf
        a, b = np.unravel_index(np.argmin(delta), delta.shape)
        if delta[a, b] >= -1e-9:
            break
        on[a], on[b] = on[b], on[a]
    rank_of = np.empty(p, dtype=np.int64)
    for g, ranks in enumerate(groups):
        rank_of[np.flatnonzero(on == g)] = ranks
    return rank_of if between(rank_of) < between(identity) else identity


def _inputs_to_readers(n_in: int, nranks: int, indptr: np.ndarray, indices: np.ndarray,
                       readers: np.ndarray) -> np.ndarray:
    """Each input feature to the rank whose rows read it most (unread ones evenly)."""
    rows = np.repeat(np.arange(indptr.size - 1), np.diff(indptr))
    counts = np.bincount(indices * nranks + readers[rows], minlength=n_in * nranks)
    counts = counts.reshape(n_in, nranks)
    owner = np.argmax(counts, axis=1).astype(np.int32)
    unread = counts.sum(axis=1) == 0
    owner[unread] = balanced([n_in], nranks)[unread]
    return owner


def require_pymetis():  # noqa: ANN201 - the module, imported late: it is an optional extra
    """pymetis, or a clear error naming the extra that installs it."""
    try:
        import pymetis
    except ImportError:
        raise MpinnError("strategy 'mincut' needs pymetis: pip install 'mpinn[partition]' "
                         "(or pip install pymetis)") from None
    return pymetis


def _parse_list(text: str | list, kind: type, flag: str) -> list:
    """``"1,2,3"`` from the command line, or ``[1, 2, 3]`` from a TOML config."""
    try:
        if isinstance(text, list):
            return [kind(v) for v in text]
        return [kind(v) for v in str(text).split(",") if v.strip() != ""]
    except ValueError:
        raise MpinnError(f"{flag}: cannot read {text!r} as a comma-separated list") from None


def partition(sizes: Sequence[int], nranks: int, strategy: str,
              params: dict[str, Any] | None = None, wiring: Wiring | None = None,
              node: np.ndarray | None = None) -> np.ndarray:
    """Owner array for ``strategy`` with its ``params`` (as stored in a partition's JSON);
    ``nnz`` and ``mincut`` also need the model's ``wiring``; ``mincut`` places its parts on
    nodes by traffic where ``node`` (the node of each rank) is given."""
    params = params or {}
    _check_nranks(nranks, sizes)
    if strategy not in STRATEGY_FUNCTIONS:
        raise MpinnError(f"unknown partition strategy {strategy!r} "
                         f"(known: {', '.join(STRATEGIES)})")
    if strategy in WIRED and wiring is None:
        raise MpinnError(f"strategy {strategy!r} needs the model's wiring")
    return STRATEGY_FUNCTIONS[strategy](sizes, nranks, params, wiring, node)


# every strategy: (sizes, nranks, params, wiring, node) -> owner array. A new strategy is a
# function above and a line here (and its name in STRATEGIES, which the CLI offers)
STRATEGY_FUNCTIONS: dict[str, Callable[..., np.ndarray]] = {
    "balanced": lambda sizes, n, params, wiring, node: balanced(sizes, n),
    "count": lambda sizes, n, params, wiring, node: by_count(
        sizes, n, _require(params, "counts", "count")),
    "percentage": lambda sizes, n, params, wiring, node: by_percentage(
        sizes, n, _require(params, "percentages", "percentage")),
    "ids": lambda sizes, n, params, wiring, node: by_ids(sizes, n, _require(params, "ids", "ids")),
    "layers": lambda sizes, n, params, wiring, node: by_layers(
        sizes, n, _require(params, "layer_ranks", "layers")),
    "nnz": lambda sizes, n, params, wiring, node: by_nnz(sizes, n, wiring.row_nnz),
    "mincut": lambda sizes, n, params, wiring, node: by_mincut(
        sizes, n, wiring, int(params.get("seed", 0)), node),
}
if tuple(STRATEGY_FUNCTIONS) != STRATEGIES:
    raise ImportError("STRATEGY_FUNCTIONS and STRATEGIES name different strategies")


def _require(params: dict[str, Any], key: str, strategy: str) -> Any:
    if key not in params:
        flag = "--" + key.replace("_", "-")
        raise MpinnError(f"strategy {strategy!r} needs {flag}")
    return params[key]


def params_from_flags(strategy: str, counts: str | None = None, percentages: str | None = None,
                      ids: str | None = None, layer_ranks: str | None = None) -> dict[str, Any]:
    """Turn the CLI's strategy flags into the JSON-able params stored with a partition."""
    if strategy == "count" and counts is not None:
        return {"counts": _parse_list(counts, int, "--counts")}
    if strategy == "percentage" and percentages is not None:
        return {"percentages": _parse_list(percentages, float, "--percentages")}
    if strategy == "layers" and layer_ranks is not None:
        return {"layer_ranks": _parse_list(layer_ranks, int, "--layer-ranks")}
    if strategy == "ids" and ids is not None:
        path = Path(ids)
        try:
            return {"ids": json.loads(path.read_text())}
        except OSError as exc:
            raise MpinnError(f"--ids: cannot read {path}: {exc.strerror}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MpinnError(f"--ids: {path} is not valid JSON: {exc}") from None
        except RecursionError:
            raise MpinnError(f"--ids: {path} nests too deeply to be a map of ranks to ids") from None
    return {}
