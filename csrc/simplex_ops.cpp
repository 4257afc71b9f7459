// The ops that compose a map (maps.h) with the contraction:
// simplex_weighted_sum (any map), softmax_weighted_sum (the softmax) and
// grouped_simplex_weighted_sum. Their autograd is in autograd.cpp.
#include "simplex_ops.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <utility>

#include "checks.h"
#include "contraction.h"
#include "dtypes.h"
#include "maps.h"

namespace simplex_param {
namespace {

at::Tensor simplex_weighted_sum(
    const at::Tensor& logits, at::TensorList inputs, c10::string_view map, double temperature,
    c10::optional<double> alpha) {
  return mapped_weighted_sum(logits, inputs, map, temperature, alpha).second;
}

at::Tensor softmax_weighted_sum(const at::Tensor& logits, at::TensorList inputs, double temperature) {
  return call_simplex_weighted_sum(logits, inputs, "softmax", temperature, c10::nullopt);
}

// The map of the (G, K) logits in grouped_acc_type, then the grouped contraction.
std::vector<at::Tensor> grouped_simplex_weighted_sum(
    const at::Tensor& logits, at::TensorList inputs, c10::string_view map, double temperature,
    c10::optional<double> alpha) {
  check_grouped_args(logits, inputs, "logits");
  const SimplexMap& m = find_map(map);
  const MapArgs args = map_args(m, temperature, alpha);
  // The map through its closed-form vjp (never the derivative of its sort).
  return call_grouped_weighted_sum(map_with_graph(m, logits.to(grouped_acc_type(inputs)), args), inputs);
}

} // namespace

std::pair<at::Tensor, at::Tensor> mapped_weighted_sum(
    const at::Tensor& logits, at::TensorList inputs, c10::string_view map, double temperature,
    c10::optional<double> alpha) {
  check_args(logits, inputs, "logits");
  const SimplexMap& m = find_map(map);
  const MapArgs args = map_args(m, temperature, alpha);
  const at::ScalarType acc = acc_type(inputs[0].scalar_type());
  // No aten::to dispatch when the dtype already matches: below autograd,
  // opcheck's schema check flags that op for returning its own input.
  at::Tensor w = m.forward(logits.scalar_type() == acc ? logits : logits.to(acc), args);
  at::Tensor out = call_weighted_sum(w, inputs);
  return {std::move(w), std::move(out)};
}

at::Tensor call_simplex_weighted_sum(
    const at::Tensor& logits, at::TensorList inputs, c10::string_view map, double temperature,
    c10::optional<double> alpha) {
  static const auto op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("simplex_param::simplex_weighted_sum", "")
      .typed<at::Tensor(const at::Tensor&, at::TensorList, c10::string_view, double, c10::optional<double>)>();
  return op.call(logits, inputs, map, temperature, alpha);
}

std::vector<at::Tensor> call_grouped_simplex_weighted_sum(
    const at::Tensor& logits, at::TensorList inputs, c10::string_view map, double temperature,
    c10::optional<double> alpha) {
  static const auto op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("simplex_param::grouped_simplex_weighted_sum", "")
      .typed<std::vector<at::Tensor>(
          const at::Tensor&, at::TensorList, c10::string_view, double, c10::optional<double>)>();
  return op.call(logits, inputs, map, temperature, alpha);
}

// Without autograd (inference mode, or below the Autograd kernel of
// autograd.cpp), on every backend.
TORCH_LIBRARY_IMPL(simplex_param, CompositeExplicitAutograd, m) {
  m.impl("simplex_weighted_sum", &simplex_weighted_sum);
}

TORCH_LIBRARY_IMPL(simplex_param, CompositeImplicitAutograd, m) {
  m.impl("softmax_weighted_sum", &softmax_weighted_sum);
  m.impl("grouped_simplex_weighted_sum", &grouped_simplex_weighted_sum);
}

} // namespace simplex_param
