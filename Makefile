# Everything runs from a local virtual environment that `make` creates and keeps up to date.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test test-ha run-ha chromium rsyslog lint proto proto-check proto-release console bench clean

$(STAMP): pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e clients/python -e '.[dev]'
	touch $@

install: $(STAMP)

## Serve on 127.0.0.1:50051 and the web console on http://127.0.0.1:8080/; embedded
## PostgreSQL in .data/ unless TWOFACTOR_DATABASE_URL is set.
run: install
	$(VENV)/bin/twofactor serve

## The whole suite against a real server and a real PostgreSQL, with the console's browser
## test in headless Chromium (Debian's `chromium`) and the SIEM export's tests against Debian's
## rsyslog (both installed when missing, as `.ci/run` runs it).
test: install chromium rsyslog
	$(PY) -m pytest

## Debian's Chromium for the browser test, installed with apt-get when missing (as root, as CI
## runs); Playwright drives it and never downloads a browser of its own.
chromium:
	@command -v chromium >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

## Debian's rsyslog and its GnuTLS driver, the real receiver of the SIEM export's tests
## (tests/test_siem_export.py starts its own rsyslogd), installed with apt-get when missing
## (as root, as CI runs). The system's own rsyslog service is never used or started.
rsyslog:
	@{ dpkg -s rsyslog rsyslog-gnutls >/dev/null 2>&1; } || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rsyslog rsyslog-gnutls >/dev/null; }

## PostgreSQL failovers under load on a pg_auto_failover cluster (monitor + primary +
## synchronous standby) with two replicas: what survives, and the figures
## (docs/high-availability.md). Two modes, each on a fresh cluster: the primary's node killed
## (SIGKILL), then frozen (SIGSTOP for 25 s); HA_MODE=kill or HA_MODE=freeze runs one.
## As root it installs postgresql-15-auto-failover with apt-get.
## Not part of `make test`; .ci/run runs it after.
test-ha: install
	$(PY) -m ha.failover_test

## The same cluster and two replicas on this machine, to try out; prints the addresses.
run-ha: install
	$(PY) -m ha.run

proto: install
	$(PY) scripts/generate_protos.py

proto-check: install
	$(PY) scripts/generate_protos.py --check

## VerifyCode against a bare gRPC server in the same run (`ratio:`), SignIn, and 2 worker
## processes vs 1, on the embedded PostgreSQL in .data/bench (docs/performance.md).
## Not part of `make test`. Knobs: BENCH_DURATION=20 BENCH_WARMUP=2 BENCH_CONCURRENCY=64
## BENCH_ACCOUNTS=20000 BENCH_WRONG_SHARE=0.05 BENCH_PHASES=... BENCH_SOAK=60 (memory
## flatness) BENCH_PROFILE=1 (py-spy of the server under VerifyCode load).
bench: install
	$(PY) bench/run.py

# buf comes from npm (@bufbuild/buf carries the binary), pinned in tools/package-lock.json.
TOOLS_STAMP := tools/node_modules/.installed-stamp
BUF := tools/node_modules/.bin/buf
RELEASED_CONTRACT := protos/released/twofactor-v1.binpb

$(TOOLS_STAMP): tools/package.json tools/package-lock.json
	cd tools && npm ci --no-audit --no-fund
	touch $@

# The console's browser code: protoc-gen-es, connect-web, esbuild, tsc, pinned in
# console/package-lock.json.
CONSOLE_STAMP := console/node_modules/.installed-stamp

$(CONSOLE_STAMP): console/package.json console/package-lock.json
	cd console && npm ci --no-audit --no-fund
	touch $@

## Regenerate the console's TypeScript from the protos, type-check it, and rebuild the committed
## bundle service/twofactor_service/console/static/console.js (docs/console.md).
console: install $(CONSOLE_STAMP)
	$(PY) scripts/build_console.py

## ruff (lint and format), mypy --strict, stale generated code (Python stubs and the console
## bundle), buf lint and format, and buf breaking against the released contract.
lint: install $(TOOLS_STAMP) $(CONSOLE_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(PY) scripts/generate_protos.py --check
	$(PY) scripts/build_console.py --check
	$(BUF) lint
	$(BUF) format --diff --exit-code
	$(BUF) breaking protos --against $(RELEASED_CONTRACT)

## Record the current contract as released: `make lint` then refuses changes that break it.
proto-release: $(TOOLS_STAMP)
	$(BUF) lint
	$(BUF) build protos --exclude-source-info -o $(RELEASED_CONTRACT)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache tools/node_modules clients/node/node_modules \
		console/node_modules console/src/gen
