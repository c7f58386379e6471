# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv on first use. PyTorch is installed first, pinned to the local CPU build;
# override with e.g. `make test TORCH_SPEC="torch==2.14.1"` for another build.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
# MNIST: ../shared/data/mnist beside the checkout when present, else ./data (see data/README.md).
ICSTOOLS_DATA ?= $(if $(wildcard ../shared/data/mnist/*.gz),$(abspath ../shared/data),$(abspath data))
export ICSTOOLS_DATA

.PHONY: demo test test-all lint bench bench-cockpit clean browser docs

$(BIN)/.icstools-installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: $(BIN)/.icstools-installed
	$(BIN)/icstools demo

lint: $(BIN)/.icstools-installed
	$(BIN)/ruff check icstools tests $(wildcard bench)

# The report's test opens the HTML in Debian's headless Chromium: install it where we can
# (root with apt-get, as in CI); elsewhere that one test is skipped and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium for the report test (apt-get)"; \
	    apt-get install -y -qq chromium >/dev/null 2>&1 || \
	      { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1; } || \
	      echo "note: could not install chromium; the report's browser test will be skipped"; \
	  else echo "note: chromium not found; the report's browser test will be skipped"; fi; }

test: lint browser
	$(BIN)/python -m pytest -m "not slow"

test-all: lint browser
	$(BIN)/python -m pytest

# The documentation site, offline, into build/site: the notebooks are executed first at the
# test suite's reduced scale (docs/execute_notebooks.py; a copy newer than its notebook and the
# package is reused), then mkdocs builds in strict mode (any warning fails).
$(BIN)/.icstools-docs-installed: $(BIN)/.icstools-installed pyproject.toml
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" -e ".[dev,docs]"
	touch $@

docs: $(BIN)/.icstools-docs-installed
	$(BIN)/python docs/execute_notebooks.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict
	@echo "site: build/site/index.html"

bench: $(BIN)/.icstools-installed
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/memory.py

# Cockpit beside the venv, not in it: its pkg_resources needs setuptools<70, and BackPACK lists
# torchvision (whose wheel breaks this torch); neither is installed into .venv
bench/.cockpit/cockpit/__init__.py:
	$(BIN)/python -m pip install --quiet --no-deps --target bench/.cockpit \
		cockpit-for-pytorch==1.0.2 backpack-for-pytorch==1.7.1 einops unfoldNd json-tricks \
		"setuptools<70"

bench-cockpit: $(BIN)/.icstools-installed bench/.cockpit/cockpit/__init__.py
	$(BIN)/python bench/vs_cockpit.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis build/site build/docs
