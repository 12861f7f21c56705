// CUDA backend glue of the log-prob ops: torch tensors in, raw pointers to the .cu launchers out.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "cuda/glue.h"
#include "cuda/logprobs_kernels.h"
#include "library.h"
#include "logprobs.h"

namespace dlmkern {
namespace {

constexpr int64_t kCudaRowChunk = 4096;    // rows per GEMM
constexpr int64_t kCudaVocabChunk = 4096;  // vocabulary columns per GEMM

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK_TYPE(false, "dlmkern: unsupported dtype ", t);
  }
}

void* current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void check_launch(int err) {
  TORCH_CHECK(err == 0, "dlmkern: CUDA kernel launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
}

void cuda_update(const at::Tensor& chunk, const at::Tensor& targets, int64_t col0, double inv_temp,
                 at::Tensor& state) {
  check_launch(cuda::launch_lse_update(
      to_dtype(chunk.scalar_type()), chunk.const_data_ptr(), chunk.size(0), chunk.size(1),
      chunk.stride(0), targets.const_data_ptr<int64_t>(), col0, static_cast<float>(inv_temp),
      state.data_ptr<float>(), state.stride(0), current_stream()));
}

void cuda_grad(const at::Tensor& chunk, const at::Tensor& targets, int64_t col0, double inv_temp,
               const at::Tensor& lse, const at::Tensor& mean_z, const at::Tensor& g_logp,
               const at::Tensor& g_ent, at::Tensor& out) {
  check_launch(cuda::launch_logprob_grad(
      to_dtype(chunk.scalar_type()), to_dtype(out.scalar_type()), chunk.const_data_ptr(),
      chunk.size(0), chunk.size(1), chunk.stride(0), targets.const_data_ptr<int64_t>(), col0,
      static_cast<float>(inv_temp), lse.const_data_ptr<float>(), mean_z.const_data_ptr<float>(),
      g_logp.const_data_ptr<float>(), g_ent.const_data_ptr<float>(), out.data_ptr(),
      out.stride(0), current_stream()));
}

const RowKernels kCuda{cuda_update, cuda_grad, device_value_check, kCudaRowChunk,
                      kCudaVocabChunk};

}  // namespace

DLMKERN_CUDA_IMPL(m) {
  m.impl("masked_logprobs", &LogprobOps<kCuda>::masked);
  m.impl("masked_logprobs_backward", &LogprobOps<kCuda>::masked_backward);
  m.impl("logprobs_from_logits", &LogprobOps<kCuda>::from_logits);
  m.impl("logprobs_from_logits_backward", &LogprobOps<kCuda>::from_logits_backward);
}

}  // namespace dlmkern
