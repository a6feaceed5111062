"""mpinn: neural networks partitioned across MPI ranks at neuron granularity.

The public surface: ``mpinn.Network`` and ``mpinn.History`` (the Python API, see
docs/api.md), ``mpinn.MpinnError``, the optimizers ``mpinn.SGD``, ``mpinn.Adam``, ``mpinn.AdamW`` and
the learning-rate ``mpinn.Schedule``.
``import mpinn`` starts no MPI and imports no numpy: the names are loaded at first use,
so a script can configure mpi4py (``mpi4py.rc``) and the BLAS threads beforehand.
"""

import os as _os


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
    local = (_os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE") or _os.environ.get("MPI_LOCALNRANKS")
             or _os.environ.get("SLURM_NTASKS_PER_NODE") or "1")
    try:
        ranks = max(1, int(local.split("(")[0]))
    except ValueError:
        ranks = 1
    cores = len(_os.sched_getaffinity(0)) if hasattr(_os, "sched_getaffinity") else _os.cpu_count()
    threads = max(1, (cores or 1) // ranks)
    for name in names:
        _os.environ[name] = str(threads)
    _os.environ["MPINN_AUTO_THREADS"] = str(threads)


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
