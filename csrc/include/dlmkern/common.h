// Portable qualifiers so one header serves the C++ CPU kernels and the CUDA kernels.
#pragma once

#if defined(__CUDACC__)
#define DLMKERN_HD __host__ __device__ __forceinline__
#else
#define DLMKERN_HD inline
#endif

namespace dlmkern {

// Element types the raw-pointer kernels understand (no torch types cross into .cu files).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace dlmkern
