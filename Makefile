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

.PHONY: install demo demo-segmentation demo-detection demo-detection2d demo-xray demo-ecg test bench clean system-deps

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[cpu,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/medflow demo --workdir $(DEMO_DIR)

demo-segmentation: $(STAMP)
	$(BIN)/medflow demo --task segmentation --workdir work/demo-segmentation

demo-detection: $(STAMP)
	$(BIN)/medflow demo --task detection --workdir work/demo-detection

demo-detection2d: $(STAMP)
	$(BIN)/medflow demo --task detection2d --workdir work/demo-detection2d

demo-xray: $(STAMP)
	$(BIN)/medflow demo --task xray --workdir work/demo-xray

demo-ecg: $(STAMP)
	$(BIN)/medflow demo --task ecg --workdir work/demo-ecg

test: $(STAMP) system-deps
	$(BIN)/python -m pytest -m "not gpu" --timeout=900

# Tests drive real programs from Debian's packages, never downloaded builds: chromium (the
# Prefect UI in a browser) and Orthanc with its DICOMweb plugin (a PACS on loopback).
system-deps:
	@missing=""; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v Orthanc >/dev/null 2>&1 || missing="$$missing orthanc"; \
	test -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so || missing="$$missing orthanc-dicomweb"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages for the tests:$$missing"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null) \
	  || echo "could not install$$missing: the tests that need them will fail; install them with apt-get"; \
	fi

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[cpu,dev,bench]"
	$(BIN)/python bench/ingest_bench.py
	$(BIN)/python bench/preprocess_bench.py
	$(BIN)/python bench/train_bench.py

clean:
	rm -rf $(VENV) work .pytest_cache
