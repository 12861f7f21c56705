// CUDA backend glue of the fused policy-value loss.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "cuda/glue.h"
#include "cuda/policy_value_loss_kernels.h"
#include "library.h"
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
                            at::TensorOptions()
                                .device(c10::cuda::getCurrentCUDAStream().device())
                                .dtype(at::kFloat));
  check_launch(cuda::launch_pv_forward(a, partials.data_ptr<float>()));
}

void cuda_backward(PvBackwardArgs& a) {
  a.stream = c10::cuda::getCurrentCUDAStream().stream();
  check_launch(cuda::launch_pv_backward(a));
}

const PvKernels kCuda{cuda_forward, cuda_backward, device_value_check};

}  // namespace

DLMKERN_CUDA_IMPL(m) {
  m.impl("policy_value_loss", &PvOps<kCuda>::forward);
  m.impl("policy_value_loss_backward", &PvOps<kCuda>::backward);
}

}  // namespace dlmkern
