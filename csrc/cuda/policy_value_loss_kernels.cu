// CUDA kernels of the fused policy-value loss. Forward: ONE kernel computes every token's terms
// (dlmkern/policy_value_loss.h, shared with the CPU kernel), writes the unscaled gradients, and
// reduces the statistics; the last block to finish combines the per-block partials in a fixed
// order (deterministic for token_mean / sum) and writes the loss, stats and gradient scales.
// Backward: one elementwise kernel scales the saved gradients by grad_loss and the reduction weight.
#include <cuda_runtime.h>

#include "cuda/launch.h"
#include "cuda/policy_value_loss_kernels.h"
#include "dlmkern/policy_value_loss.h"

namespace dlmkern::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxBlocks = 1024;          // partials the last block combines
constexpr int kTokensPerThreadHint = 4;   // grid sizing: ~4 tokens per thread before striding
constexpr int kSeqFields = 4;             // per-sequence (pg, kl, vf, count)

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = pv_nan_max(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// Reduces N values per thread over the block (sum, or max for index max_idx); the result is
// valid in thread 0. Fixed reduction order, so results are deterministic.
template <int N>
__device__ void block_reduce(float (&v)[N], int max_idx) {
  __shared__ float smem[kWarps][N];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int k = 0; k < N; ++k) v[k] = k == max_idx ? warp_max(v[k]) : warp_sum(v[k]);
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) smem[warp][k] = v[k];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarps; ++w) {
#pragma unroll
      for (int k = 0; k < N; ++k) {
        v[k] = k == max_idx ? pv_nan_max(v[k], smem[w][k]) : v[k] + smem[w][k];
      }
    }
  }
  __syncthreads();
}

__global__ void __launch_bounds__(kThreads) pv_forward_kernel(PvForwardArgs a, float* partials) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const bool per_seq = a.reduction == kSeqMean;
  float* seq_sums = a.workspace;
  unsigned int* counter = reinterpret_cast<unsigned int*>(a.workspace + kSeqFields * a.num_seqs);
  // Set when an unmasked token's sequence id is out of [0, num_seqs): checking on the host would
  // cost a sync, so the token is left out of the sequence sums and the loss becomes NaN.
  unsigned int* bad_id = counter + 1;

  float acc[kNumPvStats];
  pv_zero(acc);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  // The loop bound is uniform per warp so the warp-wide shuffles below see all 32 lanes.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kThreads + warp * 32; base < a.num_tokens;
       base += stride) {
    const int64_t i = base + lane;
    const bool active = i < a.num_tokens && a.mask[i];
    PvTerms t{};
    if (active) {
      t = pv_terms_at(a, i);
      pv_accumulate(acc, t);
    }
    if (i < a.num_tokens) {
      a.u_logp[i] = active ? t.d_logp : 0.f;
      if (a.u_values) a.u_values[i] = active ? t.d_values : 0.f;
    }
    if (per_seq) {
      int64_t s = active ? (a.seq_ids ? a.seq_ids[i] : i / a.row_len) : -1;
      const bool in_range = s >= 0 && s < a.num_seqs;
      if (active && !in_range) atomicOr(bad_id, 1u);
      const bool counted = active && in_range;
      if (!counted) s = -1;
      const unsigned ballot = __ballot_sync(0xffffffffu, counted);
      // Compare against the first counted lane's sequence (lane 0 may be masked out).
      const int64_t s_first = __shfl_sync(0xffffffffu, s, ballot ? __ffs(ballot) - 1 : 0);
      const bool uniform = __all_sync(0xffffffffu, !counted || s == s_first);
      if (ballot && uniform) {
        // Usual case (a sequence's tokens are contiguous): one atomic per field per warp.
        const float pg = warp_sum(counted ? t.pg : 0.f), kl = warp_sum(counted ? t.kl : 0.f);
        const float vf = warp_sum(counted ? t.vf : 0.f), cnt = warp_sum(counted ? 1.f : 0.f);
        if (lane == 0) {
          float* dst = seq_sums + kSeqFields * s_first;
          atomicAdd(dst + 0, pg);
          atomicAdd(dst + 1, kl);
          atomicAdd(dst + 2, vf);
          atomicAdd(dst + 3, cnt);
        }
      } else if (counted) {
        float* dst = seq_sums + kSeqFields * s;
        atomicAdd(dst + 0, t.pg);
        atomicAdd(dst + 1, t.kl);
        atomicAdd(dst + 2, t.vf);
        atomicAdd(dst + 3, 1.f);
      }
    }
  }

  block_reduce(acc, kMaxRatio);
  __shared__ bool is_last;
  if (threadIdx.x == 0) {
    for (int k = 0; k < kNumPvStats; ++k) partials[blockIdx.x * kNumPvStats + k] = acc[k];
    __threadfence();  // partials and sequence sums visible before the ticket is taken
    is_last = atomicAdd(counter, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();

  // Last block: combine the block partials in a fixed order.
  float sums[kNumPvStats];
  pv_zero(sums);
  for (int b = threadIdx.x; b < gridDim.x; b += kThreads) {
    float p[kNumPvStats];
    for (int k = 0; k < kNumPvStats; ++k) p[k] = __ldcg(partials + b * kNumPvStats + k);
    pv_combine(sums, p);
  }
  block_reduce(sums, kMaxRatio);

  __shared__ float reduced[4];  // pg, kl, vf, scale (token_mean / sum) or 1 / nonempty
  if (per_seq) {
    float s4[4] = {0.f, 0.f, 0.f, 0.f};  // sum pg/c, sum kl/c, sum vf/c, nonempty
    for (int64_t s = threadIdx.x; s < a.num_seqs; s += kThreads) {
      const float cnt = __ldcg(seq_sums + kSeqFields * s + 3);
      if (cnt > 0.f) {
        s4[0] += __ldcg(seq_sums + kSeqFields * s + 0) / cnt;
        s4[1] += __ldcg(seq_sums + kSeqFields * s + 1) / cnt;
        s4[2] += __ldcg(seq_sums + kSeqFields * s + 2) / cnt;
        s4[3] += 1.f;
      }
    }
    block_reduce(s4, -1);
    if (threadIdx.x == 0) {
      const float inv = s4[3] > 0.f ? 1.f / s4[3] : 0.f;
      reduced[0] = s4[0] * inv;
      reduced[1] = s4[1] * inv;
      reduced[2] = s4[2] * inv;
      reduced[3] = inv;
    }
    __syncthreads();
    for (int64_t s = threadIdx.x; s < a.num_seqs; s += kThreads) {
      const float cnt = __ldcg(seq_sums + kSeqFields * s + 3);
      a.seq_scale[s] = cnt > 0.f ? reduced[3] / cnt : 0.f;
    }
  } else if (threadIdx.x == 0) {
    const float scale = pv_global_scale(sums, a.reduction, a.normalizer);
    reduced[0] = sums[kSumPg] * scale;
    reduced[1] = sums[kSumKl] * scale;
    reduced[2] = sums[kSumVf] * scale;
    a.seq_scale[0] = scale;
  }
  if (threadIdx.x == 0) {
    const float loss = pv_write_stats(sums, reduced[0], reduced[1], reduced[2], a.params, a.stats);
    *a.loss = __ldcg(bad_id) ? __int_as_float(0x7fc00000) : loss;
    *counter = 0u;
  }
}

__global__ void __launch_bounds__(kThreads) pv_backward_kernel(PvBackwardArgs a) {
  const float g = *a.grad_loss;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < a.num_tokens;
       i += stride) {
    const int64_t s = a.per_seq ? (a.seq_ids ? a.seq_ids[i] : i / a.row_len) : 0;
    // Masked tokens (u = 0) may carry any id: never index seq_scale with one out of range.
    const float w = s >= 0 && s < a.num_seqs ? g * a.seq_scale[s] : 0.f;
    a.grad_logp[i] = a.u_logp[i] * w;
    if (a.grad_values) a.grad_values[i] = a.u_values[i] * w;
  }
}

int grid_for(int64_t tokens) {
  const int64_t want = (tokens + kThreads * kTokensPerThreadHint - 1) / (kThreads * kTokensPerThreadHint);
  return static_cast<int>(want < 1 ? 1 : (want > kMaxBlocks ? kMaxBlocks : want));
}

}  // namespace

int64_t pv_forward_partials_floats() { return static_cast<int64_t>(kMaxBlocks) * kNumPvStats; }

int launch_pv_forward(PvForwardArgs& a, float* partials) {
  const int grid = grid_for(a.num_tokens);
  DLMKERN_LAUNCH(pv_forward_kernel, grid, kThreads, 0, static_cast<cudaStream_t>(a.stream))(a, partials);
  return static_cast<int>(cudaGetLastError());
}

int launch_pv_backward(PvBackwardArgs& a) {
  if (a.num_tokens == 0) return 0;
  const int grid = static_cast<int>(
      std::min<int64_t>((a.num_tokens + kThreads - 1) / kThreads, 8 * kMaxBlocks));
  DLMKERN_LAUNCH(pv_backward_kernel, grid, kThreads, 0, static_cast<cudaStream_t>(a.stream))(a);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace dlmkern::cuda
