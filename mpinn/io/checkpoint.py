"""Crash-safe writes of a model: write a copy, sync it, rename it into place, keep
the previous ones (``--keep``); readers never see a half-written file."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mpinn.io.hdf5 import MPI_IO, open_file, safe_to_close
from mpinn.io.schema import (
    CHECKPOINT_ID,
    FORMAT_VERSION,
    ID_GLOB,
    new_checkpoint_id,
    read_checkpoint_id,
    write_partition,
)

if TYPE_CHECKING:
    from mpinn.io.schema import ModelSpec, Partitions

import glob
import json
import os
import sys
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import h5py
import numpy as np
from mpi4py import MPI

from mpinn._testing.faults import inject_fault
from mpinn.comm.collectives import take_turn
from mpinn.errors import MpinnError
from mpinn.io.staging import PARTIAL, commit, discard, keep_mode, partial_name


class Checkpoint:
    """A complete new model file, written beside ``path`` and swapped in atomically.

    Entering creates ``<path>.<id>.partial`` with the model's layout and the stored partitions
    (collective); the caller writes every rank's rows into it. Leaving without an error
    flushes it to storage (MPI_File_sync) and has rank 0 ``rename`` it over ``path``: a
    job killed at any moment leaves ``path`` holding either the previous or the new
    state, never a mixture. With ``keep`` > 1 the replaced file is kept, hard-linked, in
    ``<path>.checkpoints/`` and the oldest beyond ``keep - 1`` there are removed. The new
    file carries a new commit id (``ident``, else a fresh one): readers check it
    (``check_same_commit``).
    """

    def __init__(self, path: str, spec: ModelSpec, partitions: Partitions, comm: MPI.Comm,
                 keep: int = 1, label: str = "", ident: str | None = None) -> None:
        if keep < 1:
            raise MpinnError(f"--keep must be at least 1, got {keep}")
        self.path, self.spec, self.partitions, self.comm = path, spec, partitions, comm
        self.keep, self.label = keep, label
        self.ident = ident if ident is not None else new_checkpoint_id(comm)
        # a name never used before: a node whose client cache still maps an old name to
        # the file it was renamed to (the model itself) cannot write its rows there
        self.partial = partial_name(f"{path}.{self.ident}")
        self.file: h5py.File | None = None
        self._turn: AbstractContextManager[None] = nullcontext()

    def __enter__(self) -> h5py.File:
        first = MPI_IO or self.comm.rank == 0  # creates the file and its layout
        if self.comm.rank == 0:
            for leftover in leftovers(self.path):  # of a killed job; this one holds the lock
                discard(leftover)
        if not MPI_IO:
            self._turn = take_turn(self.comm)
            self._turn.__enter__()  # the ranks write one after another
        f = self.file = open_file(self.partial, "w" if first else "r+", self.comm)
        try:
            if first:
                self._layout(f)
            inject_fault("save-begun", self.comm.rank)
        except BaseException as exc:
            if safe_to_close(exc):
                f.close()
            self._abandon(exc)
            raise
        return f

    def _abandon(self, exc: BaseException) -> None:
        """Drop the unfinished file (unlinking is safe while open) and say what happened.

        Any failing rank removes it: a rank that failed alone (a full disk seen by one
        writer) may leave rank 0 inside a collective until the job is aborted, and the
        others never rename a file they did not finish."""
        discard(self.partial)
        if isinstance(exc, OSError):
            raise MpinnError(f"{self.path}: writing the checkpoint failed ({exc}; is the disk "
                             "full?); the previous checkpoint in the file is intact") from exc

    def _layout(self, f: h5py.File) -> None:
        inject_fault("save", self.comm.rank)
        f.attrs["mpinn_format_version"] = FORMAT_VERSION
        f.attrs[CHECKPOINT_ID] = self.ident
        f.attrs["sizes"] = np.asarray(self.spec.sizes, dtype=np.int64)
        for ly in self.spec.layers:
            group = f.create_group(f"layers/{ly.index}")
            group.attrs["activation"] = ly.activation
            group.attrs["storage"] = ly.storage
            if ly.cap is not None:
                group.attrs["cap"] = ly.cap
            if ly.negative_slope is not None:
                group.attrs["negative_slope"] = ly.negative_slope
            if ly.dropout:
                group.attrs["dropout"] = ly.dropout
            if ly.sparse:
                group.create_dataset("indptr", (ly.n_out + 1,), np.int64)
                index_type = np.int32 if ly.n_in < 2**31 else np.int64
                group.create_dataset("indices", (ly.nnz,), index_type)
                group.create_dataset("data", (ly.nnz,), self.spec.dtype)
            else:
                group.create_dataset("weight", (ly.n_out, ly.n_in), self.spec.dtype)
            group.create_dataset("bias", (ly.n_out,), self.spec.dtype)
        for name, (owner, nranks, strategy, params) in self.partitions.items():
            write_partition(f, name, owner, nranks, strategy, params, self.comm)

    def __exit__(self, exc_type: type | None, exc: BaseException | None, _tb: object) -> None:
        assert self.file is not None
        if exc is not None:
            if safe_to_close(exc):
                self.file.close()
            self._abandon(exc)
            return  # the model file was not touched
        inject_fault("save-written", self.comm.rank)
        inject_fault("sync", self.comm.rank)
        self.file.flush()  # collective MPI_File_sync: the data is on storage before the rename
        self.file.close()
        inject_fault("save-synced", self.comm.rank)
        if not MPI_IO:
            self._turn.__exit__(None, None, None)  # hand the file to the next rank
        self.comm.Barrier()  # every rank's rows are written
        self._check_written()
        if self.comm.rank == 0:
            self._commit()
        self.comm.Barrier()

    def _check_written(self) -> None:
        """Before the rename: every rank reopens the new file and finds this commit's id.

        A node whose client cache still maps the name to an older file wrote its rows
        elsewhere; renaming would replace the model with a file missing them."""
        try:
            with open_file(self.partial, "r", self.comm) as f:
                check_same_commit(f, self.path, self.comm, expected=self.ident, written=True)
        except MpinnError as exc:
            discard(self.partial)
            raise exc from None

    def _commit(self) -> None:
        if self.keep > 1 and os.path.exists(self.path):
            try:
                self._keep_previous()
            except OSError as exc:  # checked before training; never lose the new checkpoint
                print(f"mpinn: warning: {self.path}: the previous checkpoint was not kept in "
                      f"{self.path}.checkpoints/ ({exc}); the new one is committed",
                      file=sys.stderr, flush=True)
        keep_mode(self.path, self.partial)  # a model made private (0600) stays private
        inject_fault("save-rename", self.comm.rank)
        commit(self.partial, self.path)  # whatever the I/O driver did: synced, renamed, synced
        inject_fault("save-renamed", self.comm.rank)

    def _keep_previous(self) -> None:
        """Hard-link the file being replaced into ``PATH.checkpoints/`` and drop the oldest
        there beyond ``keep - 1``."""
        history = f"{self.path}.checkpoints"
        os.makedirs(history, exist_ok=True)
        kept = os.path.join(history, self.label or "previous.h5")
        if os.path.exists(kept):
            os.remove(kept)
        os.link(self.path, kept)
        older = sorted((os.path.join(history, n) for n in os.listdir(history)),
                       key=os.path.getmtime)
        for stale in older[: max(0, len(older) - (self.keep - 1))]:
            os.remove(stale)


def leftovers(path: str) -> list[str]:
    """The unfinished checkpoints of ``path`` that killed jobs left beside it."""
    return (glob.glob(f"{glob.escape(path)}.{ID_GLOB}{PARTIAL}")
            + glob.glob(glob.escape(partial_name(path))))


def check_history(path: str, keep: int) -> None:
    """Before any training with ``keep`` > 1: ``PATH.checkpoints`` must be a writable
    directory holding only files, since each commit links into it and removes its oldest
    entries; refused otherwise, rather than found at the first commit."""
    history = f"{path}.checkpoints"
    if keep <= 1 or not os.path.lexists(history):
        return
    if not os.path.isdir(history):
        raise MpinnError(f"--keep {keep}: {history} is a file, not the directory of older "
                         "checkpoints; move it away")
    for entry in os.scandir(history):
        if entry.is_dir(follow_symlinks=False):
            raise MpinnError(f"--keep {keep}: {entry.path} is a directory, which pruning the "
                             f"older checkpoints in {history}/ cannot remove; move it away")
    if not os.access(history, os.W_OK | os.X_OK):
        raise MpinnError(f"--keep {keep}: {history} is not writable")


def read_state_value(path: str, key: str) -> Any:
    """The /state attribute ``key`` of the file at ``path`` (one process), or None when it
    is not an HDF5 file, has no such attribute, or it is not JSON."""
    try:
        with h5py.File(path, "r") as f:
            state = f.get("state")
            value = state.attrs.get(key) if isinstance(state, h5py.Group) else None
        return json.loads(value) if value is not None else None
    except (OSError, ValueError, TypeError, KeyError):
        return None


UNREADABLE = "nothing readable"  # where a rank's read of the commit id failed


def check_same_commit(f: h5py.File, path: str, comm: MPI.Comm, expected: str | None = None,
                      written: bool = False) -> None:
    """Every rank of ``comm`` opened the same commit of the model (``expected``, the one just
    written, when given), else one agreed error (collective). ``written``: ``f`` is the new
    file before its rename, and the error says the model was left as it was.

    On a network filesystem whose clients cache names or pages (Gluster's defaults, NFS
    without close-to-open consistency) a node can open the file a checkpoint replaced: the
    job would go on from old weights on some ranks without a word."""
    try:
        mine: str | None = read_checkpoint_id(f)
    except OSError as exc:  # a stale handle mid-read: HDF5 then finds garbage where the id was
        mine = f"{UNREADABLE} ({exc})"
    seen = comm.allgather(mine)
    agreed = len(set(seen)) == 1 and not str(seen[0]).startswith(UNREADABLE)
    if agreed and (expected is None or seen[0] == expected):
        return
    by_id: dict[str | None, list[int]] = {}
    for rank, ident in enumerate(seen):
        by_id.setdefault(ident, []).append(rank)
    read = "; ".join(f"rank{'s' if len(ranks) > 1 else ''} {','.join(map(str, ranks))} "
                     f"read {ident or 'a file without an id'}" for ident, ranks in by_id.items())
    just = f", not the commit {expected} just written" if expected is not None else ""
    what = "the new checkpoint" if written else "the model"
    then = ("the checkpoint was not committed" if written else "nothing was trained from it")
    raise MpinnError(f"{path}: the ranks opened different or old commits of {what} ({read}"
                     f"{just}): a stale copy served by the filesystem, most likely its client "
                     f"caching across nodes (see docs/filesystems.md); {then}", agreed=True)
