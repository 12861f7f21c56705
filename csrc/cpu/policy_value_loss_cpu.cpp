// CPU backend of the fused policy-value loss: one parallel pass computes every token's terms,
// its unscaled gradients and the statistics; a short serial pass combines the chunk partials.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "dlmkern/policy_value_loss.h"
#include "policy_value_loss.h"

namespace dlmkern {
namespace {

constexpr int64_t kTokensPerChunk = 4096;

inline int64_t seq_of(const PvForwardArgs& a, int64_t i) {
  return a.seq_ids ? a.seq_ids[i] : i / a.row_len;
}

void cpu_forward(PvForwardArgs& a) {
  const int64_t T = a.num_tokens, S = a.num_seqs;
  const int64_t nchunks = (T + kTokensPerChunk - 1) / kTokensPerChunk;
  const bool per_seq = a.reduction == kSeqMean;
  std::vector<float> partial(static_cast<size_t>(std::max<int64_t>(nchunks, 1)) * kNumPvStats, 0.f);
  const int nthreads = at::get_num_threads();
  // Per-thread (pg, kl, vf, count) sums per sequence, in double: sequences can be long.
  std::vector<double> seq_sums(per_seq ? static_cast<size_t>(nthreads) * S * 4 : 0, 0.0);

  at::parallel_for(0, nchunks, 1, [&](int64_t begin, int64_t end) {
    double* my_seq = per_seq ? seq_sums.data() + static_cast<size_t>(at::get_thread_num()) * S * 4
                             : nullptr;
    for (int64_t c = begin; c < end; ++c) {
      float* acc = partial.data() + c * kNumPvStats;
      const int64_t i0 = c * kTokensPerChunk, i1 = std::min(T, i0 + kTokensPerChunk);
      for (int64_t i = i0; i < i1; ++i) {
        if (!a.mask[i]) {
          a.u_logp[i] = 0.f;
          if (a.u_values) a.u_values[i] = 0.f;
          continue;
        }
        const PvTerms t = pv_terms_at(a, i);
        pv_accumulate(acc, t);
        a.u_logp[i] = t.d_logp;
        if (a.u_values) a.u_values[i] = t.d_values;
        if (per_seq) {
          double* s = my_seq + seq_of(a, i) * 4;
          s[0] += t.pg;
          s[1] += t.kl;
          s[2] += t.vf;
          s[3] += 1.0;
        }
      }
    }
  });

  float sums[kNumPvStats];
  pv_zero(sums);
  for (int64_t c = 0; c < nchunks; ++c) pv_combine(sums, partial.data() + c * kNumPvStats);
  float pg, kl, vf;
  if (per_seq) {
    std::vector<double> tot(static_cast<size_t>(S) * 4, 0.0);
    for (int th = 0; th < nthreads; ++th)
      for (int64_t j = 0; j < S * 4; ++j) tot[j] += seq_sums[static_cast<size_t>(th) * S * 4 + j];
    double spg = 0, skl = 0, svf = 0;
    int64_t nonempty = 0;
    for (int64_t s = 0; s < S; ++s) {
      const double cnt = tot[s * 4 + 3];
      if (cnt <= 0) continue;
      ++nonempty;
      spg += tot[s * 4] / cnt;
      skl += tot[s * 4 + 1] / cnt;
      svf += tot[s * 4 + 2] / cnt;
    }
    const double inv = nonempty > 0 ? 1.0 / nonempty : 0.0;
    pg = static_cast<float>(spg * inv);
    kl = static_cast<float>(skl * inv);
    vf = static_cast<float>(svf * inv);
    for (int64_t s = 0; s < S; ++s) {
      const double cnt = tot[s * 4 + 3];
      a.seq_scale[s] = cnt > 0 ? static_cast<float>(inv / cnt) : 0.f;
    }
  } else {
    const float scale = pv_global_scale(sums, a.reduction, a.normalizer);
    pg = sums[kSumPg] * scale;
    kl = sums[kSumKl] * scale;
    vf = sums[kSumVf] * scale;
    a.seq_scale[0] = scale;
  }
  *a.loss = pv_write_stats(sums, pg, kl, vf, a.params, a.stats);
}

void cpu_backward(PvBackwardArgs& a) {
  const float g = *a.grad_loss;
  at::parallel_for(0, a.num_tokens, kTokensPerChunk, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t s = a.per_seq ? (a.seq_ids ? a.seq_ids[i] : i / a.row_len) : 0;
      // Masked tokens (u = 0) may carry any id: never index seq_scale with one out of range.
      const float w = s >= 0 && s < a.num_seqs ? g * a.seq_scale[s] : 0.f;
      a.grad_logp[i] = a.u_logp[i] * w;
      if (a.grad_values) a.grad_values[i] = a.u_values[i] * w;
    }
  });
}

const PvKernels kCpu{cpu_forward, cpu_backward, host_value_check};

}  // namespace

TORCH_LIBRARY_IMPL(dlmkern, CPU, m) {
  m.impl("policy_value_loss", &PvOps<kCpu>::forward);
  m.impl("policy_value_loss_backward", &PvOps<kCpu>::backward);
}

}  // namespace dlmkern
