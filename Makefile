# Two commands (README Quickstart): `make book` and `make test`. Each creates .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: book site test test-unit test-book clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "Python 3.10+ is needed"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[book,dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

# The main job: execute every chapter (in a copy under _build/src), then build the site from it.
book: $(STAMP)
	$(BIN)/python -m fec_core.bookbuild build --execute

# Build the site from the notebooks' stored outputs only (fast).
site: $(STAMP)
	$(BIN)/python -m fec_core.bookbuild build

# Every test: unit tests, then every notebook re-run and compared with its stored outputs (nbval).
test: $(STAMP)
	$(BIN)/python -m pytest -q tests book --nbval -p no:cacheprovider

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q tests

test-book: $(STAMP)
	$(BIN)/python -m pytest -q --nbval book

clean:
	rm -rf _build .pytest_cache
