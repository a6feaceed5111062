#!/usr/bin/env bash
# The figures a 2-core workstation cannot give (issue #4), in one run on a many-core box:
#   1. the micro-batch pipeline against the unpipelined `layers` schedule at P = 2 and 4,
#   2. Sparse DNN strong scaling at P = 1..16 next to the single-process scipy loop,
#   3. the dense training benchmark at P = 4 and 16 next to PyTorch and the GEMM peak,
#   4. Sparse DNN strong scaling of a 4x wider network (N = 4096),
#   5. issue 14: P = 16, 784-4096x3-10, batch 256 at R x Q in {1x16, 2x8, 4x4, 16x1}
#      (--replicas), next to PyTorch with 16 threads, and the cost model's plan of the same.
# Most important first: each part's output is written to OUT_DIR as it runs, so a run cut
# short still leaves the parts it finished.
#   bash benchmarks/many_cores.sh [OUT_DIR]            (default ./many-cores-out)
#   QUICK=1 bash benchmarks/many_cores.sh /tmp/check   (tiny sizes: checks the script)
# Uses $PYTHON (default python3), which needs numpy, scipy, h5py (serial is fine: mpinn
# then reads independently), tqdm and, for the peer, torch. Where the box has no network,
# make .whl/ here first (bash scripts/offline-wheels.sh 3.12) and carry the checkout:
# Open MPI, mpi4py and pymetis are then installed from it into /tmp/mpinn-mpi.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "${1:-many-cores-out}" && cd "${1:-many-cores-out}" && pwd)
PYTHON=${PYTHON:-python3}
if [ -d "$root/.whl" ]; then
    prefix=/tmp/mpinn-mpi
    "$PYTHON" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
        --prefix "$prefix" "$root"/.whl/*.whl || exit 1
    site=$("$PYTHON" -c 'import sys; print("lib/python%d.%d/site-packages" % sys.version_info[:2])')
    export PATH="$prefix/bin:$PATH" PYTHONPATH="$prefix/$site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$root:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
if [ "$(id -u)" -eq 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
cd "$root"

{
    date; nproc; grep -m1 "model name" /proc/cpuinfo; free -g | head -2
    lscpu 2>/dev/null | grep -E "^(Thread|Core|Socket|NUMA node\(s\)|L3)"
    "$PYTHON" -c 'import sys, numpy, scipy, h5py, mpi4py; print(sys.version.split()[0], "numpy",
numpy.__version__, "scipy", scipy.__version__, "h5py", h5py.__version__, "mpi:",
h5py.get_config().mpi, "mpi4py", mpi4py.__version__)'
    mpirun --version | head -1
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

part() {  # part NAME COMMAND...: run one benchmark, its output to the terminal and OUT_DIR
    local name=$1; shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$out/$name.txt"
}

replicas_table() {  # replicas_table P SIZES BATCH STEPS PAIRS RxQ,...: a train_mlp run per layout
    local p=$1 sizes=$2 batch=$3 steps=$4 pairs=$5 layouts=$6 rq r peer=torch
    if ! "$PYTHON" benchmarks/train_mlp.py --help | grep -q -- "--replicas"; then
        echo "(train_mlp.py has no --replicas yet: R x Q table skipped)" | tee "$out/replicas-p$p.txt"
        return 0
    fi
    for rq in ${layouts//,/ }; do
        r=${rq%x*}
        part "replicas-p$p-$rq" "$PYTHON" benchmarks/train_mlp.py --ranks "$p" --replicas "$r" \
            --sizes "$sizes" --batch "$batch" --steps "$steps" --pairs "$pairs" --peer "$peer"
        peer=none  # PyTorch with P threads once, beside the first layout
    done
    "$PYTHON" -m mpinn init "$out/plan-model.h5" --sizes "$sizes" --force --quiet
    part "plan-p$p" mpirun --oversubscribe -n "$p" "$PYTHON" -m mpinn partition \
        "$out/plan-model.h5" --ranks "$p" --plan --batch-size "$batch"
    rm -f "$out/plan-model.h5"
}

if [ -n "${QUICK:-}" ]; then
    part pipeline "$PYTHON" benchmarks/pipeline.py --ranks 2,4 --sizes 256,256,256,256,256 --repeat 1 \
        --batch 64 --steps 2 --micro-batches 1,4
    part sparse-scaling "$PYTHON" benchmarks/sparse_dnn.py --neurons 1024 --layers 8 \
        --samples 100 --ranks 1,2 --repeat 1
    part train-p4 "$PYTHON" benchmarks/train_mlp.py --ranks 4 --sizes 64,128,10 --batch 32 --steps 2 \
        --pairs 1
    replicas_table 4 64,128,128,10 32 2 1 1x4,2x2,4x1
    exit 0
fi
replicas_table 16 784,4096,4096,4096,10 256 8 3 1x16,2x8,4x4,16x1
part pipeline "$PYTHON" benchmarks/pipeline.py --ranks 2,4
part sparse-scaling "$PYTHON" benchmarks/sparse_dnn.py --neurons 1024 --layers 120 \
    --samples 2000 --ranks 1,2,4,8,16 --repeat 2
part train-p4 "$PYTHON" benchmarks/train_mlp.py --ranks 4
part train-p16 "$PYTHON" benchmarks/train_mlp.py --ranks 16
part sparse-scaling-4096 "$PYTHON" benchmarks/sparse_dnn.py --neurons 4096 --layers 120 \
    --samples 2000 --ranks 1,4,16 --repeat 1
