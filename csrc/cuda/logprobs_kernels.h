// Raw-pointer launchers of the CUDA log-prob row kernels. No torch types: the .cu file that
// implements them compiles against CUDA headers only (fast builds, see BUILD-NOTES.md).
#pragma once

#include <cstdint>

#include "dlmkern/common.h"

namespace dlmkern::cuda {

// state[r * state_ld + {0,1,2,3}] = (m, s, t, z_target): merged with columns [col0, col0 + cols)
// of x (rows x cols, row stride ld). Returns a cudaError_t value (0 on success).
int launch_lse_update(DType in, const void* x, int64_t rows, int64_t cols, int64_t ld,
                      const int64_t* targets, int64_t col0, float inv_temp, float* state,
                      int64_t state_ld, void* stream);

// out[r, c] = inv_temp * d(g_logp[r] * logp_r + g_ent[r] * entropy_r) / dz_rc.
int launch_logprob_grad(DType in, DType out, const void* x, int64_t rows, int64_t cols, int64_t ld,
                        const int64_t* targets, int64_t col0, float inv_temp, const float* lse,
                        const float* mean_z, const float* g_logp, const float* g_ent, void* y,
                        int64_t ld_out, void* stream);

}  // namespace dlmkern::cuda
