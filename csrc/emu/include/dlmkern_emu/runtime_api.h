// CUDA emulator (tests only): the host-side runtime API the glue and launchers use.
// See csrc/emu/README.md. Nothing here talks to a GPU; kernels run on CPU fibers (runtime.cpp).
#pragma once

#include <cstddef>
#include <cstdint>

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
using cudaError = cudaError_t;

struct CUstream_st;
using cudaStream_t = CUstream_st*;

enum cudaStreamCaptureStatus : int {
  cudaStreamCaptureStatusNone = 0,
  cudaStreamCaptureStatusActive = 1,
  cudaStreamCaptureStatusInvalidated = 2,
};

enum cudaFuncAttribute : int { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

namespace dlmkern_emu {
// Emulated graph capture: cudaStreamIsCapturing reports Active while this is set (tests use it to
// run the capture-only code paths: no host value checks, device-side error flags).
void set_capturing(bool on);
bool capturing();
void record_func_attribute(const void* func, cudaFuncAttribute attr, int value);
}  // namespace dlmkern_emu

cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t err);
cudaError_t cudaStreamIsCapturing(cudaStream_t stream, cudaStreamCaptureStatus* status);

template <typename F>
cudaError_t cudaFuncSetAttribute(F* func, cudaFuncAttribute attr, int value) {
  dlmkern_emu::record_func_attribute(reinterpret_cast<const void*>(func), attr, value);
  return cudaSuccess;
}
