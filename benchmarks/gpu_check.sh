#!/usr/bin/env bash
# The device check of the GPU path (docs/benchmarks.md, "GPU path"): the tests marked `cuda`,
# then benchmarks/bench_gpu.py, in one script sized for 15 minutes of GPU time (about 1 minute
# of tests, 6-8 of benchmark, the rest for the machine's start).
#
# The GPU machine has torch (CUDA), torchvision, numpy, pyarrow, pillow, pyyaml and tqdm, and no
# package registry. The pure-Python packages that mlc and the tests also import travel in
# .gpu-deps/ (git-ignored), packed beforehand on a machine with the project's .venv:
#
#   benchmarks/gpu_check.sh --pack        # copies them from .venv's site-packages
#
# and carried with the working tree (the device tool's carry: [".gpu-deps"]). Then, on the
# GPU machine, from the repository root:
#
#   benchmarks/gpu_check.sh [bench_gpu options]
set -euo pipefail
cd "$(dirname "$0")/.."
DEPS=.gpu-deps
# torchmetrics (validation's metric) and lightning_utilities; braceexpand and fsspec (shard
# URLs); webdataset; pytest and what it needs (pygments, pluggy, iniconfig, packaging; tomli and
# exceptiongroup for Python < 3.11, when the packing environment has them).
PACKAGES="torchmetrics lightning_utilities braceexpand fsspec webdataset pytest _pytest py.py
pluggy iniconfig packaging pygments tomli exceptiongroup"

if [ "${1:-}" = "--pack" ]; then
  PY=${PYTHON:-.venv/bin/python}
  site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  rm -rf "$DEPS" && mkdir -p "$DEPS"
  for name in $PACKAGES; do
    [ -e "$site/$name" ] && cp -r "$site/$name" "$DEPS/"
    for info in "$site/${name%.py}"-*.dist-info; do  # versions for importlib.metadata
      [ -e "$info" ] && cp -r "$info" "$DEPS/"
    done
  done
  du -sh "$DEPS"
  exit 0
fi

export PYTHONPATH="$PWD:$PWD/$DEPS${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
"$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda,
    torch.cuda.is_available() and torch.cuda.get_device_name())'
# Only the files with cuda tests: collecting the others needs packages the GPU machine lacks.
"$PY" -m pytest -p no:cacheprovider -q -m cuda -o addopts="" \
  tests/mlc/test_accel.py tests/mlc/train/test_precision.py
"$PY" -m benchmarks.bench_gpu "$@"
# benchmarks/results/bench_gpu.json holds the figures (also copied to $OUT, the device tool's
# folder that comes back); with it in benchmarks/results/ here, `python -m benchmarks.report`
# puts them into docs/benchmarks.md.
if [ -n "${OUT:-}" ]; then cp benchmarks/results/bench_gpu.json "$OUT/"; fi
