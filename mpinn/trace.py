"""The timeline: every rank's spans of a training run, gathered into one Chrome trace.

``train --trace FILE`` (``fit(trace=FILE)``) records, per rank, a span for each step and,
inside it, for each layer's pack, compute and wait, the loss, the optimizer and the
checkpoints; on a second track, each exchange from its post to its completion. At the end
rank 0 gathers them, with every rank's clock aligned to its own (a ping-pong per rank, the
offset of the round trip that took least), and writes one JSON file in the Trace Event
Format that chrome://tracing and https://ui.perfetto.dev open: a process per rank, named
``rank R (HOST)``. Horovod's timeline and ``torch.profiler``'s Chrome trace are the anchors.

Recording costs two ``perf_counter`` calls and one tuple per span; without ``--trace`` the
engine holds ``NULL``, whose spans do nothing.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

from mpi4py import MPI

WORK, EXCHANGE = 0, 1  # the two tracks of a rank: its own work, the exchanges in flight
MAX_EVENTS = 500_000  # per rank; a longer run keeps its first ones and says so
PING_ROUNDS = 8


class _Span:
    __slots__ = ("tracer", "name", "cat", "args", "start")

    def __init__(self, tracer: Tracer, name: str, cat: str, args: dict[str, Any] | None) -> None:
        self.tracer, self.name, self.cat, self.args = tracer, name, cat, args

    def __enter__(self) -> _Span:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.tracer.add(self.name, self.cat, self.start, time.perf_counter(), WORK, self.args)


class _NoSpan:
    __slots__ = ()

    def __enter__(self) -> _NoSpan:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


_NO_SPAN = _NoSpan()


class NullTracer:
    """What the engine holds when nothing is traced: every call is a no-op."""

    enabled = False

    def span(self, name: str, cat: str, args: dict[str, Any] | None = None) -> _NoSpan:
        return _NO_SPAN

    def add(self, name: str, cat: str, start: float, end: float, track: int = WORK,
            args: dict[str, Any] | None = None) -> None:
        pass


NULL = NullTracer()


class Tracer(NullTracer):
    """Spans of one rank, and (collectively) the trace file of all ranks."""

    enabled = True

    def __init__(self, comm: MPI.Comm) -> None:
        """Collective: aligns this rank's clock to rank 0's."""
        self.comm = comm
        self.events: list[tuple[str, str, float, float, int, dict[str, Any] | None]] = []
        self.dropped = 0
        self.offset = clock_offset(comm)  # my clock minus rank 0's
        self.origin = comm.bcast(time.perf_counter() if comm.rank == 0 else None, root=0)

    def span(self, name: str, cat: str, args: dict[str, Any] | None = None) -> _Span:  # type: ignore[override]
        return _Span(self, name, cat, args)

    def add(self, name: str, cat: str, start: float, end: float, track: int = WORK,
            args: dict[str, Any] | None = None) -> None:
        if len(self.events) < MAX_EVENTS:
            self.events.append((name, cat, start, end, track, args))
        else:
            self.dropped += 1

    def chrome_events(self) -> list[dict[str, Any]]:
        """My spans in the Trace Event Format, in microseconds of rank 0's clock since the
        trace began."""
        rank, shift = self.comm.rank, self.offset + self.origin
        host = socket.gethostname()
        out: list[dict[str, Any]] = [
            {"ph": "M", "name": "process_name", "pid": rank, "args": {"name": f"rank {rank} ({host})"}},
            {"ph": "M", "name": "process_sort_index", "pid": rank, "args": {"sort_index": rank}},
            {"ph": "M", "name": "thread_name", "pid": rank, "tid": WORK, "args": {"name": "work"}},
            {"ph": "M", "name": "thread_name", "pid": rank, "tid": EXCHANGE,
             "args": {"name": "exchange in flight"}}]
        # parts of one exchange fly side by side: each on a track of its own
        for track in sorted({e[4] for e in self.events if e[4] > EXCHANGE}):
            out.append({"ph": "M", "name": "thread_name", "pid": rank, "tid": track,
                        "args": {"name": f"exchange part {track - EXCHANGE}"}})
        for name, cat, start, end, track, args in self.events:
            event = {"ph": "X", "name": name, "cat": cat, "pid": rank, "tid": track,
                     "ts": round((start - shift) * 1e6, 3), "dur": round((end - start) * 1e6, 3)}
            if args:
                event["args"] = args
            out.append(event)
        return out

    def write(self, path: str) -> None:
        """Gather every rank's spans to rank 0, which writes ``path`` complete (collective)."""
        from mpinn.io import staging

        gathered = self.comm.gather((self.chrome_events(), self.dropped), root=0)
        if self.comm.rank != 0:
            return
        events = [event for rank_events, _ in gathered for event in rank_events]
        dropped = sum(d for _, d in gathered)
        meta = {"ranks": self.comm.size, "clock": "perf_counter, aligned to rank 0",
                "dropped_spans": dropped}
        with staging.staged(path) as partial, open(partial, "w") as fh:
            json.dump({"traceEvents": events, "displayTimeUnit": "ms", "otherData": meta}, fh)


def clock_offset(comm: MPI.Comm) -> float:
    """This rank's ``perf_counter`` minus rank 0's, from ping-pongs with rank 0 (NTP's rule:
    of the rounds, the one with the shortest round trip, halved); 0 on rank 0."""
    tag = 81
    offset = 0.0
    for peer in range(1, comm.size):
        if comm.rank == 0:
            best = None
            for _ in range(PING_ROUNDS):
                sent = time.perf_counter()
                comm.send(sent, dest=peer, tag=tag)
                theirs = comm.recv(source=peer, tag=tag)
                back = time.perf_counter()
                if best is None or back - sent < best[0]:
                    best = (back - sent, theirs - (sent + back) / 2)
            comm.send(best[1], dest=peer, tag=tag)
        elif comm.rank == peer:
            for _ in range(PING_ROUNDS):
                comm.recv(source=0, tag=tag)
                comm.send(time.perf_counter(), dest=0, tag=tag)
            offset = comm.recv(source=0, tag=tag)
    return offset
