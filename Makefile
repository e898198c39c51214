# `make demo` and `make test` each set up what they need on a fresh Debian machine, then run.
VENV    ?= .venv
PYTHON  ?= python3
BIN     := $(VENV)/bin
NODEDIR := tests/timescaledb

.PHONY: demo test check soak setup system venv node bench clean

demo: setup
	$(BIN)/python scripts/demo.py

test: setup check
	$(BIN)/pytest -q

check: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The chaos soak, full profile: SOAK_MINUTES of load (default 10) under seeded random faults.
SOAK_MINUTES ?= 10
soak: setup
	$(BIN)/pumpfleet soak --minutes $(SOAK_MINUTES) $(if $(SEED),--seed $(SEED))

setup: system venv node

system:
	@scripts/setup-system

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

node: $(NODEDIR)/node_modules/.package-lock.json

$(NODEDIR)/node_modules/.package-lock.json: $(NODEDIR)/package-lock.json
	cd $(NODEDIR) && npm ci --no-audit --no-fund --loglevel=error

bench: setup
	$(BIN)/python benchmarks/decode_bench.py

clean:
	-$(BIN)/pumpfleet stack down 2>/dev/null
	rm -rf $(VENV) .pumpfleet $(NODEDIR)/node_modules
