// Raw-pointer launchers of the CUDA policy-value loss kernels (no torch types).
#pragma once

#include <cstdint>

#include "policy_value_loss_args.h"

namespace dlmkern::cuda {

// Floats of scratch the forward kernel needs for its per-block partials.
int64_t pv_forward_partials_floats();
// Both return a cudaError_t value (0 on success).
int launch_pv_forward(PvForwardArgs& a, float* partials);
int launch_pv_backward(PvBackwardArgs& a);

}  // namespace dlmkern::cuda
