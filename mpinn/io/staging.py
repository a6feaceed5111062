"""The files a command writes: checked against what it reads before any work, written under a
temporary name beside their final one and renamed into place only when complete.

Rules (docs/reliability.md, "Outputs"): no command writes over a file it reads, whatever
``--force`` says; no command writes over an existing file unless given ``--force``; a
refused, failed or interrupted command leaves its outputs as they were, and at most a
``NAME.partial`` beside them, never a half-written NAME.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from typing import Any

from mpinn.errors import MpinnError

PARTIAL = ".partial"  # suffix of a file being written; renamed to its final name when complete


def partial_name(path: str) -> str:
    """Where ``path`` is written before it is complete."""
    return f"{path}{PARTIAL}"


def _identity(path: str) -> tuple[int, int] | str:
    """What makes two paths the same file: (device, inode) if it exists, else its real path."""
    try:
        st = os.stat(path)
    except OSError:
        return os.path.realpath(path)
    return (st.st_dev, st.st_ino)


def check(outputs: Mapping[str, str], inputs: Mapping[str, str | Sequence[str]],
          force: bool) -> None:
    """Refuse outputs that coincide with an input or with each other, exist without ``force``,
    are directories, or sit in a directory that does not exist or cannot be written.

    ``outputs`` and ``inputs`` map a flag (``--out``, ``MODEL``) to its path(s), so the
    message can name both sides.
    """
    read: list[tuple[str, str]] = []
    for flag, paths in inputs.items():
        for path in [paths] if isinstance(paths, str) else paths:
            read.append((flag, path))
    seen: dict[tuple[int, int] | str, str] = {}
    for flag, path in read:
        seen.setdefault(_identity(path), flag)
    written: dict[tuple[int, int] | str, str] = {}
    for flag, path in outputs.items():
        ident = _identity(path)
        if ident in seen:
            raise MpinnError(f"{flag} {path} is the file given as {seen[ident]}: mpinn never writes "
                             "over a file it reads; choose another output path")
        if ident in written:
            raise MpinnError(f"{flag} {path} is also given as {written[ident]}: each output needs "
                             "its own path")
        written[ident] = flag
        if os.path.isdir(path):
            raise MpinnError(f"{flag} {path} is a directory; give a file path")
        if os.path.lexists(path) and not force:
            raise MpinnError(f"{flag} {path} exists; pass --force to overwrite it")
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise MpinnError(f"{flag} {path}: directory {directory} does not exist")
        if not os.access(directory, os.W_OK | os.X_OK):
            raise MpinnError(f"{flag} {path}: directory {directory} is not writable")


def check_writable(flag: str, path: str, doing: str) -> None:
    """Refuse to rewrite ``path`` in place or by rename when it is read-only: its mode has no
    owner write bit (``chmod 444``: root could write it, but its owner said not to), or this
    process may not write it. ``doing``: what would write it ("train would replace it")."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return  # missing: the input checks name it
    if not mode & stat.S_IWUSR or not os.access(path, os.W_OK):
        raise MpinnError(f"{flag} {path} is read-only (mode {mode:04o}) and {doing}; make it "
                         f"writable first (chmod u+w {path})")


def keep_mode(old: str, new: str) -> None:
    """Give ``new`` the permission bits of ``old`` (when it exists), before ``new`` replaces
    it by a rename: a file the user made private (0600) stays so."""
    try:
        mode = stat.S_IMODE(os.stat(old).st_mode)
    except FileNotFoundError:
        return
    os.chmod(new, mode)


def commit(partial: str, path: str) -> None:
    """Make the complete file ``partial`` appear as ``path`` atomically, durably: its bytes are
    on storage before the rename, and the rename is on storage before this returns."""
    fd = os.open(partial, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(partial, path)
    directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def discard(partial: str) -> None:
    """Remove an unfinished file, if it is there."""
    with suppress(OSError):
        os.remove(partial)


@contextmanager
def staged(path: str) -> Iterator[str]:
    """Write ``path`` from one process: yields the temporary path to write; on success it is
    committed as ``path``, on any error (Ctrl-C included) removed, and ``path`` untouched."""
    partial = partial_name(path)
    discard(partial)  # a leftover of a killed run is never part of this one
    try:
        yield partial
    except BaseException:
        discard(partial)
        raise
    commit(partial, path)


@contextmanager
def staged_collective(path: str, comm: Any) -> Iterator[str]:
    """``staged`` for a file that every rank of ``comm`` writes: yields the temporary path on
    every rank; once all ranks are done, rank 0 commits it and every rank learns the outcome."""
    partial = partial_name(path)
    if comm.rank == 0:
        discard(partial)
    comm.Barrier()
    try:
        yield partial
    except BaseException:
        discard(partial)  # on any failing rank: rank 0 may be held in a collective
        raise
    comm.Barrier()
    error = None
    if comm.rank == 0:
        try:
            commit(partial, path)
        except OSError as exc:
            discard(partial)
            error = f"{path}: cannot move the finished file into place ({exc.strerror})"
    error = comm.bcast(error, root=0)
    if error is not None:
        raise MpinnError(error, agreed=True)
