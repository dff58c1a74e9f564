# Quickstart: `make demo` (install + run the whole lifecycle on a generated cohort)
#             `make test` (install + run the test suite)
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_DIR ?= work/demo

export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[cpu,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/medflow demo --workdir $(DEMO_DIR)

test: $(STAMP)
	$(BIN)/python -m pytest -m "not gpu" --timeout=900

clean:
	rm -rf $(VENV) work .pytest_cache
