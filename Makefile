# Two commands on a fresh machine: `make run` and `make test`. Everything else is set up on demand.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# Debian packages the test suite drives for real, as program:package (the audit rotation test runs
# logrotate, README recipes run jq, the backend tests start private PostgreSQL and Redis servers,
# the console's tests drive Chromium through Playwright: never a browser Playwright downloads).
# Debian keeps PostgreSQL's programs off PATH, in /usr/lib/postgresql/<version>/bin. Chromium's
# screenshots need no font package of their own: it recommends fonts-liberation, which apt installs.
SYSTEM_PACKAGES := logrotate:logrotate jq:jq redis-server:redis-server initdb:postgresql chromium:chromium

.PHONY: install run test lint bench soak system-deps clean

$(STAMP): setup.cfg pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,dev,fast,postgres,redis]'
	@touch $(STAMP)

install: $(STAMP)

.env: | $(STAMP)
	$(BIN)/llm-proxy init

run: $(STAMP) .env
	$(BIN)/llm-proxy serve

system-deps:
	@missing=""; for entry in $(SYSTEM_PACKAGES); do program=$${entry%%:*}; \
		command -v $$program >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/$$program >/dev/null 2>&1 \
			|| missing="$$missing $${entry#*:}"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

test: $(STAMP) system-deps
	$(BIN)/python -m pytest

# ruff; mypy --strict (setup.cfg); import-linter: the layers and no cycles (.importlinter).
lint: $(STAMP)
	$(BIN)/ruff check llm_proxy tests
	$(BIN)/mypy llm_proxy
	$(BIN)/lint-imports --no-cache .importlinter

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info

# The benchmark drives nginx (the upstream that is never the bottleneck) and wrk (the load), both
# from Debian, PostgreSQL and Redis (system-deps) for its several-processes rows, and py-spy (into
# .venv) for its profile. `make bench BENCH_ARGS=--smoke` is the quick check.
BENCH_ARGS ?= --profile

bench: $(STAMP) system-deps
	@missing=""; command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx || missing="$$missing nginx"; \
	command -v wrk >/dev/null 2>&1 || missing="$$missing wrk"; \
	if [ -n "$$missing" ]; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq; \
		if apt-cache policy nginx-light | grep -q 'Candidate: [0-9]'; then nginx=nginx-light; else nginx=nginx; fi; \
		packages=$$(echo "$$missing" | sed "s/ nginx\b/ $$nginx/"); \
		echo "installing Debian packages:$$packages"; \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$packages >/dev/null; \
	fi
	@test -x $(BIN)/py-spy || $(BIN)/python -m pip install --quiet --disable-pip-version-check py-spy \
		|| echo "py-spy could not be installed: the profile will be missing"
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# A bounded soak (not in CI): mixed traffic against a real `llm-proxy serve`, RSS and descriptors sampled.
SOAK_MINUTES ?= 2

soak: $(STAMP)
	$(BIN)/python bench/soak.py --minutes $(SOAK_MINUTES)
