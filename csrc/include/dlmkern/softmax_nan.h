// NaN policy of the attention kernels' online softmax, shared by the CPU and CUDA kernels.
//
// A row's running state is (m = max of the scores seen, l = sum exp(score - shift)). The rules:
// - the max propagates NaN (fmaxf would drop it), so a NaN score a row SEES makes the row NaN even
//   when it is the row's only score;
// - a row that has seen only -inf scores (nothing visible yet) shifts by 0, so exp(-inf - 0) = 0
//   and nothing is added; a +inf score gives exp(inf - inf) = NaN, as in torch.softmax;
// - at the end l == 0 (the row saw nothing) gives output 0 and lse -inf, while a NaN l gives NaN
//   output and lse (a `l > 0` test would silently turn a NaN row into zeros).
// Masked-out keys never reach these helpers: the kernels overwrite their scores with -inf first.
#pragma once

#include <cmath>

#include "dlmkern/common.h"

namespace dlmkern {

// max(a, b) that returns NaN when either is NaN.
DLMKERN_HD float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

// Shift for exp(score - shift) given the row's running max: 0 while nothing is visible.
DLMKERN_HD float softmax_shift(float m) { return m == -INFINITY ? 0.f : m; }

// Final normalization 1 / l: 0 for a row that saw nothing, NaN for a NaN row.
DLMKERN_HD float softmax_inv(float l) { return l == 0.f ? 0.f : 1.f / l; }

// Row log-sum-exp m + log(l): -inf for a row that saw nothing, NaN for a NaN row.
DLMKERN_HD float softmax_lse(float m, float l) { return l == 0.f ? -INFINITY : m + logf(l); }

}  // namespace dlmkern
