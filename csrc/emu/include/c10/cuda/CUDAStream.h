// CUDA emulator stand-in (tests only): the "current stream" of the emulated device is a null
// stream on the CPU; tensors the glue allocates from it live on the CPU. See csrc/emu/README.md.
#pragma once

#include <c10/core/Device.h>

#include "dlmkern_emu/runtime_api.h"

namespace c10::cuda {

struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
  c10::Device device() const { return c10::Device(c10::kCPU); }
};

inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return CUDAStream{}; }

}  // namespace c10::cuda
