// Small argument-check helpers shared by the op drivers.
#pragma once

#include <ATen/ATen.h>

namespace dlmkern {

// The floating dtypes the kernels accept.
inline bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

}  // namespace dlmkern
