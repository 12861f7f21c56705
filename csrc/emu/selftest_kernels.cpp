// Deliberately broken kernels (tests only): each shows that the CUDA emulator reports a class of
// bug instead of computing something plausible. See tests/test_cuda_emu.py.
#include <cstring>
#include <string>

#include "cuda/launch.h"

namespace {

// Threads meet at two different __syncthreads (undefined on a GPU).
__global__ void divergent_barrier_kernel() {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

// Lane 0 of each warp waits for the block, the other lanes for their warp: nobody completes.
__global__ void deadlock_kernel() {
  if (threadIdx.x % 32 == 0) {
    __syncthreads();
  } else {
    __syncwarp();
  }
}

// Half the warp has exited when the other half shuffles with a full mask.
__global__ void partial_warp_shuffle_kernel(float* out) {
  if (threadIdx.x % 32 < 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<float>(threadIdx.x), 1);
}

// Missing __syncthreads between the write and the read of a neighbour's slot: what a thread reads
// depends on the order threads run in, so the emulator's schedules disagree.
__global__ void race_kernel(float* out) {
  DLMKERN_DYNAMIC_SMEM(raw);
  float* s = reinterpret_cast<float*>(raw);
  s[threadIdx.x] = static_cast<float>(threadIdx.x);
  out[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}

// The same with the barrier: every schedule gives out[i] = i + 1 (mod n).
__global__ void synced_kernel(float* out) {
  DLMKERN_DYNAMIC_SMEM(raw);
  float* s = reinterpret_cast<float*>(raw);
  s[threadIdx.x] = static_cast<float>(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}

__global__ void noop_kernel() {}

}  // namespace

namespace dlmkern_emu {

// Runs kernel `name` with 64 threads in one block; out holds 64 floats. Returns a cudaError_t.
int run_selftest(const std::string& name, float* out) {
  cudaStream_t s = nullptr;
  if (name == "divergent_barrier") {
    DLMKERN_LAUNCH(divergent_barrier_kernel, 1, 64, 0, s)();
  } else if (name == "deadlock") {
    DLMKERN_LAUNCH(deadlock_kernel, 1, 64, 0, s)();
  } else if (name == "partial_warp_shuffle") {
    DLMKERN_LAUNCH(partial_warp_shuffle_kernel, 1, 64, 0, s)(out);
  } else if (name == "race") {
    DLMKERN_LAUNCH(race_kernel, 1, 64, 64 * sizeof(float), s)(out);
  } else if (name == "synced") {
    DLMKERN_LAUNCH(synced_kernel, 1, 64, 64 * sizeof(float), s)(out);
  } else if (name == "smem_over_default") {  // > 48 KiB without cudaFuncSetAttribute
    DLMKERN_LAUNCH(noop_kernel, 1, 64, 64 * 1024, s)();
  } else if (name == "grid_y_too_large") {
    DLMKERN_LAUNCH(noop_kernel, dim3(1, 70000), 64, 0, s)();
  } else {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace dlmkern_emu
