# Everything runs from a local virtual environment (.venv), made on first use.
# torch==2.13.0 is pinned because it is the CPU build on this machine's local wheel store:
# an unpinned `torch` would download a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0

FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo test bench bench-docs clean fashion-mnist

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

# Every benchmark (docs/benchmarks.md), each writing benchmarks/results/<name>.json; the rest
# still run when one fails. BENCH_ARGS=--quick checks that they work (minutes, no figures).
# Then `make bench-docs` puts the figures into docs/benchmarks.md.
BENCHMARKS := bench_map bench_shard bench_loader bench_model bench_train bench_eval bench_async bench_scale
BENCH_ARGS ?=

bench: $(VENV)/.installed fashion-mnist
	@failed=""; for b in $(BENCHMARKS); do \
	  echo "== python -m benchmarks.$$b $(BENCH_ARGS)"; \
	  $(BIN)/python -m benchmarks.$$b $(BENCH_ARGS) || failed="$$failed $$b"; \
	done; \
	$(BIN)/python -m benchmarks.report --summary; \
	if [ -n "$$failed" ]; then echo "failed:$$failed"; exit 1; fi

bench-docs: $(VENV)/.installed
	$(BIN)/python -m benchmarks.report
	$(BIN)/python -m benchmarks.report --check

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .hypothesis
