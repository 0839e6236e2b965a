"""The benchmarks: each module times mlc against its baselines in one run (docs/benchmarks.md).

Run them from the repository root as modules, e.g. ``python -m benchmarks.bench_map``, or all
of them with ``make bench``. Each writes benchmarks/results/<name>.json (git-ignored);
``python -m benchmarks.report`` puts those figures into docs/benchmarks.md.
"""
