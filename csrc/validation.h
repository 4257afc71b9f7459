// Argument checks shared by every backend. The messages are word for word
// those of simplex_param/ops.py (`_check_args`), so the compiled path and
// the pure-PyTorch fallback raise the same exception types and texts.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/List.h>
#include <c10/util/ArrayRef.h>

#include <string>
#include <vector>

namespace simplex_param {

// Checks `weights` (named `weights_name`) against the K `inputs`.
void check_args(
    const at::Tensor& weights,
    at::TensorList inputs,
    const char* weights_name);

void check_temperature(double temperature);

// Checks the arguments of a backward op that are not checked by check_args.
void check_backward_args(
    const at::Tensor& grad,
    const at::Tensor& weights,
    at::TensorList inputs,
    bool weights_requires_grad,
    const c10::List<bool>& inputs_requires_grad);

// The same K tensors, all sharing one non-overlapping, dense layout so that
// kernels can walk them as flat arrays: the tensors themselves when they
// already do, else contiguous copies.
std::vector<at::Tensor> dense_operands(at::TensorList tensors);

// Accumulation dtype: float64 for float64 inputs, float32 otherwise.
inline at::ScalarType acc_type(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

} // namespace simplex_param
