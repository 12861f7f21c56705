// Kernel launch and dynamic shared memory spelled once for nvcc and for the CUDA emulator
// (DLMKERN_CUDA_EMU: the .cu files compiled as C++ for tests, see csrc/emu/README.md).
#pragma once

#ifdef DLMKERN_CUDA_EMU
#include "dlmkern_emu/device.h"
#define DLMKERN_LAUNCH(kernel, grid, block, smem, stream) \
  ::dlmkern_emu::Launch(kernel, grid, block, smem, stream)
#define DLMKERN_DYNAMIC_SMEM(name) unsigned char* name = ::dlmkern_emu::dynamic_smem()
#else
// `kernel` must be one token (a name or a local variable holding the kernel).
#define DLMKERN_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#define DLMKERN_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif
