// Per-token terms of the fused policy-value loss (SPEC 2.4), shared by the CPU and CUDA kernels.
//
//   ratio = exp(clamp(logp - old_logp, -20, 20))
//   pg    = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A); with dual clip c and
//           A < 0: pg = min(pg, -c * A)
//   kl    = exp(x) - x - 1, x = clamp(ref_logp - logp, -20, 20)               (k3 estimator)
//   vf    = 0.5 * max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2)
//           (0.5 * (V - R)^2 when no V_old is given)
// The token's loss is pg + kl_coef * kl + vf_coef * vf; the kernels also return its derivatives
// with respect to logp and V before the reduction weight is applied.
#pragma once

#include <cmath>

#include "dlmkern/common.h"

namespace dlmkern {

constexpr float kLogRatioClamp = 20.f;  // exp(20) ~ 4.8e8: large but finite

struct PvParams {
  float eps_low, eps_high;
  float dual_clip;  // <= 0: off
  float kl_coef, vf_coef, vf_clip;
  bool has_ref, has_values, has_old_values;
};

struct PvTerms {
  float pg, kl, vf;          // per-token loss terms
  float d_logp, d_values;    // d(pg + kl_coef * kl + vf_coef * vf) / d(logp), / d(V)
  float ratio;
  float half_sq_log_ratio;   // 0.5 * (logp - old_logp)^2, the approx-KL statistic
  bool clip_low, clip_high;  // the clipped branch of the surrogate is active (ratio too low/high)
  bool dual_clipped, vf_clipped;
};

DLMKERN_HD float clampf(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }

DLMKERN_HD PvTerms pv_token_terms(float logp, float old_logp, float adv, float ref_logp,
                                  float value, float old_value, float ret, const PvParams& p) {
  PvTerms t{};
  const float diff = logp - old_logp;
  const float d = clampf(diff, -kLogRatioClamp, kLogRatioClamp);
  const bool d_inside = diff > -kLogRatioClamp && diff < kLogRatioClamp;
  const float ratio = expf(d);
  t.ratio = ratio;
  t.half_sq_log_ratio = 0.5f * diff * diff;

  const float lo = 1.f - p.eps_low, hi = 1.f + p.eps_high;
  const float s1 = ratio * adv;
  const float s2 = clampf(ratio, lo, hi) * adv;
  // min(s1, s2): the clipped branch wins only when the ratio is outside [lo, hi] on the side
  // the advantage's sign makes harmful; its gradient is then 0.
  const bool clipped = s2 < s1;
  t.clip_low = clipped && ratio < lo;
  t.clip_high = clipped && ratio > hi;
  float pg = -(clipped ? s2 : s1);
  float d_pg = clipped ? 0.f : (d_inside ? -adv * ratio : 0.f);
  if (p.dual_clip > 0.f && adv < 0.f) {
    const float bound = -p.dual_clip * adv;
    if (bound < pg) {
      pg = bound;
      d_pg = 0.f;
      t.dual_clipped = true;
    }
  }
  t.pg = pg;
  t.d_logp = d_pg;

  if (p.has_ref) {
    const float xr = ref_logp - logp;
    const float x = clampf(xr, -kLogRatioClamp, kLogRatioClamp);
    const float ex = expf(x);
    t.kl = ex - x - 1.f;
    const bool x_inside = xr > -kLogRatioClamp && xr < kLogRatioClamp;
    t.d_logp += p.kl_coef * (x_inside ? (1.f - ex) : 0.f);  // d kl / d logp = -(e^x - 1)
  }

  if (p.has_values) {
    const float e1 = value - ret;
    float vf = 0.5f * e1 * e1, d_v = e1;
    if (p.has_old_values) {
      const float dv = value - old_value;
      const float vclip = old_value + clampf(dv, -p.vf_clip, p.vf_clip);
      const float e2 = vclip - ret;
      if (e2 * e2 > e1 * e1) {
        vf = 0.5f * e2 * e2;
        d_v = (dv > -p.vf_clip && dv < p.vf_clip) ? e2 : 0.f;
        t.vf_clipped = true;
      }
    }
    t.vf = vf;
    t.d_values = p.vf_coef * d_v;
  }
  return t;
}

// Indices of the statistics vector the kernels accumulate (sums over masked tokens, except
// kMaxRatio which is a max).
enum PvStat : int {
  kSumPg = 0, kSumKl, kSumVf, kCount, kClipLow, kClipHigh, kSumRatio, kMaxRatio, kSumHalfSq,
  kVfClipped, kDualClipped, kNumPvStats
};

}  // namespace dlmkern

namespace dlmkern {

enum PvReduction : int { kTokenMean = 0, kSeqMean = 1, kSum = 2 };

// Order of the statistics vector returned to Python (python/dlmkern/ops/policy_value_loss.py).
enum PvOutStat : int {
  kOutPgLoss = 0, kOutKl, kOutVfLoss, kOutClipFrac, kOutClipFracLow, kOutClipFracHigh,
  kOutApproxKl, kOutRatioMean, kOutRatioMax, kOutVfClipFrac, kOutDualClipFrac, kOutNumTokens,
  kNumPvOutStats
};

// Reduced loss terms (pg, kl, vf), already divided by their normalizer, -> loss and stats.
// `sums` are the kNumPvStats token sums; returns the loss.
DLMKERN_HD float pv_write_stats(const float* sums, float pg, float kl, float vf,
                                const PvParams& p, float* stats) {
  const float count = sums[kCount];
  const float denom = count > 0.f ? count : 1.f;
  stats[kOutPgLoss] = pg;
  stats[kOutKl] = kl;
  stats[kOutVfLoss] = vf;
  stats[kOutClipFracLow] = sums[kClipLow] / denom;
  stats[kOutClipFracHigh] = sums[kClipHigh] / denom;
  stats[kOutClipFrac] = (sums[kClipLow] + sums[kClipHigh]) / denom;
  stats[kOutApproxKl] = sums[kSumHalfSq] / denom;
  stats[kOutRatioMean] = sums[kSumRatio] / denom;
  stats[kOutRatioMax] = count > 0.f ? sums[kMaxRatio] : 0.f;
  stats[kOutVfClipFrac] = sums[kVfClipped] / denom;
  stats[kOutDualClipFrac] = sums[kDualClipped] / denom;
  stats[kOutNumTokens] = count;
  return pg + (p.has_ref ? p.kl_coef * kl : 0.f) + (p.has_values ? p.vf_coef * vf : 0.f);
}

// max that propagates NaN (like torch.max), so a NaN ratio shows up in ratio_max instead of being
// dropped as fmaxf / a > b ? a : b would.
DLMKERN_HD float pv_nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

// Adds a token's contribution to the running sums (masked tokens only).
DLMKERN_HD void pv_accumulate(float* acc, const PvTerms& t) {
  acc[kSumPg] += t.pg;
  acc[kSumKl] += t.kl;
  acc[kSumVf] += t.vf;
  acc[kCount] += 1.f;
  acc[kClipLow] += t.clip_low ? 1.f : 0.f;
  acc[kClipHigh] += t.clip_high ? 1.f : 0.f;
  acc[kSumRatio] += t.ratio;
  acc[kMaxRatio] = pv_nan_max(acc[kMaxRatio], t.ratio);
  acc[kSumHalfSq] += t.half_sq_log_ratio;
  acc[kVfClipped] += t.vf_clipped ? 1.f : 0.f;
  acc[kDualClipped] += t.dual_clipped ? 1.f : 0.f;
}

DLMKERN_HD void pv_combine(float* acc, const float* other) {
  for (int k = 0; k < kNumPvStats; ++k) {
    acc[k] = k == kMaxRatio ? pv_nan_max(acc[k], other[k]) : acc[k] + other[k];
  }
}

DLMKERN_HD void pv_zero(float* acc) {
  for (int k = 0; k < kNumPvStats; ++k) acc[k] = 0.f;
}

}  // namespace dlmkern

namespace dlmkern {

// token_mean / sum: the reduced (pg, kl, vf) and the gradient scale shared by every token.
DLMKERN_HD float pv_global_scale(const float* sums, int reduction, float normalizer) {
  if (reduction == kSum) return 1.f / normalizer;
  return sums[kCount] > 0.f ? 1.f / sums[kCount] : 0.f;
}

}  // namespace dlmkern
