// Raw-pointer arguments of the policy-value loss kernels (shared by the CPU and CUDA backends).
#pragma once

#include <cstdint>

#include "dlmkern/policy_value_loss.h"

namespace dlmkern {

struct PvForwardArgs {
  // Token tensors, [T] fp32 (optional ones may be null) and mask [T] bool.
  const float *logp, *old_logp, *adv, *ref_logp, *values, *old_values, *returns;
  const float *weights, *log_ratio;  // objective inputs (null: weight 1, logp - old_logp)
  const bool* mask;
  const int64_t* seq_ids;  // null: token i belongs to sequence i / row_len
  int64_t num_tokens, row_len, num_seqs;
  PvParams params;
  int reduction;
  float normalizer;
  // Outputs: loss [1], stats [kNumPvOutStats], unscaled gradients [T] (u_values may be null),
  // per-sequence gradient scale [num_seqs] (seq_mean) or [1].
  float *loss, *stats, *u_logp, *u_values, *seq_scale;
  // Zero-initialized workspace of pv_workspace_floats(num_seqs) floats.
  float* workspace;
  void* stream;
};

struct PvBackwardArgs {
  const float* grad_loss;  // device scalar
  const float *u_logp, *u_values;
  const int64_t* seq_ids;
  int64_t num_tokens, row_len, num_seqs;  // num_seqs: entries of seq_scale
  bool per_seq;
  const float* seq_scale;
  float *grad_logp, *grad_values;
  void* stream;
};

// Token i's terms (both backends' one call of pv_token_terms).
DLMKERN_HD PvTerms pv_terms_at(const PvForwardArgs& a, int64_t i) {
  const float lp = a.logp[i], olp = a.old_logp[i];
  return pv_token_terms(lp, olp, a.log_ratio ? a.log_ratio[i] : lp - olp, a.adv[i],
                        a.ref_logp ? a.ref_logp[i] : 0.f, a.values ? a.values[i] : 0.f,
                        a.old_values ? a.old_values[i] : 0.f, a.returns ? a.returns[i] : 0.f,
                        a.weights ? a.weights[i] : 1.f, a.params);
}

// Per-sequence sums (pg, kl, vf, count) for seq_mean, then a block counter and a bad-id flag.
inline int64_t pv_workspace_floats(int64_t num_seqs) { return 4 * num_seqs + 2; }

}  // namespace dlmkern
