#!/usr/bin/env bash
# GPU validation in two short calls (each fits a 600 s limit; options: tools/gpu_validate.py --help and
# docs/gpu-validation.md). Uses the machine's own python3 (or $PYTHON); carry gpu-wheels/ (make gpu-wheels).
#
#   bash tools/gpu_validate.sh --call 1 --time-limit 540 --out runs/gpu-call1   # build, kernel paths,
#                                                   # determinism / CUDA graphs / compile-once, op and search benchmarks
#   bash tools/gpu_validate.sh --call 2 --time-limit 540 --out runs/gpu-call2   # sanitizer, whole test suite,
#                                                   # data benchmark
#
# Each leaves OUT/summary.json, OUT/summary.md and OUT/results.tar.gz (re-packed after every stage).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -u tools/gpu_validate.py "$@"
