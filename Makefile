# Two entry points that work on a fresh machine: `make demo` and `make test`.
# Both create (or reuse) .venv and install torch pinned first, then sam4med with its dependencies.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/sam4med: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

.PHONY: install demo test
install: $(BIN)/sam4med

demo: install
	$(BIN)/sam4med demo --out runs/demo

test: install
	$(BIN)/python -m pytest -q
