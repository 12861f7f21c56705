// Per-token terms of the fused policy-value loss (SPEC 2.4 / 4.9), shared by the CPU and CUDA
// kernels. The objective (python/dlmkern/ops/objective.py) arrives as PvParams plus two optional
// per-token inputs: the log-ratio of the token's ratio group and the token's weight.
//
//   lr    = the group's log-ratio (sequence / block ratio, computed before the kernel), or
//           logp - old_logp (token ratio)
//   ratio = exp(clamp(lr, -20, 20)); its derivative in logp is ratio (GSPO-token's for a group)
//   pg    = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A); with dual clip c and
//           A < 0: pg = min(pg, -c * A).  Without a ratio (has_ratio false): pg = -A * logp
//   kl    = with x = ref_logp - logp: k3 exp(xc) - xc - 1 (xc = clamp(x, -20, 20), constant
//           outside); k1 -x; quadratic 0.5 x^2
//   pg, kl times the token's weight (1 when none is given)
//   vf    = 0.5 * max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2)
//           (0.5 * (V - R)^2 when no V_old is given)
// The token's loss is pg + kl_coef * kl + vf_coef * vf; the kernels also return its derivatives
// with respect to logp and V before the reduction weight is applied.
// A new KL kind or ratio rule is a case here plus its entry in objective.FUSED (Python).
#pragma once

#include <cmath>

#include "dlmkern/common.h"

namespace dlmkern {

constexpr float kLogRatioClamp = 20.f;  // exp(20) ~ 4.8e8: large but finite

// KL kinds: the codes python/dlmkern/ops/policy_value_loss.py passes (KL_CODES).
enum PvKlKind : int { kKlK1 = 0, kKlK3 = 1, kKlQuadratic = 2 };

struct PvParams {
  float eps_low, eps_high;
  float dual_clip;  // <= 0: off
  float kl_coef, vf_coef, vf_clip;
  bool has_ref, has_values, has_old_values;
  int kl_kind;     // PvKlKind
  bool has_ratio;  // false: a weighted likelihood, pg = -A * logp (ratio_level none)
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

// The KL term of kind p.kl_kind at x = ref_logp - logp, and its derivative in logp.
DLMKERN_HD void pv_kl(float x_raw, const PvParams& p, float* kl, float* d_logp) {
  if (p.kl_kind == kKlK1) {
    *kl = -x_raw;
    *d_logp = 1.f;
  } else if (p.kl_kind == kKlQuadratic) {
    *kl = 0.5f * x_raw * x_raw;
    *d_logp = -x_raw;
  } else {
    const float x = clampf(x_raw, -kLogRatioClamp, kLogRatioClamp);
    const float ex = expf(x);
    *kl = ex - x - 1.f;
    const bool inside = x_raw > -kLogRatioClamp && x_raw < kLogRatioClamp;
    *d_logp = inside ? (1.f - ex) : 0.f;  // d kl / d logp = -(e^x - 1)
  }
}

// `log_ratio`: the ratio's log (the group's, or logp - old_logp); `weight`: the token's (1: none).
DLMKERN_HD PvTerms pv_token_terms(float logp, float old_logp, float log_ratio, float adv,
                                  float ref_logp, float value, float old_value, float ret,
                                  float weight, const PvParams& p) {
  PvTerms t{};
  const float diff = logp - old_logp;
  const float d = clampf(log_ratio, -kLogRatioClamp, kLogRatioClamp);
  const bool d_inside = log_ratio > -kLogRatioClamp && log_ratio < kLogRatioClamp;
  const float ratio = expf(d);
  t.ratio = ratio;
  t.half_sq_log_ratio = 0.5f * diff * diff;

  float pg, d_pg;
  if (p.has_ratio) {
    const float lo = 1.f - p.eps_low, hi = 1.f + p.eps_high;
    const float s1 = ratio * adv;
    const float s2 = clampf(ratio, lo, hi) * adv;
    // min(s1, s2): the clipped branch wins only when the ratio is outside [lo, hi] on the side
    // the advantage's sign makes harmful; its gradient is then 0.
    const bool clipped = s2 < s1;
    t.clip_low = clipped && ratio < lo;
    t.clip_high = clipped && ratio > hi;
    pg = -(clipped ? s2 : s1);
    d_pg = clipped ? 0.f : (d_inside ? -adv * ratio : 0.f);
    if (p.dual_clip > 0.f && adv < 0.f) {
      const float bound = -p.dual_clip * adv;
      if (bound < pg) {
        pg = bound;
        d_pg = 0.f;
        t.dual_clipped = true;
      }
    }
  } else {
    pg = -adv * logp;
    d_pg = -adv;
  }
  t.pg = weight * pg;
  t.d_logp = weight * d_pg;

  if (p.has_ref) {
    float kl, d_kl;
    pv_kl(ref_logp - logp, p, &kl, &d_kl);
    t.kl = weight * kl;
    t.d_logp += p.kl_coef * weight * d_kl;
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
