# `make demo` and `make test` each set up what they need on a fresh Debian machine, then run.
VENV    ?= .venv
PYTHON  ?= python3
BIN     := $(VENV)/bin
NODEDIR := tests/timescaledb

.PHONY: demo test check soak fuzz sbom setup system venv node bench clean

demo: setup
	$(BIN)/python scripts/demo.py

test: setup check
	$(BIN)/pytest -q

check: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

# The chaos soak, full profile: SOAK_MINUTES of load (default 10) under seeded random faults.
SOAK_MINUTES ?= 10
soak: setup
	$(BIN)/pumpfleet soak --minutes $(SOAK_MINUTES) $(if $(SEED),--seed $(SEED))

# The decoder's fuzz and schema-agreement properties, long: FUZZ_EXAMPLES each (default 2000, about 10 min).
FUZZ_EXAMPLES ?= 2000
fuzz: venv
	PUMPFLEET_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/pytest -q -p no:cacheprovider \
		tests/test_decoder_fuzz.py tests/test_contract_agreement.py

# A CycloneDX SBOM of the shipped environment (runtime dependencies only): dist/pumpfleet.cdx.json
sbom: venv
	scripts/sbom $(if $(OUT),$(OUT))

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

# Every benchmark, BENCH_REPEATS runs each (default 3): docs/benchmarks.md and README.md's figures.
# BENCH_ONLY=ingest,cost runs some suites and keeps the others' figures; BENCH_QUICK=1 smaller runs.
BENCH_REPEATS ?= 3
bench: setup
	$(BIN)/python benchmarks/report.py --repeats $(BENCH_REPEATS) $(if $(BENCH_ONLY),--only $(BENCH_ONLY)) $(if $(BENCH_QUICK),--quick)

clean:
	-$(BIN)/pumpfleet stack down 2>/dev/null
	rm -rf $(VENV) .pumpfleet $(NODEDIR)/node_modules
