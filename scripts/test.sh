#!/usr/bin/env bash
# Runs the test suite. On a fresh clone it first sets everything up (scripts/setup.sh --no-demo);
# otherwise it rebuilds incrementally so the tests always run against the current sources.
set -euo pipefail
cd "$(dirname "$0")/.."
# The tests also run the CUDA kernels' code on the CPU emulator (tests/test_cuda_emu.py).
DLMKERN_CUDA_EMU=${DLMKERN_CUDA_EMU:-ON} bash scripts/setup.sh --no-demo
exec .venv/bin/python -m pytest -q "$@"
