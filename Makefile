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

.PHONY: install demo test bench clean browser

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[cpu,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/medflow demo --workdir $(DEMO_DIR)

test: $(STAMP) browser
	$(BIN)/python -m pytest -m "not gpu" --timeout=900

# Browser tests drive Debian's chromium with Playwright (never a downloaded browser).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the browser tests"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "could not install chromium: the browser test will fail; install it with apt-get install chromium"; }

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[cpu,dev,bench]"
	$(BIN)/python bench/ingest_bench.py

clean:
	rm -rf $(VENV) work .pytest_cache
