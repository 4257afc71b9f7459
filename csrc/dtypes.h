// The dtype rules, in one place: which dtypes the kernels take, and the
// dtype they accumulate in (simplex_param/checks.py and reference.py are
// their Python twins).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

namespace simplex_param {

// The dtypes of the inputs the kernels take (weights may have any floating
// dtype: they are converted first).
inline bool kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Accumulation dtype: float64 for float64 inputs, float32 otherwise.
inline at::ScalarType acc_type(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// A grouped op's map dtype: float64 when a group is float64, else float32.
inline at::ScalarType grouped_acc_type(at::TensorList inputs) {
  for (const at::Tensor& x : inputs) {
    if (x.scalar_type() == at::kDouble) return at::kDouble;
  }
  return at::kFloat;
}

} // namespace simplex_param
