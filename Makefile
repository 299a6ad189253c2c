# pyro-mcp: every target is a thin call into the project's own tools.
# Quick start: `make run` (set up everything, run a command in a real microVM), `make test`.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PYRO := $(VENV)/bin/pyro
PYTEST := $(VENV)/bin/pytest

.PHONY: help venv host-packages npm-packages web-assets run test test-fast lint typecheck stubs bench cli-index \
	runtime-fetch-binaries runtime-build-kernel-real runtime-build-rootfs-real \
	runtime-bundle runtime-materialize runtime-publish-official-environments-oci doctor clean

help:
	@echo "make run        set up everything and run a command in a real microVM"
	@echo "make test       lint, type-check and the whole test suite (builds what it needs)"
	@echo "make test-fast  unit tests only (no VM, no builds)"
	@echo "make bench      benchmark table"
	@echo "make stubs      regenerate the SDK's type stub (src/pyro_mcp/_sdk_methods.pyi)"
	@echo "make cli-index  regenerate src/pyro_mcp/cli/index.py after a command is added or renamed"
	@echo "make runtime-materialize  fetch binaries, build kernel and all environments, write the lock"
	@echo "make runtime-publish-official-environments-oci  publish them to \$$PYRO_REGISTRY"

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,ray]'
	touch $@

# Debian packages (QEMU, debootstrap, e2fsprogs, kernel build tools) via apt-get.
host-packages: venv
	$(PYRO) runtime install-host-packages

# npm packages the tests drive (MCP clients, MCP hosts): each tests/npm/<name>/ pins its
# own in package.json + package-lock.json; `npm ci` installs exactly the locked versions.
NPM_DIRS := $(patsubst %/package-lock.json,%,$(wildcard tests/npm/*/package-lock.json))

npm-packages: host-packages $(addsuffix /node_modules/.package-lock.json,$(NPM_DIRS)) web-assets

# What the dashboard loads from npm (xterm.js), pinned by web/package-lock.json and copied
# into the package (the wheel's build does the same through setup.py).
web-assets: src/pyro_mcp/serve/static/vendor/xterm.js

src/pyro_mcp/serve/static/vendor/xterm.js: web/package-lock.json web/vendor.py | host-packages
	$(PY) web/vendor.py

tests/npm/%/node_modules/.package-lock.json: tests/npm/%/package-lock.json
	npm ci --prefix tests/npm/$* --no-audit --no-fund --loglevel=error

runtime-fetch-binaries: venv
	$(PYRO) runtime fetch

runtime-build-kernel-real: host-packages
	$(PYRO) runtime build-kernel

runtime-build-rootfs-real: host-packages
	$(PYRO) runtime build-rootfs

runtime-bundle: venv
	$(PYRO) runtime bundle

runtime-materialize: host-packages
	$(PYRO) runtime materialize

# Publish the catalog to $PYRO_REGISTRY (HOST[:PORT]/PREFIX) with PYRO_REGISTRY_USERNAME and
# PYRO_REGISTRY_TOKEN; each must be materialized (built and proven) here first.
OFFICIAL_ENVIRONMENTS := debian:12-base debian:12 debian:12-build
runtime-publish-official-environments-oci: venv
	@test -n "$(PYRO_REGISTRY)" || { echo "set PYRO_REGISTRY=HOST[:PORT]/PREFIX" >&2; exit 2; }
	for env in $(OFFICIAL_ENVIRONMENTS); do $(PYRO) env publish $$env || exit 1; done

doctor: venv
	$(PYRO) doctor

run: host-packages runtime-fetch-binaries runtime-build-kernel-real
	$(PYRO) env pull debian:12
	$(PYRO) runtime bundle
	$(PYRO) run debian:12 -- uname -a

lint: venv
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

# The SDK's methods as type checkers see them, from the operation registry (tests fail
# when the committed stub is stale).
stubs: venv
	$(PY) -m pyro_mcp.api.stubs

typecheck: venv
	$(VENV)/bin/mypy

test-fast: venv
	$(PYTEST) -q tests/unit

test: host-packages npm-packages lint typecheck
	$(PYTEST) -q tests

bench: venv
	$(PY) -m bench.run $(BENCH_ARGS)

# Which module declares each CLI command (so a command imports only its own module); a unit
# test fails when it no longer matches the registry.
cli-index: venv
	$(PY) -m pyro_mcp.cli.make_index

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
