# evalsvc: `make run` starts the service, `make test` runs every test. Both set themselves up.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BUF := node_modules/.bin/buf

.PHONY: run test test-postgres generate check-generated lint typecheck fmt bench bench-quick breaking release-contract generate-clients check-clients

$(VENV)/.installed: pyproject.toml clients/python/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]' -e clients/python
	touch $@

node_modules/.installed: package.json package-lock.json
	# npm install (not ci): the registry here lacks some platforms' optional buf binaries, which ci rejects.
	# --no-save: install from the committed lock without rewriting it (make test leaves the worktree clean).
	npm install --no-save --no-audit --no-fund --loglevel=error
	touch $@

# make run GRPC_ADDR=HOST:PORT HTTP_ADDR=HOST:PORT; without them EVALSVC_GRPC_ADDR / EVALSVC_HTTP_ADDR, then the defaults.
GRPC_ADDR ?= $(or $(EVALSVC_GRPC_ADDR),127.0.0.1:50051)
HTTP_ADDR ?= $(or $(EVALSVC_HTTP_ADDR),127.0.0.1:8080)
run: $(VENV)/.installed
	$(VENV)/bin/evalsvc serve --grpc-addr $(GRPC_ADDR) --http-addr $(HTTP_ADDR)

# Two pytest-xdist workers keep the suite under 10 minutes on 2 cores; TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: $(VENV)/.installed node_modules/.installed clients/typescript/node_modules/.installed
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The suite again on PostgreSQL: a scratch database per test on EVALSVC_TEST_PG_URL (default
# postgresql://postgres@127.0.0.1:5432/test; each worker's names carry its pid, tests/dbs.py). Every test is
# skipped, saying why, when it is unreachable.
# PG_TESTS narrows it (CI runs the database-heavy modules only; see .ci/run).
PG_TESTS ?=
test-postgres: $(VENV)/.installed node_modules/.installed clients/typescript/node_modules/.installed
	EVALSVC_TEST_DB=postgres $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PG_TESTS)

generate: $(VENV)/.installed
	$(PY) scripts/gen_protos.py

check-generated: $(VENV)/.installed
	$(PY) -m pytest -q tests/test_contract.py

lint: $(VENV)/.installed node_modules/.installed
	$(BUF) lint
	$(VENV)/bin/ruff check evalsvc tests scripts examples
	$(VENV)/bin/ruff format --check evalsvc tests scripts examples
	$(VENV)/bin/lint-imports

# mypy --strict on evalsvc and the Python client, generated stubs excluded (pyproject.toml [tool.mypy]).
typecheck: $(VENV)/.installed
	$(VENV)/bin/mypy

fmt: $(VENV)/.installed
	$(VENV)/bin/ruff format evalsvc tests scripts examples
	$(VENV)/bin/ruff check --fix evalsvc tests scripts examples

$(VENV)/.bench-installed: $(VENV)/.installed bench/requirements.txt
	$(PY) -m pip install -q -r bench/requirements.txt
	# wrk drives the gateway scenario (a Python HTTP client would be its bottleneck); Debian's package.
	command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get install -y -qq wrk >/dev/null; } || true
	touch $@

# Benchmarks against same-run baselines; results in bench/results/latest.md (see bench/README.md).
bench: $(VENV)/.installed $(VENV)/.bench-installed
	$(PY) -m bench.run

bench-quick: $(VENV)/.installed $(VENV)/.bench-installed
	$(PY) -m bench.run --quick

# Clients (clients/README.md): buf.gen.yaml generates Python (clients/python/evalsvc_client/_gen), TypeScript
# (clients/typescript/src/gen) and Go (clients/go/gen; needs Debian's protoc-gen-go and protoc-gen-go-grpc).
clients/typescript/node_modules/.installed: clients/typescript/package.json clients/typescript/package-lock.json
	cd clients/typescript && npm install --no-save --no-audit --no-fund --loglevel=error
	touch $@

generate-clients: $(VENV)/.installed node_modules/.installed clients/typescript/node_modules/.installed
	rm -rf clients/python/evalsvc_client/_gen clients/typescript/src/gen clients/go/gen
	$(BUF) generate 2>/dev/null

check-clients: $(VENV)/.installed node_modules/.installed clients/typescript/node_modules/.installed
	tmp=$$(mktemp -d) && $(BUF) generate -o $$tmp 2>/dev/null && \
	diff -r -x __pycache__ $$tmp/clients/python/evalsvc_client/_gen clients/python/evalsvc_client/_gen && \
	diff -r $$tmp/clients/typescript/src/gen clients/typescript/src/gen && \
	diff -r $$tmp/clients/go/gen clients/go/gen; status=$$?; rm -rf $$tmp; \
	if [ $$status -ne 0 ]; then echo "clients are stale: run make generate-clients"; fi; exit $$status

# The contract as last released (contract/evalsvc.v1.binpb): `make breaking` fails on any change that
# would break clients built from it; `make release-contract` records the current contract as released.
breaking: node_modules/.installed
	tmp=$$(mktemp --suffix=.binpb) && $(BUF) build -o $$tmp && $(BUF) breaking $$tmp --against contract/evalsvc.v1.binpb --config buf.yaml; \
	status=$$?; rm -f $$tmp; exit $$status

release-contract: node_modules/.installed
	$(BUF) build --exclude-source-info -o contract/evalsvc.v1.binpb
