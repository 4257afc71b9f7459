// The ops of a map composed with the contraction (simplex_ops.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <utility>
#include <vector>

namespace simplex_param {

// simplex_weighted_sum through the dispatcher (autograd and every backend).
at::Tensor call_simplex_weighted_sum(
    const at::Tensor& logits, at::TensorList inputs, c10::string_view map, double temperature,
    c10::optional<double> alpha);

// grouped_simplex_weighted_sum through the dispatcher.
std::vector<at::Tensor> call_grouped_simplex_weighted_sum(
    const at::Tensor& logits, at::TensorList inputs, c10::string_view map, double temperature,
    c10::optional<double> alpha);

// The forward of simplex_weighted_sum: the checks, then the weights
// w = map(logits / temperature) in the accumulation dtype of the inputs, and
// the contraction of the inputs with them. Returns (w, out).
std::pair<at::Tensor, at::Tensor> mapped_weighted_sum(
    const at::Tensor& logits, at::TensorList inputs, c10::string_view map, double temperature,
    c10::optional<double> alpha);

} // namespace simplex_param
