#!/usr/bin/env bash
# One command for a lent GPU machine: build the extension, check every kernel path against the fp64
# reference (compiled Triton and CUDA), compute-sanitizer, determinism / CUDA graphs / compile-once, the
# whole test suite, and only then the benchmarks. Options: tools/gpu_validate.py --help; the README's
# "GPU validation" section gives the device call. Uses the machine's own python3 (or $PYTHON).
#
#   bash tools/gpu_validate.sh --out "$OUT/gpu-$(date +%Y%m%d)" --bundle
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -u tools/gpu_validate.py "$@"
