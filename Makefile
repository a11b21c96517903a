# `make run` sets up .venv and trains the quickstart; `make test` sets up .venv and runs the tests.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q fbgemm-gpu-cpu==1.8.0
	$(BIN)/pip install -q -e ".[dev]"
	# --no-deps: torchrec's metadata asks for the CUDA fbgemm-gpu (see pyproject.toml). Last, so that
	# no later install's resolver reports that missing fbgemm-gpu as an error.
	$(BIN)/pip install -q --no-deps torchrec==1.8.0
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/recmem quickstart --config jobs/configs/quickstart.yaml

# The tests run as on a new machine: HOME, XDG folders and TMPDIR in a fresh empty folder, and the
# run fails if it leaves a process or a file behind (tests/run_isolated.py).
test: $(STAMP)
	$(BIN)/python tests/run_isolated.py -q -x --durations=15

clean:
	rm -rf $(VENV) runs mlruns mlflow.db data/synthetic
