# Everything runs from a local virtual environment (.venv), made on first use.
# torch==2.13.0 is pinned because it is the CPU build on this machine's local wheel store:
# an unpinned `torch` would download a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0

FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo test bench clean fashion-mnist

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check $(TORCH) -e '.[test]'
	touch $@

# The main job on built-in defaults: shard -> train -> evaluate (docs/demo.md). Without the
# Fashion-MNIST files, mlc demo says how to get them and uses procedural shapes instead.
demo: $(VENV)/.installed fashion-mnist
	$(BIN)/mlc demo

# The built-in dataset's source images (Debian package); tests that need them skip without.
fashion-mnist:
	@if [ ! -d $(FASHION_MNIST) ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
	      || echo "note: could not install dataset-fashion-mnist"; \
	  else echo "note: Fashion-MNIST missing: sudo apt-get install dataset-fashion-mnist"; fi; \
	fi

test: $(VENV)/.installed fashion-mnist
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q

bench: $(VENV)/.installed fashion-mnist
	$(BIN)/python benchmarks/bench_map.py
	$(BIN)/python benchmarks/bench_shard.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .hypothesis
