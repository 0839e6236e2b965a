# Everything runs from a local virtual environment (.venv), made on first use.
# torch==2.13.0 is pinned because it is the CPU build on this machine's local wheel store:
# an unpinned `torch` would download a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0

.PHONY: demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check $(TORCH) -e '.[test]'
	touch $@

# The main job on built-in defaults.
demo: $(VENV)/.installed
	$(BIN)/mlc eval --example --output runs/example

test: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/bench_map.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .hypothesis
