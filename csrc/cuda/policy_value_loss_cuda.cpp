// CUDA backend glue of the fused policy-value loss.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "cuda/policy_value_loss_kernels.h"
#include "policy_value_loss.h"

namespace dlmkern {
namespace {

void check_launch(int err) {
  TORCH_CHECK(err == 0, "dlmkern: CUDA kernel launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
}

void cuda_forward(PvForwardArgs& a) {
  a.stream = c10::cuda::getCurrentCUDAStream().stream();
  // Scratch for per-block partials; every block writes its own slot before it is read.
  auto partials = at::empty({cuda::pv_forward_partials_floats()},
                            at::TensorOptions().device(at::kCUDA, c10::cuda::current_device())
                                .dtype(at::kFloat));
  check_launch(cuda::launch_pv_forward(a, partials.data_ptr<float>()));
}

void cuda_backward(PvBackwardArgs& a) {
  a.stream = c10::cuda::getCurrentCUDAStream().stream();
  check_launch(cuda::launch_pv_backward(a));
}

bool cuda_can_sync() {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream().stream(), &status);
  return status == cudaStreamCaptureStatusNone;
}

const PvKernels kCuda{cuda_forward, cuda_backward, cuda_can_sync};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cuda(
    const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages,
    const at::Tensor& mask, const std::optional<at::Tensor>& ref_logp,
    const std::optional<at::Tensor>& values, const std::optional<at::Tensor>& old_values,
    const std::optional<at::Tensor>& returns, const std::optional<at::Tensor>& seq_ids,
    double eps_low, double eps_high, std::optional<double> dual_clip, double kl_coef,
    double vf_coef, double vf_clip, int64_t reduction, int64_t num_seqs, double normalizer) {
  const c10::cuda::CUDAGuard guard(logp.device());
  return policy_value_loss_forward(logp, old_logp, advantages, mask, ref_logp, values, old_values,
                                   returns, seq_ids, eps_low, eps_high, dual_clip, kl_coef,
                                   vf_coef, vf_clip, reduction, num_seqs, normalizer, kCuda);
}

std::tuple<at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad_loss,
                                                 const at::Tensor& u_logp,
                                                 const at::Tensor& u_values,
                                                 const std::optional<at::Tensor>& seq_ids,
                                                 const at::Tensor& seq_scale, int64_t reduction) {
  const c10::cuda::CUDAGuard guard(u_logp.device());
  return policy_value_loss_backward(grad_loss, u_logp, u_values, seq_ids, seq_scale, reduction,
                                    kCuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(dlmkern, CUDA, m) {
  m.impl("policy_value_loss", &forward_cuda);
  m.impl("policy_value_loss_backward", &backward_cuda);
}

}  // namespace dlmkern
