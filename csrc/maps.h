// The weight maps: functions from pre-weights z to weights w, acting on the
// last dimension, in one registry (maps.cpp). Each is a forward and its
// vector-Jacobian product, both built from differentiable ATen ops, so that
// the map works on every device and its backward can itself be
// differentiated (double backward).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/string_view.h>

#include <utility>
#include <vector>

namespace simplex_param {

struct SimplexMap {
  const char* name;
  // w = map(z / temperature) over the last dimension, in z's dtype.
  at::Tensor (*forward)(const at::Tensor& z, double temperature);
  // The gradient of z, given w = forward(z, temperature) and the gradient of w.
  at::Tensor (*vjp)(const at::Tensor& w, const at::Tensor& grad_w, double temperature);
  // Whether vjp ignores grad_w[k] where w[k] is 0 (the Jacobian's row is 0
  // there), so that the contraction need not read that input for it.
  bool ignores_zero_weights;
};

// The map called `name`; raises the `unknown_map` error for any other name.
const SimplexMap& find_map(c10::string_view name);

// simplex_weighted_sum through the dispatcher (autograd and every backend).
at::Tensor call_simplex_weighted_sum(
    const at::Tensor& logits, at::TensorList inputs, c10::string_view map, double temperature);

// grouped_simplex_weighted_sum through the dispatcher.
std::vector<at::Tensor> call_grouped_simplex_weighted_sum(
    const at::Tensor& logits, at::TensorList inputs, c10::string_view map, double temperature);

// The forward of simplex_weighted_sum: the checks, then the weights
// w = map(logits / temperature) in the accumulation dtype of the inputs, and
// the contraction of the inputs with them. Returns (w, out).
std::pair<at::Tensor, at::Tensor> mapped_weighted_sum(
    const at::Tensor& logits, at::TensorList inputs, c10::string_view map, double temperature);

} // namespace simplex_param
