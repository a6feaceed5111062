"""Run a program of ``mpinn.Network`` calls, drawn by tests/system/test_api_property.py, on every rank.

``python -m mpi4py tests/api_driver.py PROGRAM.json WORKSPACE``: each call of the program is
made on every rank; an ``MpinnError`` is noted and the program goes on (as a notebook
would); any other exception is a bug, and its traceback ends the run. Rank 0 checks that a
refused call changed no file of the workspace, and prints one JSON line per call.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from mpi4py import MPI

import mpinn
from mpinn import MpinnError

RNG = np.random.default_rng(0)
VALUES: dict[str, Any] = {
    "X": RNG.random((24, 8), dtype=np.float32),
    "y": np.arange(24) % 3,
    "X3": RNG.random((24, 3), dtype=np.float32),      # the wrong number of features
    "Xnan": np.full((24, 8), np.nan, dtype=np.float32),
    "X1d": np.zeros(8, dtype=np.float32),
    "Xempty": np.zeros((0, 8), dtype=np.float32),
    "yfloat": RNG.random((24, 3)),                     # targets for a softmax output
    "ybig": np.full(24, 7),                            # labels out of range
    "yshort": np.arange(5) % 3,
    "ystr": np.array(["a"] * 24),
}


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.suffix != ".json"}


def value(spec: Any, root: Path) -> Any:
    """A drawn value: {"$": NAME} an array above, {"path": NAME} a path in the workspace,
    {"tuple": [...]} a tuple, anything else itself."""
    if isinstance(spec, dict) and "$" in spec:
        return VALUES[spec["$"]]
    if isinstance(spec, dict) and "path" in spec:
        return str(root / spec["path"])
    if isinstance(spec, dict) and "tuple" in spec:
        return tuple(value(v, root) for v in spec["tuple"])
    if isinstance(spec, list):
        return [value(v, root) for v in spec]
    return spec


def main() -> None:
    program, root = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    comm = MPI.COMM_WORLD
    nets: list[mpinn.Network] = []
    for call in program:
        before = digests(root) if comm.rank == 0 else None
        comm.Barrier()
        method, kwargs = call["call"], {k: value(v, root) for k, v in call["kwargs"].items()}
        args = [value(v, root) for v in call.get("args", [])]
        outcome = "ok"
        try:
            if method in ("create", "open"):
                nets.append(getattr(mpinn.Network, method)(*args, **kwargs))
            elif not nets:
                continue
            else:
                result = getattr(nets[-1], method)(*args, **kwargs)
                if method == "predict":
                    assert np.all(np.isfinite(result)) and result.shape == (24, 3)
        except MpinnError as exc:
            outcome = f"refused: {exc}"
        comm.Barrier()
        if comm.rank == 0:
            changed = sorted(name for name, d in digests(root).items() if before.get(name) != d)
            if outcome != "ok" and changed:
                outcome += f" BUT CHANGED {changed}"
            print(json.dumps({"call": method, "outcome": outcome}), flush=True)


if __name__ == "__main__":
    main()
