#!/usr/bin/env bash
# Sets up a fresh machine: a virtual environment in .venv with torch, the build tools and the test
# extras, then builds dlmkern (CPU kernels, plus CUDA kernels when nvcc is present) and runs the
# embedded demo (`dlmkern demo`). `--no-demo` stops after the build (scripts/test.sh and CI).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
TORCH_SPEC=${DLMKERN_TORCH:-torch==2.14.1}   # the wheel on this machine kind's disk (BUILD-NOTES.md)
demo=1
[[ "${1:-}" == "--no-demo" ]] && demo=0

if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" 2>/dev/null; then
  echo "[setup] installing $TORCH_SPEC and build/test tools into .venv"
  "$VPY" -m pip install -q --upgrade pip
  "$VPY" -m pip install -q "$TORCH_SPEC"
fi
"$VPY" -m pip install -q numpy safetensors math-verify tqdm matplotlib pytest pyyaml transformers peft pyarrow datasets "scikit-build-core>=0.10" ninja ruff

# Build what this machine runs: the CPU kernels always; the CUDA kernels when torch sees a GPU
# (or DLMKERN_CUDA=ON: CI compiles them on a machine without one); the CUDA emulator module only
# for the tests (scripts/test.sh and CI set DLMKERN_CUDA_EMU=ON).
if [[ -z "${CUDA_HOME:-}" && -x /usr/local/cuda/bin/nvcc ]]; then export CUDA_HOME=/usr/local/cuda; fi
if [[ -z "${DLMKERN_CUDA:-}" ]]; then
  if "$VPY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null
  then export DLMKERN_CUDA=AUTO; else export DLMKERN_CUDA=OFF; fi
fi
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
export DLMKERN_CUDA_EMU=${DLMKERN_CUDA_EMU:-OFF}
echo "[setup] building dlmkern (DLMKERN_CUDA=$DLMKERN_CUDA, DLMKERN_CUDA_EMU=$DLMKERN_CUDA_EMU)"
"$VPY" -m pip install -q --no-build-isolation -e .
"$VPY" -c "import dlmkern, json; print('[setup] build_info:', json.dumps(dlmkern.build_info()))"

if [[ $demo == 1 ]]; then
  "$VPY" examples/smoke.py
  .venv/bin/dlmkern demo "$@"   # SFT then TraceRL on a tiny model, ~2 minutes on 2 idle cores
fi
