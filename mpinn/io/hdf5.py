"""Opening HDF5 files on every rank (parallel HDF5 with MPI-IO, or the serial
fallback) and reading or writing one rank's slice of a dataset collectively."""

from __future__ import annotations

import errno
import functools
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import h5py
import numpy as np
from mpi4py import MPI

from mpinn.errors import MpinnError

T = TypeVar("T")

# Elements each dataset has been asked to deliver to this rank, for tests and benchmarks.
READ_STATS: Counter[str] = Counter()

# Parallel HDF5 when h5py has it (MPINN_IO=independent forces the fallback, for tests):
# otherwise ranks read their slices independently and write one at a time.
MPI_IO = bool(h5py.get_config().mpi) and os.environ.get("MPINN_IO", "mpio") != "independent"
_warned = False


def warn_without_mpi_io(comm: MPI.Comm) -> None:
    """Say once, on rank 0, that writes are funnelled because HDF5 has no MPI support."""
    global _warned
    if MPI_IO or comm.size == 1:  # a one-process open (a data file's size) says nothing yet
        return
    if comm.rank == 0 and not _warned:
        print("mpinn: warning: h5py has no MPI support (serial HDF5): ranks read their rows "
              "independently and write them one rank at a time", file=sys.stderr, flush=True)
    _warned = True


# ---------------------------------------------------------------- opening files

HINTS_VARIABLE = "MPINN_MPIIO_HINTS"


def mpiio_hints() -> MPI.Info:
    """The MPI-IO hints (made once per value of the variable, kept for the process)."""
    return _hints(os.environ.get(HINTS_VARIABLE, "").strip())


@functools.lru_cache(maxsize=4)
def _hints(text: str) -> MPI.Info:
    """The MPI-IO hints every parallel open passes to the MPI library, from
    ``MPINN_MPIIO_HINTS="key=value,key=value"`` (for example ``striping_factor=8``,
    ``cb_nodes=2``, ``romio_cb_write=enable``; docs/filesystems.md). Hints the MPI library
    does not know are ignored by it, as MPI specifies; a malformed list is refused."""
    info = MPI.Info.Create()
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip() or " " in key.strip():
            info.Free()
            raise MpinnError(f"{HINTS_VARIABLE}: '{item}' is not KEY=VALUE; give hints as "
                             "key=value,key=value (for example cb_nodes=2,striping_factor=8)")
        info.Set(key.strip(), value.strip())
    return info


def open_file(path: str, mode: str, comm: MPI.Comm) -> h5py.File:
    """Open ``path`` on every rank of ``comm`` (collective), with a clear error if it fails.

    Without MPI-IO each rank opens it on its own: use it so only for reading, or inside
    ``comm.collectives.take_turn`` for writing.
    """
    warn_without_mpi_io(comm)
    if os.path.isdir(path):  # before MPI-IO, which would print pages of driver errors first
        raise MpinnError(f"{path} is a directory, not a model or data file")
    if mode in ("r", "r+") and not os.path.exists(path):
        raise MpinnError(f"{path}: no such file")
    if mode in ("r", "r+"):
        settle(path)
    try:
        if MPI_IO:
            return h5py.File(path, mode, driver="mpio", comm=comm, info=mpiio_hints())
        return _retry_stale(lambda: h5py.File(path, mode))
    except OSError as exc:
        if is_stale(exc):
            raise MpinnError(stale_message(path, exc)) from None
        if mode in ("r", "r+") and not h5py.is_hdf5(path):
            raise MpinnError(f"{path}: not an HDF5 file") from None
        if "truncated" in str(exc) or "eof" in str(exc).lower():
            raise MpinnError(f"{path}: the file is truncated or damaged ({exc}); restore it "
                             f"from a copy or a checkpoint in {path}.checkpoints/") from None
        if mode != "r" and os.path.exists(path) and not os.access(path, os.W_OK):
            mode_bits = os.stat(path).st_mode & 0o7777
            raise MpinnError(f"{path}: cannot open it for writing: permission denied (mode "
                             f"{mode_bits:04o})") from None
        hint = ("; another process has it open, or the filesystem has no file locks: then "
                "set HDF5_USE_FILE_LOCKING=FALSE") if "lock" in str(exc) else ""
        raise MpinnError(f"{path}: cannot open ({exc}{hint})") from None


# a file replaced on another node can give ESTALE here for a moment (NFS, Gluster): the
# open is tried again this many times, waiting 0.1, 0.2, 0.4, ... s, before it is an error
STALE_TRIES = 6


def is_stale(exc: OSError) -> bool:
    """Whether ``exc`` is a stale file handle (ESTALE), also as HDF5 words it."""
    text = str(exc)
    return (exc.errno == errno.ESTALE or f"errno = {errno.ESTALE}," in text
            or os.strerror(errno.ESTALE) in text)


def stale_message(path: str, exc: OSError) -> str:
    return (f"{path}: stale file handle (ESTALE), also when tried again: the file was "
            "replaced on another node and this node's filesystem client still holds the old "
            f"one ({exc}); this is the filesystem's caching, not a lock held by another job "
            "(see docs/filesystems.md)")


def _retry_stale(action: Callable[[], T]) -> T:
    for attempt in range(STALE_TRIES - 1):
        try:
            return action()
        except OSError as exc:
            if not is_stale(exc):
                raise
            time.sleep(0.1 * 2**attempt)
    return action()  # the last try: its ESTALE goes to the caller


def settle(path: str) -> None:
    """Open ``path`` and read its first bytes on this rank alone, trying again on ESTALE:
    a fresh lookup replaces a stale handle before the (collective) HDF5 open."""
    def touch() -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.read(fd, 8)
        finally:
            os.close(fd)
    try:
        _retry_stale(touch)
    except OSError as exc:
        if is_stale(exc):
            raise MpinnError(stale_message(path, exc)) from None
        # anything else (no permission, gone): the HDF5 open below says it in its words


def file_identity(path: str) -> tuple[int, ...] | None:
    """What changes whenever a model is committed (a new file renamed over it): device,
    inode, size and modification time; None if there is no such file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def safe_to_close(exc: BaseException | None) -> bool:
    """Whether a file may be closed while ``exc`` propagates.

    Closing an ``mpio`` file is collective. During an error that only this rank may have
    hit, the others can be inside another collective, and a close would hang the job; the
    file is then left to the process exit (the CLI ends such a job without collectives).
    """
    return exc is None or not MPI_IO or (isinstance(exc, MpinnError) and exc.agreed)


@contextmanager
def opened(path: str, mode: str, comm: MPI.Comm) -> Iterator[h5py.File]:
    """``open_file`` as a context that closes the file unless that could hang (see above)."""
    f = open_file(path, mode, comm)
    try:
        yield f
    except BaseException as exc:
        if safe_to_close(exc):
            f.close()
        raise
    f.close()


def _collective() -> h5py.h5p.PropDXID | None:
    if not MPI_IO:
        return None
    dxpl = h5py.h5p.create(h5py.h5p.DATASET_XFER)
    dxpl.set_dxpl_mpio(h5py.h5fd.MPIO_COLLECTIVE)
    return dxpl


def available_memory() -> int:
    """Bytes this process may still allocate: MemAvailable, else physical memory."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# ---------------------------------------------------------------- rank slices


def runs(indices: np.ndarray) -> np.ndarray:
    """Contiguous runs of sorted distinct ``indices`` as an (n_runs, 2) array of [start, stop)."""
    indices = np.asarray(indices, dtype=np.int64)
    if indices.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    starts = indices[np.concatenate([[0], breaks])]
    stops = indices[np.concatenate([breaks - 1, [indices.size - 1]])] + 1
    return np.stack([starts, stops], axis=1)


def _selection(shape: tuple[int, ...], axis: int, index: np.ndarray | None,
               ranges: np.ndarray | None = None) -> h5py.h5s.SpaceID:
    """File dataspace selecting ``index`` (sorted), or the [start, stop) ``ranges``, along
    ``axis`` and everything along the rest."""
    space = h5py.h5s.create_simple(shape)
    space.select_none()
    op = h5py.h5s.SELECT_SET
    for start, stop in (runs(index) if ranges is None else ranges):
        if stop <= start:
            continue
        offset = [0] * len(shape)
        count = list(shape)
        offset[axis], count[axis] = int(start), int(stop - start)
        space.select_hyperslab(tuple(offset), tuple(count), op=op)
        op = h5py.h5s.SELECT_OR
    return space


def _memory_space(shape: tuple[int, ...]) -> h5py.h5s.SpaceID:
    space = h5py.h5s.create_simple(tuple(max(n, 1) for n in shape))
    if 0 in shape:
        space.select_none()
    return space


def read_slice(dset: h5py.Dataset, index: np.ndarray, axis: int = 0) -> np.ndarray:
    """Collectively read the entries ``index`` (sorted) of ``dset`` along ``axis``."""
    index = np.asarray(index, dtype=np.int64)
    shape = list(dset.shape)
    shape[axis] = index.size
    out = np.empty(shape, dtype=dset.dtype)
    buf = out if out.size else np.empty([max(n, 1) for n in shape], dtype=dset.dtype)
    dset.id.read(_memory_space(tuple(shape)), _selection(dset.shape, axis, index), buf,
                 dxpl=_collective())
    READ_STATS[dset.name] += out.size
    return out


def read_whole(dset: h5py.Dataset) -> np.ndarray:
    """A small dataset every rank needs whole (labels), read independently by each rank:
    the ranks' selections would all overlap, and overlapping selections in one collective
    read are what OpenMPI 4.1's OMPIO has returned wrong values for (see ``read_csr_rows``)."""
    out = dset[...]
    READ_STATS[dset.name] += out.size
    return out


def read_ranges(dset: h5py.Dataset, ranges: np.ndarray) -> np.ndarray:
    """Collectively read the [start, stop) ``ranges`` (ascending, disjoint) of a 1-D dataset,
    concatenated: a CSR layer's entries of a rank's rows."""
    size = int(sum(int(b - a) for a, b in ranges))
    out = np.empty(size, dtype=dset.dtype)
    buf = out if size else np.empty(1, dtype=dset.dtype)
    dset.id.read(_memory_space((size,)), _selection(dset.shape, 0, None, ranges), buf,
                 dxpl=_collective())
    READ_STATS[dset.name] += size
    return out


def write_ranges(dset: h5py.Dataset, ranges: np.ndarray, values: np.ndarray) -> None:
    """Collectively write ``values`` to the [start, stop) ``ranges`` of a 1-D dataset."""
    values = np.ascontiguousarray(values, dtype=dset.dtype)
    mspace = _memory_space(values.shape)
    if values.size == 0:
        values = np.empty(1, dtype=dset.dtype)
    dset.id.write(mspace, _selection(dset.shape, 0, None, ranges), values, dxpl=_collective())


def write_slice(dset: h5py.Dataset, index: np.ndarray, values: np.ndarray, axis: int = 0) -> None:
    """Collectively write ``values`` to the entries ``index`` (sorted) of ``dset`` along ``axis``."""
    index = np.asarray(index, dtype=np.int64)
    values = np.ascontiguousarray(values, dtype=dset.dtype)
    if values.size == 0:
        values = np.empty([max(n, 1) for n in values.shape], dtype=dset.dtype)
        shape = list(dset.shape)
        shape[axis] = 0
        mspace = _memory_space(tuple(shape))
    else:
        mspace = _memory_space(values.shape)
    dset.id.write(mspace, _selection(dset.shape, axis, index), values, dxpl=_collective())
