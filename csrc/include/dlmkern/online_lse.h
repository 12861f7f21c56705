// Online log-sum-exp with entropy, shared by the CPU and CUDA log-prob kernels.
//
// For scaled logits z_j (z = logits / temperature) a running state keeps
//   m = max_j z_j,   s = sum_j exp(z_j - m),   t = sum_j exp(z_j - m) * z_j
// so that lse = m + log(s), E_p[z] = t / s and entropy = lse - E_p[z].
// States over disjoint column sets merge exactly, which is what lets us stream the vocabulary
// in chunks (and split it across threads / CTAs) without ever holding a full [N, V] row block.
#pragma once

#include <cmath>

#include "dlmkern/common.h"

namespace dlmkern {

struct LseState {
  float m;  // running max of z
  float s;  // sum exp(z - m)
  float t;  // sum exp(z - m) * z
};

DLMKERN_HD LseState lse_empty() { return LseState{-INFINITY, 0.f, 0.f}; }

DLMKERN_HD void lse_push(LseState& st, float z) {
  if (z > st.m) {
    // Rescale what we have to the new max; exp(-inf) = 0 covers the empty state.
    const float c = expf(st.m - z);
    st.s = st.s * c + 1.f;
    st.t = st.t * c + z;
    st.m = z;
  } else {
    const float e = expf(z - st.m);
    st.s += e;
    st.t += e * z;
  }
}

DLMKERN_HD LseState lse_merge(const LseState& a, const LseState& b) {
  if (a.s == 0.f) return b;
  if (b.s == 0.f) return a;
  const float m = a.m > b.m ? a.m : b.m;
  const float ca = expf(a.m - m);
  const float cb = expf(b.m - m);
  return LseState{m, a.s * ca + b.s * cb, a.t * ca + b.t * cb};
}

DLMKERN_HD float lse_value(const LseState& st) { return st.m + logf(st.s); }

// Entropy of softmax(z): lse - E_p[z].
DLMKERN_HD float lse_entropy(const LseState& st) { return lse_value(st) - st.t / st.s; }

// d/dz_j of (g_logp * log p_y + g_ent * H) where p = softmax(z), E = E_p[z]:
//   g_logp * ([j == y] - p_j) - g_ent * p_j * (z_j - E)
// The caller multiplies by 1 / temperature to get the gradient with respect to the raw logits.
DLMKERN_HD float logprob_entropy_grad(float z, float lse, float mean_z, bool is_target,
                                      float g_logp, float g_ent) {
  const float p = expf(z - lse);
  return g_logp * ((is_target ? 1.f : 0.f) - p) - g_ent * p * (z - mean_z);
}

}  // namespace dlmkern
