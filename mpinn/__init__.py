"""mpinn: neural networks partitioned across MPI ranks at neuron granularity."""

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
