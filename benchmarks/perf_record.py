"""The ``--json PATH`` of the benchmarks: each run appended to a file of dated runs.

The performance pages of the documentation site (docs/perf/) draw their plots from such
files, kept in the repository: a run adds its figures, newest first, with its date, the
machine and the command that made them. One file holds one benchmark::

    {"benchmark": "train_mlp", "runs": [{"date": ..., "machine": ..., "command": ...,
                                         "unit": "samples/s", "results": [...], ...}, ...]}

``results`` entries have a ``name``, a ``value`` in ``unit`` and a ``role``: ``mpinn``,
``peer`` (PyTorch, scipy) or ``ceiling``; benchmarks add their own keys (ranks, link).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any


def machine() -> str:
    """The CPU model, its cores, and the versions that move the figures."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import numpy
    return (f"{model}, {os.cpu_count()} cores; Python {platform.python_version()}, "
            f"numpy {numpy.__version__}")


def append_run(path: str, benchmark: str, run: dict[str, Any]) -> None:
    """Put ``run`` first in the file's runs, with today's date, the machine and the command."""
    target = Path(path)
    record = {"benchmark": benchmark, "runs": []}
    if target.exists():
        record = json.loads(target.read_text())
        if record.get("benchmark") != benchmark:
            raise SystemExit(f"--json {path}: holds benchmark {record.get('benchmark')!r}, "
                             f"not {benchmark!r}")
    entry = {"date": datetime.datetime.now(datetime.UTC).date().isoformat(),
             "machine": machine(),
             "command": "python " + shlex.join(["benchmarks/" + Path(sys.argv[0]).name,
                                                 *sys.argv[1:]]),
             **run}
    record["runs"].insert(0, entry)
    partial = target.with_name(target.name + ".partial")
    partial.write_text(json.dumps(record, indent=1) + "\n")
    partial.replace(target)
    print(f"figures appended to {path}")
