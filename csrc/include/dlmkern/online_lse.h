// Online log-sum-exp with entropy, shared by the CPU and CUDA log-prob kernels.
//
// For scaled logits z_j (z = logits / temperature) a running state keeps
//   m = max_j z_j,   s = sum_j exp(z_j - m),   t = sum_j exp(z_j - m) * (z_j - m)
// so that lse = m + log(s), E_p[z] = m + t / s and entropy = lse - E_p[z] = log(s) - t / s.
// Keeping t relative to the running max avoids the cancellation of lse - E_p[z] when |z| is large
// (fp32 logits of ~1e3 would otherwise lose ~1e-4 of entropy).
// States over disjoint column sets merge exactly, which is what lets us stream the vocabulary
// in chunks (and split it across threads / CTAs) without ever holding a full [N, V] row block.
#pragma once

#include <cmath>
#include <cstdint>

#include "dlmkern/common.h"

namespace dlmkern {

struct LseState {
  float m;  // running max of z
  float s;  // sum exp(z - m)
  float t;  // sum exp(z - m) * (z - m)
};

DLMKERN_HD LseState lse_empty() { return LseState{-INFINITY, 0.f, 0.f}; }

// NaN policy: a NaN or +inf logit makes the row's state NaN (s = NaN), so lse, log p and entropy
// are NaN as with torch.log_softmax; -inf logits are skipped (probability 0).
DLMKERN_HD void lse_push(LseState& st, float z) {
  // A -inf logit (a masked-out token) has probability 0 and adds nothing; pushing it through the
  // arithmetic below would give exp(-inf - -inf) = NaN on an empty state and 0 * -inf = NaN in t.
  if (z == -INFINITY) return;
  if (z > st.m) {
    // Rescale what we have to the new max: e_j -> e_j c, (z_j - m) -> (z_j - m) + (m - z).
    // The new column itself adds e = 1 with z - m = 0. The empty state (s = 0) restarts.
    // A +inf logit makes the row NaN, as torch.log_softmax does (its exp(inf - inf) is NaN).
    // A NaN logit reaches the else branch below, where exp(NaN - m) makes s NaN.
    const float c = expf(st.m - z);
    st.t = st.s > 0.f ? c * (st.t + st.s * (st.m - z)) : 0.f;
    st.s = z == INFINITY ? NAN : st.s * c + 1.f;
    st.m = z;
  } else {
    const float e = expf(z - st.m);
    st.s += e;
    st.t += e * (z - st.m);
  }
}

DLMKERN_HD LseState lse_merge(const LseState& a, const LseState& b) {
  if (a.s == 0.f) return b;
  if (b.s == 0.f) return a;
  const float m = a.m > b.m ? a.m : b.m;
  const float ca = expf(a.m - m);
  const float cb = expf(b.m - m);
  return LseState{m, a.s * ca + b.s * cb,
                  ca * (a.t + a.s * (a.m - m)) + cb * (b.t + b.s * (b.m - m))};
}

DLMKERN_HD float lse_value(const LseState& st) { return st.m + logf(st.s); }

// Entropy of softmax(z): lse - E_p[z].
DLMKERN_HD float lse_entropy(const LseState& st) { return logf(st.s) - st.t / st.s; }

// Whether a row's logit gradient is exactly 0 without reading its logits: an ignored row (the
// drivers pass target -1 for ignore_index: such rows never contribute, even with NaN logits), or
// zero upstream gradients on a row with a finite lse. A NaN row (NaN lse) with a zero upstream
// gradient still gets NaN, as from torch's autograd (0 * NaN).
DLMKERN_HD bool logprob_grad_is_zero(int64_t target, float lse, float g_logp, float g_ent) {
  return target < 0 || (g_logp == 0.f && g_ent == 0.f && fabsf(lse) < INFINITY);
}

// d/dz_j of (g_logp * log p_y + g_ent * H) where p = softmax(z), E = E_p[z]:
//   g_logp * ([j == y] - p_j) - g_ent * p_j * (z_j - E)
// A column with p_j = 0 (z_j = -inf, or underflow) contributes no entropy gradient; the guard keeps
// 0 * (-inf) from turning into NaN. The caller multiplies by 1 / temperature to get the gradient with respect to the raw logits.
DLMKERN_HD float logprob_entropy_grad(float z, float lse, float mean_z, bool is_target,
                                      float g_logp, float g_ent) {
  const float p = expf(z - lse);
  const float ent = p > 0.f ? g_ent * p * (z - mean_z) : 0.f;
  return g_logp * ((is_target ? 1.f : 0.f) - p) - ent;
}

}  // namespace dlmkern
