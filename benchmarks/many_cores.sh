#!/usr/bin/env bash
# The figures a 2-core workstation cannot give, in one run on a many-core box, most
# important first (the part names PARTS takes in brackets):
#   1. issue 14: P = 16, 784-4096x3-10, batch 256 at R x Q in {1x16, 2x8, 4x4, 16x1}
#      (--replicas), beside PyTorch with 16 threads and its tensor parallelism over 16
#      processes, each layout's cost-model prediction, and `partition --plan` (replicas);
#      the digits model 64-256-256-10, batch 64, at 16x1, 4x4 and 1x16 beside DDP (digits),
#   2. each rank's plain GEMM rate with all 16 at once, to tell slow cores from slow code (spread),
#   3. the micro-batch pipeline against the unpipelined `layers` schedule at P = 2, 4 (pipeline),
#   4. Sparse DNN strong scaling at P = 1..16 next to the single-process scipy loop (sparse),
#   5. the dense training benchmark at P = 4 and 16 next to PyTorch and the GEMM peak (train),
#   6. Sparse DNN strong scaling of a 4x wider network, N = 4096 (sparse4096),
#   7. what binding and libnbc's algorithm do: 1x16 unbound (unbound), 2x8 with libnbc's
#      ring and Rabenseifner Iallreduce (iallreduce).
# Most important first: each part's output is written to OUT_DIR as it runs, so a run cut
# short still leaves the parts it finished.
#   bash benchmarks/many_cores.sh [OUT_DIR]            (default ./many-cores-out)
#   QUICK=1 bash benchmarks/many_cores.sh /tmp/check   (tiny sizes: checks the script)
#   PARTS=replicas,digits bash benchmarks/many_cores.sh OUT_DIR   (only those parts)
# Uses $PYTHON (default python3), which needs numpy, scipy, h5py (serial is fine: mpinn
# then reads independently), tqdm and, for the peer, torch. Where the box has no network,
# make .whl/ here first (bash scripts/offline-wheels.sh 3.12) and carry the checkout:
# Open MPI, mpi4py and pymetis are then installed from it into /tmp/mpinn-mpi.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "${1:-many-cores-out}" && cd "${1:-many-cores-out}" && pwd)
PYTHON=${PYTHON:-python3}
source "$root/scripts/offline-mpi.sh"  # .whl/ where the box has no network
export PYTHONPATH="$root:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
if [ "$(id -u)" -eq 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
# Open MPI binds more than 2 ranks only to a socket, so two ranks may share a core while
# another idles: the 1x16 run of 2026-11-27 waited on one slow rank per exchange, a
# different one each run. One rank per core where the box has the cores (BIND=none: off).
if [ "$(nproc --all)" -ge 16 ] && [ "${BIND:-core}" != none ]; then
    export OMPI_MCA_hwloc_base_binding_policy=${BIND:-core}
fi
cd "$root"

{
    date; nproc; grep -m1 "model name" /proc/cpuinfo; free -g | head -2
    lscpu 2>/dev/null | grep -E "^(Thread|Core|Socket|NUMA node\(s\)|L3)"
    "$PYTHON" -c 'import sys, numpy, scipy, h5py, mpi4py; print(sys.version.split()[0], "numpy",
numpy.__version__, "scipy", scipy.__version__, "h5py", h5py.__version__, "mpi:",
h5py.get_config().mpi, "mpi4py", mpi4py.__version__)'
    mpirun --version | head -1
    echo "binding: ${OMPI_MCA_hwloc_base_binding_policy:-the Open MPI default}"
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

failed=0  # parts that exited non-zero: the script's exit status says how many
part() {  # part NAME COMMAND...: run one benchmark, its output to the terminal and OUT_DIR
    local name=$1 status started=$SECONDS; shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$out/$name.txt"
    status=${PIPESTATUS[0]}
    echo "== $name: $((SECONDS - started)) s"
    if [ "$status" -ne 0 ]; then
        echo "== $name FAILED (exit $status)" | tee -a "$out/failed.txt"
        failed=$((failed + 1))
    fi
}

replicas_table() {  # replicas_table NAME P SIZES BATCH STEPS PAIRS R,... PEERS: one train_mlp run
    # taking every R (P/R ranks per copy) in turns each round, beside the peers, with the
    # cost model's prediction per R; then `partition --plan`'s table of every candidate
    local name=$1 p=$2 sizes=$3 batch=$4 steps=$5 pairs=$6 rs=$7 peers=$8
    part "$name" "$PYTHON" benchmarks/train_mlp.py --ranks "$p" --replicas "$rs" \
        --gemm-seconds "${GEMM_SECONDS:-4}" \
        --sizes "$sizes" --batch "$batch" --steps "$steps" --pairs "$pairs" --peer "$peers"
    "$PYTHON" -m mpinn init "$out/plan-model.h5" --sizes "$sizes" --force --quiet || failed=$((failed + 1))
    part "$name-plan" mpirun --oversubscribe -n "$p" "$PYTHON" -m mpinn partition \
        "$out/plan-model.h5" --ranks "$p" --plan --batch-size "$batch"
    rm -f "$out/plan-model.h5"
}

# PARTS picks parts by name (comma list; default all): replicas, digits, spread, pipeline,
# sparse, train, sparse4096, unbound, iallreduce. Each part's output lands in OUT_DIR as it
# finishes.
PARTS=${PARTS:-replicas,digits,spread,pipeline,sparse,train,sparse4096,unbound,iallreduce}
want() { [[ ",$PARTS," == *",$1,"* ]]; }

if [ -n "${QUICK:-}" ]; then
    # each GEMM peak and the cost model's probe of the ranks (partition --plan's too): a glance
    GEMM_SECONDS=0.05
    export MPINN_PROBE_SECONDS=0.1
    # every R of 4 ranks here; the parts with a torchrun peer at 2 ranks (each worker imports
    # torch: 1.5 s of CPU), whose layouts of 4 ranks the replicas and iallreduce parts cover
    want replicas && replicas_table replicas-p4 4 64,128,128,10 32 2 1 1,2,4 torch
    want digits && replicas_table digits-p2 2 64,256,256,10 64 4 1 2,1 ddp
    want pipeline && part pipeline "$PYTHON" benchmarks/pipeline.py --ranks 2,4 \
        --sizes 256,256,256,256,256 --repeat 1 --batch 64 --steps 2 --micro-batches 1,4
    want sparse && part sparse-scaling "$PYTHON" benchmarks/sparse_dnn.py --neurons 1024 \
        --layers 8 --samples 100 --ranks 1,2 --repeat 1
    # (its PyTorch peer and DDP run in the replicas and digits parts: here the TP one)
    want train && part train-p2 "$PYTHON" benchmarks/train_mlp.py --ranks 2 \
        --gemm-seconds "$GEMM_SECONDS" --peer tp --sizes 64,128,10 --batch 32 --steps 2 --pairs 1
    # (unbound is train's run under another binding: nothing more to check at tiny sizes)
    want iallreduce && part iallreduce-ring-p4 env OMPI_MCA_coll_libnbc_iallreduce_algorithm=1 \
        "$PYTHON" benchmarks/train_mlp.py --ranks 4 --replicas 2 --gemm-seconds "$GEMM_SECONDS" \
        --sizes 64,128,10 --batch 32 --steps 2 --pairs 1 --peer none
    want spread && part spread-p2 mpirun --oversubscribe -n 2 "$PYTHON" benchmarks/rank_gemm.py \
        --width 512 --batch 32 --rounds 1 --seconds 0.2
    exit "$failed"
fi
# issue 14: every R x Q of 16 ranks on the large model, beside PyTorch (16 threads, and
# tensor parallel over 16 processes); the digits model, where data parallelism should win
want replicas && replicas_table replicas-p16 16 784,4096,4096,4096,10 256 8 3 1,2,4,16 torch,tp
want digits && replicas_table digits-p16 16 64,256,256,10 64 200 3 16,4,1 ddp
# each rank's plain GEMM rate, all 16 at once: which of the waits above are slow cores
want spread && part spread-p16 mpirun -n 16 "$PYTHON" benchmarks/rank_gemm.py --rounds 3
want pipeline && part pipeline "$PYTHON" benchmarks/pipeline.py --ranks 2,4
want sparse && part sparse-scaling "$PYTHON" benchmarks/sparse_dnn.py --neurons 1024 --layers 120 \
    --samples 2000 --ranks 1,2,4,8,16 --repeat 2
want train && part train-p4 "$PYTHON" benchmarks/train_mlp.py --ranks 4
want train && part train-p16 "$PYTHON" benchmarks/train_mlp.py --ranks 16
want sparse4096 && part sparse-scaling-4096 "$PYTHON" benchmarks/sparse_dnn.py --neurons 4096 \
    --layers 120 --samples 2000 --ranks 1,4,16 --repeat 1
# the same 1x16 run without binding, to tell what binding did; 2x8 with libnbc's ring (1) and
# Rabenseifner (3) Iallreduce against its default in the replicas part
want unbound && part unbound-p16 env OMPI_MCA_hwloc_base_binding_policy=none \
    "$PYTHON" benchmarks/train_mlp.py --ranks 16 --pairs 2 --peer torch
for alg in 1 3; do
    want iallreduce && part "iallreduce-$alg-p16" env OMPI_MCA_coll_libnbc_iallreduce_algorithm=$alg \
        "$PYTHON" benchmarks/train_mlp.py --ranks 16 --replicas 2 --pairs 1 --peer none
done
exit "$failed"
