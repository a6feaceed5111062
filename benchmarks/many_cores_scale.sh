#!/usr/bin/env bash
# Wide and deep on a many-core box (issue #16), in one run of under 8 minutes on 16 cores:
#   1. the Sparse DNN Challenge's N = 16,384 network, 120 layers, at 16 ranks,
#   2. its N = 65,536 network, 120 layers, at 16 ranks,
#      each generated in parallel (ranks write disjoint layers, the scipy truth is split
#      over the ranks by samples), then inferred: edges/s, load time, per-rank memory,
#   3. benchmarks/scale.py at 16 ranks: every stage's time and memory against connections.
# Each part's output is written to OUT_DIR as it runs, so a run cut short still leaves the
# parts it finished. The networks go to $TMPDIR (about 2.5 GB) and are removed at the end.
#   bash benchmarks/many_cores_scale.sh [OUT_DIR]            (default ./many-cores-scale-out)
#   QUICK=1 bash benchmarks/many_cores_scale.sh /tmp/check   (tiny sizes: checks the script)
# Uses $PYTHON (default python3), which needs numpy, scipy, h5py (serial is fine: mpinn
# then reads independently). Where the box has no network, make .whl/ here first
# (bash scripts/offline-wheels.sh 3.12) and carry the checkout: Open MPI, mpi4py and
# pymetis are then installed from it into /tmp/mpinn-mpi.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "${1:-many-cores-scale-out}" && cd "${1:-many-cores-scale-out}" && pwd)
PYTHON=${PYTHON:-python3}
source "$root/scripts/offline-mpi.sh"  # .whl/ where the box has no network
export PYTHONPATH="$root:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
# one BLAS thread per rank: the ranks are the parallelism
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
if [ "$(id -u)" -eq 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
nets=$(mktemp -d "${TMPDIR:-/tmp}/mpinn-scale-nets.XXXXXX")
trap 'rm -rf "$nets"' EXIT
cd "$root"

{
    date; nproc; grep -m1 "model name" /proc/cpuinfo; free -g | head -2
    lscpu 2>/dev/null | grep -E "^(Thread|Core|Socket|NUMA node\(s\)|L3)"
    "$PYTHON" -c 'import sys, numpy, scipy, h5py, mpi4py; print(sys.version.split()[0], "numpy",
numpy.__version__, "scipy", scipy.__version__, "h5py", h5py.__version__, "mpi:",
h5py.get_config().mpi, "mpi4py", mpi4py.__version__)'
    mpirun --version | head -1
    df -h "$nets" | tail -1
} 2>&1 | tee "$out/machine.txt"

# Open MPI's shared-memory transport copies large messages with cross-memory attach, which
# containers may forbid: check with a 2-rank Alltoallv of 16 MB, else copy through the buffer.
probe() {
    timeout 60 mpirun --oversubscribe -n 2 "$PYTHON" -c 'from mpi4py import MPI; import numpy as np
a = np.ones(1 << 22, "f4"); b = np.empty_like(a); MPI.COMM_WORLD.Alltoallv(a, b)
print("alltoallv ok" if b.all() else "alltoallv WRONG")' >> "$out/machine.txt" 2>&1
}
if ! probe; then
    export OMPI_MCA_btl_sm_single_copy_mechanism=none
    echo "retrying with OMPI_MCA_btl_sm_single_copy_mechanism=none" >> "$out/machine.txt"
    probe || { echo "mpirun does not work here: see $out/machine.txt"; cat "$out/machine.txt"; exit 1; }
fi
tail -2 "$out/machine.txt"

part() {  # part NAME COMMAND...: run one benchmark, its output and wall time to the terminal and OUT_DIR
    local name=$1 started=$SECONDS; shift
    echo "== $name: $*"
    { "$@"; echo "exit $?, wall $((SECONDS - started)) s"; } 2>&1 | tee "$out/$name.txt"
}

challenge() {  # challenge RANKS N LAYERS SAMPLES: generate (timed in the wall figure), then infer
    local status
    mpirun --oversubscribe -n "$1" "$PYTHON" -m mpinn bench sparse-dnn --neurons "$2" \
        --layers "$3" --samples "$4" --dir "$nets" --strategy balanced
    status=$?
    rm -f "$nets"/radixnet-n"$2"-*  # the next part needs the disk
    return $status
}

if [ -n "${QUICK:-}" ]; then
    part sparse-16384 challenge 2 1024 8 100
    part sparse-65536 challenge 2 2048 8 60
    part scale "$PYTHON" benchmarks/scale.py --ranks 2 --grid 1024x2,4096x2,1024x8 --fan-in 4
    exit 0
fi
part sparse-16384 challenge 16 16384 120 2000
part sparse-65536 challenge 16 65536 120 1000
part scale "$PYTHON" benchmarks/scale.py --ranks 16 \
    --grid 16384x4,65536x4,262144x4,1048576x4,16384x32,16384x128,65536x32 --json "$out/scale.jsonl"
