# Two commands do everything on a fresh machine: `make serve` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8000

.PHONY: install install-dev system-deps serve test lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned to the CPU wheel in the local cache; torchvision is never installed.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# redis-server (queue tests), prometheus/promtool (monitoring tests), nginx (gateway config check), chromium and
# chromium-driver (console tests in a real browser), mosquitto and its clients (MQTT tests), postgresql (initdb and
# pg_ctl: record store tests; Debian keeps them in /usr/lib/postgresql/<version>/bin), when missing.
system-deps:
	@if ! command -v redis-server >/dev/null || ! command -v promtool >/dev/null || ! command -v nginx >/dev/null \
	    || ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null \
	    || ! command -v mosquitto_sub >/dev/null || ! [ -x /usr/sbin/mosquitto ] \
	    || ! { command -v pg_ctl >/dev/null || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; }; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq redis-server prometheus \
	    nginx-light chromium chromium-driver mosquitto mosquitto-clients postgresql >/dev/null; \
	fi

serve: install
	$(BIN)/s2amnet serve --port $(PORT)

test: install-dev system-deps
	$(BIN)/python -m pytest

lint: install-dev
	$(BIN)/ruff check app model tests

# Times the shipped models and the service (ratios in one run); writes BENCHMARKS.md and its plot.
# The peers (plain FastAPI, LitServe: the bench extra) get the magnetic-tile JPEGs when the data is there.
# The data folder: S2AMNET_DATA_DIR, else shared/data beside the project folder (as the dataset readers).
DATA_DIR ?= $(or $(S2AMNET_DATA_DIR),$(dir $(CURDIR))shared/data)
PEER_IMAGES ?= $(wildcard $(DATA_DIR)/magnetic-tile)
# The service part sends one NEU-DET part when the data is there (else a random PNG).
HTTP_IMAGE ?= $(firstword $(sort $(wildcard $(DATA_DIR)/neu-det/IMAGES/*.jpg)))

$(VENV)/.installed-bench: $(VENV)/.installed-dev
	$(BIN)/pip install -q -e '.[dev,bench]'
	touch $@

bench: $(VENV)/.installed-bench
	$(BIN)/s2amnet bench --http-model weights/neu-det-detect $(if $(HTTP_IMAGE),--http-image $(HTTP_IMAGE)) \
	  --backends --line --out BENCHMARKS.md --plot docs/bench.png \
	  --peers $(if $(PEER_IMAGES),--images $(PEER_IMAGES)) --peers-plot docs/bench-peers.png

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
