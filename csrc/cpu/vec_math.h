// Vectorizable CPU helpers for the attention kernels' softmax. std::exp is a library call GCC will
// not vectorize without -ffast-math (which would also break the -inf masking), so exp is computed
// here as 2^n * p(f) with branch-free code the compiler turns into SIMD. Each hot loop is compiled
// for AVX2 and for the baseline ISA; the loader picks one at run time (GCC target_clones).
#pragma once

#include <cstdint>

#include "dlmkern/block_mask.h"

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define DLMKERN_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define DLMKERN_CPU_CLONES
#endif

namespace dlmkern::cpu {

constexpr float kExpLowest = -87.0f;  // below this e^x is flushed to 0 (also -inf: masked)

// e^x with relative error ~3e-7 on [-87, 88]; exactly 0 for x < -87 (including -inf); NaN for NaN.
__attribute__((always_inline)) inline float fast_exp(float x) {
  float xc = x < kExpLowest ? kExpLowest : x;  // maxss / minss, no libm call (NaN stays NaN)
  xc = xc > 88.0f ? 88.0f : xc;
  const float t = xc * 1.44269504088896341f;  // x * log2(e)
  const float tr = t + 12582912.0f;           // round to nearest (1.5 * 2^23 trick): n sits in
  const float n = tr - 12582912.0f;           // the low mantissa bits of tr
  // r = x - n ln2 in two steps (Cody-Waite), so r keeps full precision for large |x|
  const float r = (xc - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  // e^r on |r| <= 0.347 by its degree-7 Taylor polynomial (truncation error < 1e-8)
  float p = 1.984126984e-4f;
  p = p * r + 1.388888889e-3f;
  p = p * r + 8.333333333e-3f;
  p = p * r + 4.166666667e-2f;
  p = p * r + 1.666666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  // 2^n from tr's bits: unsigned integer arithmetic, defined even for NaN (where p is NaN anyway,
  // unlike a float -> int conversion of NaN).
  const uint32_t bits = (__builtin_bit_cast(uint32_t, tr) - 0x4B400000u + 127u) << 23;
  const float e = p * __builtin_bit_cast(float, bits);
  return x < kExpLowest ? 0.0f : e;  // a select, computed for every lane
}

// row[j] *= scale; returns max_j row[j], NaN if any row[j] is NaN (dlmkern/softmax_nan.h).
DLMKERN_CPU_CLONES inline float scale_and_max(float* __restrict row, int64_t n, float scale) {
  float mx = -__builtin_inff();
  int nan = 0;  // a separate flag: the simd max reduction would drop NaN lanes
#pragma omp simd reduction(max : mx) reduction(| : nan)
  for (int64_t j = 0; j < n; ++j) {
    const float x = row[j] * scale;
    row[j] = x;
    mx = x > mx ? x : mx;
    nan |= x != x;
  }
  return nan ? __builtin_nanf("") : mx;
}

// row[j] = e^(row[j] - shift); returns the sum.
DLMKERN_CPU_CLONES inline float exp_shift_sum(float* __restrict row, int64_t n, float shift) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const float e = fast_exp(row[j] - shift);
    row[j] = e;
    sum += e;
  }
  return sum;
}

// p[j] = e^(p[j] * scale - lse); dp[j] = p[j] * (dp[j] - delta) * scale  (attention backward),
// for a run whose keys are all visible to the query.
DLMKERN_CPU_CLONES inline void softmax_grad_row(float* __restrict p, float* __restrict dp,
                                                int64_t n, float scale, float lse, float delta) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float e = fast_exp(p[j] * scale - lse);
    p[j] = e;
    dp[j] = e * (dp[j] - delta) * scale;
  }
}

// The same with the SPEC 2.1 rule applied in the same pass: keys the query (q_block, q_stream)
// does not see give exactly 0 for both, also when the row's lse / delta is NaN, so a NaN row does
// not spread NaN to the dk / dv of keys it does not see. (A visible key whose score is -inf still
// gets e^(-inf - NaN) = NaN in a NaN row, as from torch's autograd.)
DLMKERN_CPU_CLONES inline void softmax_grad_row_masked(
    float* __restrict p, float* __restrict dp, int64_t n, float scale, float lse, float delta,
    int32_t q_block, int32_t q_stream, const int32_t* __restrict k_block,
    const int32_t* __restrict k_stream) {
  const bool q_clean = q_stream == 0;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    // block_visible, spelled branch-free (bitwise on bools) so that GCC vectorizes the loop
    const int32_t kb = k_block[j], ks = k_stream[j];
    const bool vis = ((ks == 0) & ((kb < q_block) | (q_clean & (kb == q_block)))) |
                     ((ks != 0) & (ks == q_stream) & (kb == q_block));
    const float e = fast_exp(p[j] * scale - lse);
    const float g = e * (dp[j] - delta) * scale;
    p[j] = vis ? e : 0.f;
    dp[j] = vis ? g : 0.f;
  }
}

// row[j] = -inf where key j is not visible to the query (q_block, q_stream) (SPEC 2.1 rule).
DLMKERN_CPU_CLONES inline void mask_row(float* __restrict row, int64_t n, int32_t q_block,
                                        int32_t q_stream, const int32_t* __restrict k_block,
                                        const int32_t* __restrict k_stream) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const bool vis = block_visible(q_block, q_stream, k_block[j], k_stream[j]);
    row[j] = vis ? row[j] : -__builtin_inff();
  }
}

DLMKERN_CPU_CLONES inline void scale_row(float* __restrict row, int64_t n, float a) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) row[j] *= a;
}

}  // namespace dlmkern::cpu
