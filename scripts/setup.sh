#!/usr/bin/env bash
# Install everything mpinn needs, idempotently: system MPI + parallel HDF5,
# a virtual environment at .venv, and h5py built against parallel HDF5.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

need_pkgs=()
command -v mpicc >/dev/null 2>&1 || need_pkgs+=(openmpi-bin libopenmpi-dev)
command -v pkg-config >/dev/null 2>&1 || need_pkgs+=(pkg-config)
pkg-config --exists hdf5-openmpi 2>/dev/null || need_pkgs+=(libhdf5-openmpi-dev)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: missing system packages: ${need_pkgs[*]}; install them (root needed)" >&2
        exit 1
    fi
    echo "setup: installing ${need_pkgs[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip -q --disable-pip-version-check "$@"; }
# PyTorch for tests/system/test_torch_io.py (import/export, the optimizers against torch.optim) and
# the bench peer: pinned to the CPU build of 2.13.0, a 190 MB wheel that pip finds in the
# machine's wheel folder (880 MB installed with sympy, networkx, jinja2, fsspec, filelock).
# An unpinned `pip install torch` would take a CUDA build of several GB. Unpacking and
# compiling it takes one core about 27 s: it goes in beside the other packages, with the
# dependencies no other package shares (two installers must not write the same package),
# and the last pip call adds what else torch needs: 34 s for both instead of 60.
torch_pid=
if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
    # pip itself, not the function's subshell, in the background: $! is then its pid
    "$VENV/bin/python" -m pip -q --disable-pip-version-check install --no-warn-conflicts \
        --no-deps torch==2.13.0 sympy mpmath networkx fsspec filelock &
    torch_pid=$!
    trap '[ -z "$torch_pid" ] || kill "$torch_pid" 2>/dev/null' EXIT  # the other pip failed
fi
pip install --no-warn-conflicts "setuptools>=77" wheel cython pkgconfig numpy scipy mpi4py threadpoolctl matplotlib pymetis pytest pytest-mpi pytest-timeout pytest-xdist hypothesis ruff sphinx furo myst-parser
if [ -n "$torch_pid" ]; then
    wait "$torch_pid"
    torch_pid=
    pip install torch==2.13.0
fi
pip check >/dev/null || { pip check; exit 1; }  # what the two installers left, consistent

# h5py built against this machine's parallel HDF5 takes minutes: the wheel is built once
# per (h5py, HDF5, Python) and kept in MPINN_WHEELS (default ~/.cache/mpinn-wheels), so a
# fresh clone on the same machine (CI) installs it in seconds. The import check below
# still proves it was built with MPI.
H5PY_VERSION=3.16.0
if ! "$VENV/bin/python" -c 'import h5py, sys; sys.exit(0 if h5py.get_config().mpi else 1)' 2>/dev/null; then
    py_tag=$("$VENV/bin/python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
    wheels="${MPINN_WHEELS:-$HOME/.cache/mpinn-wheels}/h5py-$H5PY_VERSION-hdf5-$(pkg-config --modversion hdf5-openmpi)-$py_tag"
    if ! ls "$wheels"/h5py-*.whl >/dev/null 2>&1; then
        echo "setup: building h5py against parallel HDF5 (a few minutes, once per machine)"
        mkdir -p "$wheels"
        CC=mpicc HDF5_MPI=ON HDF5_PKGCONFIG_NAME=hdf5-openmpi \
            pip wheel --no-binary=h5py --no-build-isolation --no-deps --no-cache-dir \
            -w "$wheels" "h5py==$H5PY_VERSION"
    fi
    pip uninstall -y h5py >/dev/null 2>&1 || true
    pip install --no-index --no-deps "$wheels"/h5py-*.whl
fi
pip install --no-deps --no-build-isolation -e .

"$VENV/bin/python" - <<'PY'
import sys
import h5py
import mpi4py
if not h5py.get_config().mpi:
    sys.exit("setup: FAILED: h5py was built without MPI support (h5py.get_config().mpi is False)")
print(f"setup: ok (h5py {h5py.__version__} with MPI, HDF5 {h5py.version.hdf5_version}, mpi4py {mpi4py.__version__})")
PY
