// CUDA row kernels for the log-prob ops: the online log-sum-exp / target gather / entropy over a
// chunk of logits, and the matching gradient. They share dlmkern/online_lse.h with the CPU kernels.
// The GEMMs producing the chunks run on tensor cores through cuBLAS (see csrc/logprobs.cpp).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda/launch.h"
#include "cuda/logprobs_kernels.h"
#include "dlmkern/online_lse.h"

namespace dlmkern::cuda {
namespace {

constexpr int kThreads = 256;         // threads per row block
constexpr int kWarps = kThreads / 32;
constexpr int kGradColsPerBlock = 4096;  // columns handled by one gradient block

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ LseState warp_merge(LseState a) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    LseState b{__shfl_xor_sync(0xffffffffu, a.m, off), __shfl_xor_sync(0xffffffffu, a.s, off),
               __shfl_xor_sync(0xffffffffu, a.t, off)};
    a = lse_merge(a, b);
  }
  return a;
}

// One block per row: each thread streams a strided slice of the row, then the block merges.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    lse_update_kernel(const T* __restrict__ x, int64_t cols, int64_t ld,
                      const int64_t* __restrict__ targets, int64_t col0, float inv_temp,
                      float* __restrict__ state, int64_t state_ld) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * ld;
  float* st = state + row * state_ld;
  const int64_t local = targets[row] - col0;
  LseState acc = lse_empty();
  for (int64_t c = threadIdx.x; c < cols; c += kThreads) {
    const float z = to_float(xr[c]) * inv_temp;
    lse_push(acc, z);
    if (c == local) st[3] = z;  // exactly one thread owns the target column
  }
  acc = warp_merge(acc);
  __shared__ LseState partial[kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) partial[warp] = acc;
  __syncthreads();
  if (warp == 0) {
    acc = lane < kWarps ? partial[lane] : lse_empty();
    acc = warp_merge(acc);
    if (lane == 0) {
      const LseState merged = lse_merge(LseState{st[0], st[1], st[2]}, acc);
      st[0] = merged.m;
      st[1] = merged.s;
      st[2] = merged.t;
    }
  }
}

template <typename Tin, typename Tout>
__global__ void __launch_bounds__(kThreads)
    logprob_grad_kernel(const Tin* __restrict__ x, int64_t cols, int64_t ld,
                        const int64_t* __restrict__ targets, int64_t col0, float inv_temp,
                        const float* __restrict__ lse, const float* __restrict__ mean_z,
                        const float* __restrict__ g_logp, const float* __restrict__ g_ent,
                        Tout* __restrict__ y, int64_t ld_out) {
  const int64_t row = blockIdx.x;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * kGradColsPerBlock;
  const int64_t end = begin + kGradColsPerBlock < cols ? begin + kGradColsPerBlock : cols;
  const Tin* xr = x + row * ld;
  Tout* yr = y + row * ld_out;
  const float gl = g_logp[row], ge = g_ent[row], l = lse[row], mz = mean_z[row];
  const int64_t local = targets[row] - col0;
  if (logprob_grad_is_zero(targets[row], l, gl, ge)) {  // ignored row, or no gradient
    for (int64_t c = begin + threadIdx.x; c < end; c += kThreads) yr[c] = from_float<Tout>(0.f);
    return;
  }
  for (int64_t c = begin + threadIdx.x; c < end; c += kThreads) {
    const float z = to_float(xr[c]) * inv_temp;
    yr[c] = from_float<Tout>(inv_temp * logprob_entropy_grad(z, l, mz, c == local, gl, ge));
  }
}

template <typename T>
int update_typed(const void* x, int64_t rows, int64_t cols, int64_t ld, const int64_t* targets,
                 int64_t col0, float inv_temp, float* state, int64_t state_ld, cudaStream_t s) {
  auto kernel = lse_update_kernel<T>;
  DLMKERN_LAUNCH(kernel, static_cast<unsigned>(rows), kThreads, 0, s)(
      static_cast<const T*>(x), cols, ld, targets, col0, inv_temp, state, state_ld);
  return static_cast<int>(cudaGetLastError());
}

template <typename Tin, typename Tout>
int grad_typed(const void* x, int64_t rows, int64_t cols, int64_t ld, const int64_t* targets,
               int64_t col0, float inv_temp, const float* lse, const float* mean_z,
               const float* g_logp, const float* g_ent, void* y, int64_t ld_out, cudaStream_t s) {
  const dim3 grid(static_cast<unsigned>(rows),
                  static_cast<unsigned>((cols + kGradColsPerBlock - 1) / kGradColsPerBlock));
  auto kernel = logprob_grad_kernel<Tin, Tout>;
  DLMKERN_LAUNCH(kernel, grid, kThreads, 0, s)(
      static_cast<const Tin*>(x), cols, ld, targets, col0, inv_temp, lse, mean_z, g_logp, g_ent,
      static_cast<Tout*>(y), ld_out);
  return static_cast<int>(cudaGetLastError());
}

template <typename Tin>
int grad_out_dispatch(DType out, const void* x, int64_t rows, int64_t cols, int64_t ld,
                      const int64_t* targets, int64_t col0, float inv_temp, const float* lse,
                      const float* mean_z, const float* g_logp, const float* g_ent, void* y,
                      int64_t ld_out, cudaStream_t s) {
  switch (out) {
    case DType::kFloat32:
      return grad_typed<Tin, float>(x, rows, cols, ld, targets, col0, inv_temp, lse, mean_z,
                                    g_logp, g_ent, y, ld_out, s);
    case DType::kFloat16:
      return grad_typed<Tin, __half>(x, rows, cols, ld, targets, col0, inv_temp, lse, mean_z,
                                     g_logp, g_ent, y, ld_out, s);
    case DType::kBFloat16:
      return grad_typed<Tin, __nv_bfloat16>(x, rows, cols, ld, targets, col0, inv_temp, lse,
                                            mean_z, g_logp, g_ent, y, ld_out, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace

int launch_lse_update(DType in, const void* x, int64_t rows, int64_t cols, int64_t ld,
                      const int64_t* targets, int64_t col0, float inv_temp, float* state,
                      int64_t state_ld, void* stream) {
  if (rows == 0 || cols == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  switch (in) {
    case DType::kFloat32:
      return update_typed<float>(x, rows, cols, ld, targets, col0, inv_temp, state, state_ld, s);
    case DType::kFloat16:
      return update_typed<__half>(x, rows, cols, ld, targets, col0, inv_temp, state, state_ld, s);
    case DType::kBFloat16:
      return update_typed<__nv_bfloat16>(x, rows, cols, ld, targets, col0, inv_temp, state,
                                         state_ld, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int launch_logprob_grad(DType in, DType out, const void* x, int64_t rows, int64_t cols, int64_t ld,
                        const int64_t* targets, int64_t col0, float inv_temp, const float* lse,
                        const float* mean_z, const float* g_logp, const float* g_ent, void* y,
                        int64_t ld_out, void* stream) {
  if (rows == 0 || cols == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  switch (in) {
    case DType::kFloat32:
      return grad_out_dispatch<float>(out, x, rows, cols, ld, targets, col0, inv_temp, lse, mean_z,
                                      g_logp, g_ent, y, ld_out, s);
    case DType::kFloat16:
      return grad_out_dispatch<__half>(out, x, rows, cols, ld, targets, col0, inv_temp, lse,
                                       mean_z, g_logp, g_ent, y, ld_out, s);
    case DType::kBFloat16:
      return grad_out_dispatch<__nv_bfloat16>(out, x, rows, cols, ld, targets, col0, inv_temp,
                                              lse, mean_z, g_logp, g_ent, y, ld_out, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace dlmkern::cuda
