#!/usr/bin/env bash
# One call on a GPU machine: build with CUDA kernels, run the whole test suite (CUDA tests
# included), run every benchmark on the GPU, and write everything into OUTDIR:
#   device.txt build.log build_info.json tests.log bench.log results.jsonl
# Usage: bash bench/gpu_check.sh OUTDIR
set -uo pipefail
OUT=${1:?usage: bench/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$PY" -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', sys.version.split()[0])"
  date -u; } > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

export DLMKERN_CUDA=ON DLMKERN_CUDA_ARCHS=${DLMKERN_CUDA_ARCHS:-90a}
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
pip_install() { "$PY" -m pip install -q --no-build-isolation --no-deps -e . "$@"; }
if ! pip_install > "$OUT/build.log" 2>&1; then
  # PEP 668 images refuse a plain install into the system interpreter.
  pip_install --break-system-packages >> "$OUT/build.log" 2>&1 || {
    echo "BUILD FAILED"; tail -60 "$OUT/build.log"; exit 1; }
fi
"$PY" -c "import dlmkern, json; print(json.dumps(dlmkern.build_info(), indent=1))" \
  | tee "$OUT/build_info.json"

echo "== tests"
"$PY" -m pytest -q -rs tests 2>&1 | tee "$OUT/tests.log" | tail -40
test_rc=${PIPESTATUS[0]}

echo "== benchmarks"
export DLMKERN_BENCH_RESULTS="$OUT/results.jsonl"
for b in bench/bench_*.py; do
  echo "-- $b"
  timeout "${DLMKERN_BENCH_TIMEOUT:-240}" "$PY" "$b" --device cuda 2>&1 || echo "-- $b failed or timed out"
done | tee "$OUT/bench.log"
echo "tests exit code: $test_rc"
exit "$test_rc"
