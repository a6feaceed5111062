# Sourced by the benchmark scripts for lent boxes (root and PYTHON set): where the checkout
# carries .whl/ (bash scripts/offline-wheels.sh VERSION), install Open MPI, mpi4py and
# pymetis from it into /tmp/mpinn-mpi and put them first on PATH and PYTHONPATH. Wheels made
# for another Python are reported and skipped: the box's own MPI is used then.
if [ -d "$root/.whl" ]; then
    if "$PYTHON" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
        --prefix /tmp/mpinn-mpi "$root"/.whl/*.whl; then
        site=$("$PYTHON" -c 'import sys; print("lib/python%d.%d/site-packages" % sys.version_info[:2])')
        export PATH="/tmp/mpinn-mpi/bin:$PATH" PYTHONPATH="/tmp/mpinn-mpi/$site:${PYTHONPATH:-}"
    else
        echo "the wheels in .whl/ do not install on $("$PYTHON" -V): using this box's MPI" >&2
    fi
fi
