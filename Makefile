# ecomrec: every set-up step lives here, so a fresh machine needs only `make demo` / `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
# Data directory: $ECOMREC_DATA_DIR if set, else ../shared/data.
export ECOMREC_DATA_DIR ?= $(abspath ../shared/data)
export OPENBLAS_NUM_THREADS := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install protos demo test test-fast lint format bench-quality clean nats-server chromium

# The venv is created when missing; torch is pinned to the CPU wheel (an unpinned torch pulls
# a multi-GB CUDA build), then the project with its dev extras.
$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed

# gRPC stubs from protos/ with the pinned grpcio-tools (generated code is git-ignored).
protos: install
	$(BIN)/python -m serving.gen_protos

# The main job, end to end on the embedded default.
demo: protos
	$(BIN)/python -m ecomrec demo

lint: install protos
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Debian's nats-server for the distributed event log's tests (a 3-node JetStream cluster they
# start themselves; nothing runs it as a service). Needs root, as in CI; skipped if installed.
nats-server:
	command -v nats-server >/dev/null || test -x /usr/sbin/nats-server \
	  || (apt-get update && apt-get install -y nats-server)

# Debian's Chromium + chromedriver for the dashboard's browser test (tests/serving/
# test_dashboard_browser.py drives them through Selenium; no browser download). Needs root,
# as in CI; skipped if installed.
chromium:
	test -x /usr/bin/chromium && test -x /usr/bin/chromedriver \
	  || (apt-get update && apt-get install -y chromium chromium-driver)

# All tests (CI runs exactly this). Triton tests need the separate venv (numpy<2).
test: lint nats-server chromium
	bash serving/triton_venv.sh
	$(BIN)/python -m pytest -q

# The edit-test loop: ruff + every test not marked `slow` (each under ~2 s; no mypy, no
# Triton venv, no real-data or multi-process runs). `make test` still runs everything.
test-fast: install protos
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -m "not slow"

bench-quality: install
	$(BIN)/python benchmarks/quality.py --dataset beauty --models popularity,als,bpr,itemknn --ties file --out results/quality_beauty_file.json
	$(BIN)/python benchmarks/quality.py --dataset beauty --models popularity,als,bpr,itemknn --ties shuffle --out results/quality_beauty_shuffle.json
	$(BIN)/python benchmarks/quality.py --dataset online-retail --models popularity,als,bpr,itemknn --out results/quality_online_retail.json

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
