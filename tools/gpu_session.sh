#!/usr/bin/env bash
# Everything a lent GPU machine should do, in one batched command (device time is short):
# build l2b_fast with its CUDA kernels, run the whole test suite (the CUDA-parametrised tests run there),
# run the benchmarks, and leave logs and result files in $OUT.
#
#   device run:  bash tools/gpu_session.sh        (carry: gpu-wheels, if prepared)
#
# The GPU image (python3 3.12, torch 2.11+cu130, triton 3.6, pytest, ninja) reaches no registry. Pure-Python
# test dependencies it lacks come from ./gpu-wheels when present, prepared on a CPU machine with:
#   pip download -d gpu-wheels --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       expecttest matplotlib contourpy cycler fonttools kiwisolver pyparsing python-dateutil six packaging pillow
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/l2b-gpu}
mkdir -p "$OUT"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
PY=${PYTHON:-python3}

{ nvidia-smi; $PY -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())"; } > "$OUT/env.txt" 2>&1
if [ -d gpu-wheels ]; then
  $PY -m pip install --no-index --find-links gpu-wheels expecttest matplotlib > "$OUT/wheels.log" 2>&1
fi
if ! $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"
  exit 1
fi
$PY -c "import l2b_fast, torch; from l2b_fast import backends; print(backends.available('cuda'))" | tee -a "$OUT/env.txt"
# GPU tests first (fast feedback), then the rest.
$PY -m pytest tests -q -x -k cuda -p no:cacheprovider > "$OUT/tests_cuda.log" 2>&1; echo "cuda tests rc=$?" | tee -a "$OUT/summary.txt"
$PY -m pytest tests -q -p no:cacheprovider > "$OUT/tests_all.log" 2>&1; echo "all tests rc=$?" | tee -a "$OUT/summary.txt"
tail -3 "$OUT/tests_cuda.log" "$OUT/tests_all.log"
for dtype in float32 bfloat16; do
  $PY -m l2b_fast.bench --device cuda --dtype "$dtype" --out "$OUT" >> "$OUT/bench.log" 2>&1
done
tail -30 "$OUT/bench.log"
