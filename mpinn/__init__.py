"""mpinn: neural networks partitioned across MPI ranks at neuron granularity.

The public surface: ``mpinn.Network`` and ``mpinn.History`` (the Python API, see
docs/api.md), ``mpinn.MpinnError``, the optimizers ``mpinn.SGD``, ``mpinn.Adam``, ``mpinn.AdamW`` and
the learning-rate ``mpinn.Schedule``.
``import mpinn`` starts no MPI and imports no numpy: the names are loaded at first use,
so a script can configure mpi4py (``mpi4py.rc``) and the BLAS threads beforehand.
"""

import os as _os
from collections.abc import Mapping


def _default_blas_threads() -> None:
    """One BLAS thread per core share: ranks on a node must not fight over the same cores.

    Runs before numpy is imported; an explicit OMP_NUM_THREADS, OPENBLAS_NUM_THREADS or
    MKL_NUM_THREADS (or ``--threads``, which sets them) always wins.
    """
    names = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    # values set by an mpinn parent process (a test, a launcher) are ours to recompute
    inherited = _os.environ.get("MPINN_AUTO_THREADS")
    if any(name in _os.environ and _os.environ[name] != inherited for name in names):
        return
    ranks = _ranks_on_this_node(_os.environ)
    cores = len(_os.sched_getaffinity(0)) if hasattr(_os, "sched_getaffinity") else _os.cpu_count()
    threads = max(1, (cores or 1) // ranks)
    for name in names:
        _os.environ[name] = str(threads)
    _os.environ["MPINN_AUTO_THREADS"] = str(threads)


def _ranks_on_this_node(env: Mapping[str, str]) -> int:
    """How many ranks of the job share this node, from what the launcher tells each rank.

    mpirun gives each rank its node's count; srun gives the step's counts of every node
    (``SLURM_STEP_TASKS_PER_NODE``, e.g. ``2(x3),1``) and this node's index in them, which
    differ from node to node when the tasks do not divide evenly.
    """
    local = env.get("OMPI_COMM_WORLD_LOCAL_SIZE") or env.get("MPI_LOCALNRANKS")
    try:
        if not local and env.get("SLURM_STEP_TASKS_PER_NODE") and env.get("SLURM_NODEID"):
            local = _slurm_tasks_on_node(env["SLURM_STEP_TASKS_PER_NODE"], env["SLURM_NODEID"])
        return max(1, int((local or env.get("SLURM_NTASKS_PER_NODE") or "1").split("(")[0]))
    except ValueError:  # a launcher's value we cannot read: no worse than one rank per node
        return 1


def _slurm_tasks_on_node(counts: str, node: str) -> str:
    """Node ``node``'s entry of SLURM's compressed per-node list: ``2(x3),1`` is 2, 2, 2, 1."""
    expanded = []
    for item in counts.split(","):
        count, _, repeat = item.partition("(x")
        expanded += [count] * (int(repeat.rstrip(")")) if repeat else 1)
    index = int(node)
    return expanded[index] if 0 <= index < len(expanded) else ""


_default_blas_threads()
__version__ = "0.1.0"

from mpinn.errors import MpinnError  # noqa: E402 - after the thread defaults; imports nothing heavy

# public name -> the module that defines it, imported on first access (PEP 562)
_LAZY = {"Network": "mpinn.api", "History": "mpinn.api", "SGD": "mpinn.optim",
         "Adam": "mpinn.optim", "AdamW": "mpinn.optim", "Schedule": "mpinn.optim",
         "OPTIMIZERS": "mpinn.optim", "SCHEDULES": "mpinn.optim"}

__all__ = ["MpinnError", *_LAZY, "__version__"]


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mpinn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
