# make demo / make test work on a fresh machine with only Python 3.11 and make:
# each creates .venv if missing and installs the project with its test extras.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test mutants bench bench-micro lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/multifd demo

test: $(STAMP)
	$(BIN)/python -m pytest

# Each listed bug, applied to a copy of HEAD, must fail the default suite (docs/mutants.md).
mutants: $(STAMP)
	$(BIN)/python tools/mutants.py

bench: $(STAMP)
	$(BIN)/python bench/throughput.py

# The hot paths per MiB / per packet (pytest-benchmark): a regression shows as a number.
bench-micro: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/python -m pytest bench/test_micro.py --benchmark-only --benchmark-columns=min,median,ops -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,dev]'
	$(BIN)/python -m ruff check engine clients transports tests bench
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit/test_layers.py

clean:
	rm -rf $(VENV) build *.egg-info
