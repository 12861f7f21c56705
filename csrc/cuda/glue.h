// Pieces shared by the CUDA glue files (csrc/cuda/*_cuda.cpp): graph capture and the error flag.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "device_errors.h"

namespace dlmkern {

// Whether the current stream is capturing a CUDA graph.
inline bool capturing() {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream().stream(), &status);
  return status != cudaStreamCaptureStatusNone;
}

// like's error flag, allocated outside a graph capture only (an allocation and memset inside a
// capture would be replayed). The emulator's flag is CPU memory: always allocated.
inline at::Tensor glue_error_flag(const at::Tensor& like) {
#ifdef DLMKERN_CUDA_EMU
  return device_error_flag(like, true);
#else
  return device_error_flag(like, !capturing());
#endif
}

// The glue never reads argument values on the host (a device sync per call): it checks them on
// the device into the error flag.
inline ValueCheck device_value_check(const at::Tensor& like) {
  return ValueCheck{false, glue_error_flag(like)};
}

// The flag as the kernels take it (null: nothing recorded).
inline unsigned* flag_ptr(const at::Tensor& flag) {
  return flag.defined() ? reinterpret_cast<unsigned*>(flag.data_ptr<int32_t>()) : nullptr;
}

}  // namespace dlmkern
