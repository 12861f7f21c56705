// The torch library the ops live in and the dispatch key of the CUDA glue. The normal build
// registers `dlmkern` ops with CUDA kernels for CUDA tensors; the CUDA emulator build (tests only,
// DLMKERN_CUDA_EMU, see csrc/emu/README.md) registers the same schemas as `dlmkern_emu` and the
// CUDA glue + kernels for CPU tensors, so the CUDA code paths run on a machine without a GPU.
#pragma once

#include <torch/library.h>

#ifdef DLMKERN_CUDA_EMU
#define DLMKERN_LIB dlmkern_emu
#define DLMKERN_CUDA_KEY CPU
#else
#define DLMKERN_LIB dlmkern
#define DLMKERN_CUDA_KEY CUDA
#endif

// One level of indirection so the names above expand before TORCH_LIBRARY pastes them.
#define DLMKERN_TORCH_LIBRARY_(ns, m) TORCH_LIBRARY(ns, m)
#define DLMKERN_TORCH_LIBRARY_IMPL_(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)
#define DLMKERN_LIBRARY(m) DLMKERN_TORCH_LIBRARY_(DLMKERN_LIB, m)
#define DLMKERN_CUDA_IMPL(m) DLMKERN_TORCH_LIBRARY_IMPL_(DLMKERN_LIB, DLMKERN_CUDA_KEY, m)
