"""Small model and data builders shared by the tests."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from mpinn.io import hdf5, schema

STRATEGIES = ("balanced", "count", "percentage", "ids", "layers")  # from the layer sizes alone
ALL_STRATEGIES = (*STRATEGIES, "nnz", "mincut")  # also from the wiring


def dtypes() -> tuple[str, ...]:
    """The dtypes of the MPI equivalence tests' cross products (strategy x dtype x model) at
    this job's rank count: both at 2 and 4 ranks, float64 alone (its 1e-10 tolerance tells
    the most) at 1 and 3. A dtype changes the element size of the buffers and messages, not
    who owns or sends what, which is what the rank count changes: each dtype still meets
    every strategy, exchange kind and model at two rank counts, one of them with two nodes'
    worth of ranks (the 3-rank pass: 705 items -> 523)."""
    from mpi4py import MPI

    return ("float32", "float64") if MPI.COMM_WORLD.size % 2 == 0 else ("float64",)


def strategy_params(strategy: str, sizes: list[int], nranks: int, tmp: str | None = None) -> dict:
    """Deliberately uneven params of each strategy for a job of ``nranks`` ranks."""
    total = sum(sizes)
    if strategy == "balanced":
        return {}
    if strategy == "count":
        # rank 0 takes a big head, the rest split what is left, the last one the remainder
        weights = np.arange(nranks, 0, -1, dtype=float)
        counts = np.floor(weights / weights.sum() * total).astype(int)
        counts[-1] += total - counts.sum()
        return {"counts": counts.tolist()}
    if strategy == "percentage":
        pct = np.full(nranks, 100.0 / nranks)
        if nranks > 1:
            pct[0] += 10.0
            pct[1] -= 10.0
        return {"percentages": pct.tolist()}
    if strategy == "ids":
        # scattered ownership: gid g goes to a pseudo-random rank, written as single ids and ranges
        rng = np.random.default_rng(7)
        owner = rng.integers(0, nranks, size=total)
        spec: dict[str, list] = {str(r): [] for r in range(nranks)}
        for start, stop in hdf5.runs(np.arange(total)):
            g = int(start)
            while g < stop:
                end = g
                while end + 1 < stop and owner[end + 1] == owner[g]:
                    end += 1
                spec[str(owner[g])].append([g, end + 1] if end > g else g)
                g = end + 1
        if tmp is not None:
            with open(tmp, "w") as fh:
                json.dump(spec, fh)
        return {"ids": spec}
    if strategy == "layers":
        return {"layer_ranks": [(len(sizes) - 1 - i) % nranks for i in range(len(sizes))]}
    if strategy in ("nnz", "mincut"):
        return {}
    raise ValueError(strategy)


def grouped_network(sizes: list[int], groups: int, fan_in: int, seed: int,
                    partner_reads: int = 0) -> list:
    """CSR layers wired local by construction: every layer's neurons fall into ``groups``
    groups and read only inputs of their own group; the groups are hidden by a random
    numbering of each layer, so contiguous blocks of ids cut almost every connection.
    With ``partner_reads`` k, k of each neuron's inputs come from its partner group (g xor
    1) instead: pairs of groups that belong on one node."""
    import scipy.sparse as sp
    rng = np.random.default_rng(seed)
    group = [rng.permutation(n) % groups for n in sizes]
    layers = []
    for layer in range(1, len(sizes)):
        members = [np.flatnonzero(group[layer - 1] == g) for g in range(groups)]
        columns = [np.sort(rng.choice(members[g], fan_in, replace=False)) if not partner_reads
                   else np.sort(np.concatenate([
                       rng.choice(members[g], fan_in - partner_reads, replace=False),
                       rng.choice(members[g ^ 1], partner_reads, replace=False)]))
                   for g in group[layer]]
        indptr = np.arange(0, fan_in * (sizes[layer] + 1), fan_in)
        values = rng.uniform(-0.5, 0.5, size=fan_in * sizes[layer])
        layers.append(sp.csr_matrix((values, np.concatenate(columns), indptr),
                                    shape=(sizes[layer], sizes[layer - 1])))
    return layers


def classification_data(n: int, n_in: int, n_out: int, seed: int, dtype: str):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, n_in)).astype(dtype), rng.integers(0, n_out, size=n).astype(np.int64)


def regression_data(n: int, n_in: int, n_out: int, seed: int, dtype: str):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, n_in)).astype(dtype), rng.normal(size=(n, n_out)).astype(dtype)


def file_content(path: str | os.PathLike[str]) -> dict[str, object]:
    """Every dataset and attribute of an HDF5 file by name: all that a checkpoint holds."""
    items: dict[str, object] = {}
    with h5py.File(path, "r") as f:
        def visit(name: str, obj: h5py.HLObject) -> None:
            items.update({f"{name}@{key}": value for key, value in obj.attrs.items()})
            if isinstance(obj, h5py.Dataset):
                items[name] = obj[...]
        visit("/", f)
        f.visititems(visit)
    return items


def assert_same_checkpoint(model: str | os.PathLike[str], expected: str | os.PathLike[str]) -> None:
    """``model`` holds exactly what ``expected`` holds: weights, optimizer state, counters
    (every commit's own random id apart)."""
    have, want = file_content(model), file_content(expected)
    for content in (have, want):
        assert content.pop(f"/@{schema.CHECKPOINT_ID}", None) is not None, "no commit id"
    assert have.keys() == want.keys(), sorted(set(have) ^ set(want))
    differ = [name for name in want if not np.array_equal(have[name], want[name])]
    assert not differ, f"{model} differs from {os.path.basename(expected)} in {differ}"


@contextmanager
def small_tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` ("400k") mounted at ``mount`` (made here) for the block, then
    unmounted: a disk that fills up. Skipped without root (mount needs it); as root a mount
    that fails is a failure, not a skip."""
    import pytest
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        (pytest.fail if os.geteuid() == 0 else pytest.skip)(
            f"cannot mount a small tmpfs here: {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
