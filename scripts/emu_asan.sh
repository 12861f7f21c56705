#!/usr/bin/env bash
# Runs the CUDA-emulator tests (tests/test_cuda_emu.py, the emulator cases of test_nan_policy.py
# and the capture-mode layout fuzz of test_layout_fuzz.py, whose subprocess inherits the preload)
# with the emulated kernels built under AddressSanitizer: an out-of-bounds read or write of a
# kernel (global or shared memory) aborts with a report; a misaligned vector access (e.g. a 16-byte
# load) traps. Builds into build/emu-asan (about 2 minutes on 2 cores), swaps the ASan module in
# for the run and restores the normal one afterwards. Tests that raise C++ exceptions are left out
# (GCC's ASan runtime cannot intercept __cxa_throw when preloaded into Python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$PWD/.venv/bin/python"
NORMAL=$("$PY" -c "import dlmkern._C_emu as m; print(m.__file__)")  # the installed module
cmake -S . -B build/emu-asan -G Ninja -DPython_EXECUTABLE="$PY" -DDLMKERN_CUDA=OFF \
  -DDLMKERN_CUDA_EMU=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_FLAGS="-fsanitize=address -fsanitize=alignment -fsanitize-undefined-trap-on-error -fno-omit-frame-pointer" \
  -DCMAKE_MODULE_LINKER_FLAGS="-fsanitize=address" > /dev/null
ninja -C build/emu-asan _C_emu > /dev/null
cp "$NORMAL" build/emu-asan/normal_emu.so
trap 'cp build/emu-asan/normal_emu.so "$NORMAL"' EXIT
cp build/emu-asan/_C_emu*.so "$NORMAL"
LD_PRELOAD=$(g++ -print-file-name=libasan.so) \
  ASAN_OPTIONS=detect_leaks=0:detect_stack_use_after_return=0 \
  "$PY" -m pytest tests/test_cuda_emu.py tests/test_nan_policy.py tests/test_layout_fuzz.py \
  -q -p no:cacheprovider -k "not misuse and not rejects and not outside_capture"
