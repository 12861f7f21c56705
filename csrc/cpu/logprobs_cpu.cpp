// CPU backend of the log-prob ops: row kernels over a chunk of logits, parallel over rows, using
// the same online log-sum-exp math as the CUDA kernels (dlmkern/online_lse.h).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "dlmkern/online_lse.h"
#include "logprobs.h"

namespace dlmkern {
namespace {

constexpr int64_t kCpuRowChunk = 1024;   // rows per GEMM
constexpr int64_t kCpuVocabChunk = 4096;  // vocabulary columns per GEMM
constexpr int64_t kRowGrain = 16;         // rows per parallel task

template <typename T>
void update_rows(const at::Tensor& chunk, const at::Tensor& targets, int64_t col0, float inv_temp,
                 at::Tensor& state) {
  const int64_t rows = chunk.size(0), cols = chunk.size(1), ld = chunk.stride(0);
  const T* x = chunk.const_data_ptr<T>();
  const int64_t* tgt = targets.const_data_ptr<int64_t>();
  float* st = state.data_ptr<float>();
  const int64_t st_ld = state.stride(0);
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = x + r * ld;
      LseState acc = lse_empty();
      for (int64_t c = 0; c < cols; ++c) lse_push(acc, static_cast<float>(row[c]) * inv_temp);
      float* s = st + r * st_ld;
      const LseState merged = lse_merge(LseState{s[0], s[1], s[2]}, acc);
      s[0] = merged.m;
      s[1] = merged.s;
      s[2] = merged.t;
      const int64_t local = tgt[r] - col0;
      if (local >= 0 && local < cols) s[3] = static_cast<float>(row[local]) * inv_temp;
    }
  });
}

template <typename Tin, typename Tout>
void grad_rows(const at::Tensor& chunk, const at::Tensor& targets, int64_t col0, float inv_temp,
               const at::Tensor& lse, const at::Tensor& mean_z, const at::Tensor& g_logp,
               const at::Tensor& g_ent, at::Tensor& out) {
  const int64_t rows = chunk.size(0), cols = chunk.size(1), ld = chunk.stride(0);
  const int64_t ld_out = out.stride(0);
  const Tin* x = chunk.const_data_ptr<Tin>();
  Tout* o = out.data_ptr<Tout>();
  const int64_t* tgt = targets.const_data_ptr<int64_t>();
  const float *lp = lse.const_data_ptr<float>(), *mz = mean_z.const_data_ptr<float>();
  const float *gl = g_logp.const_data_ptr<float>(), *ge = g_ent.const_data_ptr<float>();
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const Tin* row = x + r * ld;
      Tout* orow = o + r * ld_out;
      const int64_t local = tgt[r] - col0;
      if (logprob_grad_is_zero(tgt[r], lp[r], gl[r], ge[r])) {
        for (int64_t c = 0; c < cols; ++c) orow[c] = Tout(0.f);
        continue;
      }
      for (int64_t c = 0; c < cols; ++c) {
        const float z = static_cast<float>(row[c]) * inv_temp;
        orow[c] = Tout(inv_temp * logprob_entropy_grad(z, lp[r], mz[r], c == local, gl[r], ge[r]));
      }
    }
  });
}

void cpu_update(const at::Tensor& chunk, const at::Tensor& targets, int64_t col0, double inv_temp,
                at::Tensor& state) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, chunk.scalar_type(), "update", [&] {
    update_rows<scalar_t>(chunk, targets, col0, static_cast<float>(inv_temp), state);
  });
}

void cpu_grad(const at::Tensor& chunk, const at::Tensor& targets, int64_t col0, double inv_temp,
              const at::Tensor& lse, const at::Tensor& mean_z, const at::Tensor& g_logp,
              const at::Tensor& g_ent, at::Tensor& out) {
  TORCH_CHECK(chunk.scalar_type() == out.scalar_type() || chunk.scalar_type() == at::kFloat,
              "dlmkern: internal: unsupported grad dtypes");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "grad", [&] {
    using out_t = scalar_t;
    if (chunk.scalar_type() == at::kFloat) {
      grad_rows<float, out_t>(chunk, targets, col0, static_cast<float>(inv_temp), lse, mean_z,
                              g_logp, g_ent, out);
    } else {
      grad_rows<out_t, out_t>(chunk, targets, col0, static_cast<float>(inv_temp), lse, mean_z,
                              g_logp, g_ent, out);
    }
  });
}

const RowKernels kCpu{cpu_update, cpu_grad, host_value_check, kCpuRowChunk, kCpuVocabChunk};

}  // namespace

TORCH_LIBRARY_IMPL(dlmkern, CPU, m) {
  m.impl("masked_logprobs", &LogprobOps<kCpu>::masked);
  m.impl("masked_logprobs_backward", &LogprobOps<kCpu>::masked_backward);
  m.impl("logprobs_from_logits", &LogprobOps<kCpu>::from_logits);
  m.impl("logprobs_from_logits_backward", &LogprobOps<kCpu>::from_logits_backward);
}

}  // namespace dlmkern
