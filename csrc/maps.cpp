// The map registry, and the ops that compose a map with the contraction:
// simplex_weighted_sum (any map) and softmax_weighted_sum (the softmax).
//
// To add a map: write its forward and vjp below, add one line to kMaps, add
// its twin to MAPS in simplex_param/reference.py (the fallback and the test
// oracle), and add it to the map tests (tests/test_maps.py). Nothing else
// changes: the kernels know only the contraction, and autograd.cpp calls the
// map through this registry.
#include "maps.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <string>
#include <utility>

#include "checks.h"
#include "contraction.h"

namespace simplex_param {
namespace {

// softmax(z / T). The division is skipped at T = 1, where it changes nothing.
at::Tensor softmax_forward(const at::Tensor& z, double temperature) {
  return at::_softmax(temperature == 1.0 ? z : z / temperature, -1, false);
}

// dL/dz = w * (g - <w, g>) / T, in one fused op.
at::Tensor softmax_vjp(const at::Tensor& w, const at::Tensor& grad_w, double temperature) {
  const at::Tensor g = at::_softmax_backward_data(grad_w, w, -1, w.scalar_type());
  return temperature == 1.0 ? g : g / temperature;
}

// z / T, the weights as given at T = 1.
at::Tensor identity_forward(const at::Tensor& z, double temperature) {
  return temperature == 1.0 ? z : z / temperature;
}

at::Tensor identity_vjp(const at::Tensor&, const at::Tensor& grad_w, double temperature) {
  return temperature == 1.0 ? grad_w : grad_w / temperature;
}

// The number of leading entries of the descending sort `zs` (last dimension)
// where `in_support` holds: the support's size, at least 1 (a row of all
// -inf or NaN then gives NaN, as the softmax does).
at::Tensor support_size(const at::Tensor& in_support) {
  return in_support.sum(-1, /*keepdim=*/true).clamp_min(1);
}

// sparsemax(z / T) (Martins & Astudillo, 2016): the Euclidean projection of
// z / T onto the simplex, max(z / T - tau, 0), with tau from the sorted row.
at::Tensor sparsemax_forward(const at::Tensor& z, double temperature) {
  const at::Tensor x = temperature == 1.0 ? z : z / temperature;
  const at::Tensor xs = std::get<0>(x.sort(-1, /*descending=*/true));
  const at::Tensor k = at::arange(1, x.size(-1) + 1, x.options());
  const at::Tensor cumsum = xs.cumsum(-1);
  const at::Tensor size = support_size(1 + k * xs > cumsum);
  const at::Tensor tau = (cumsum.gather(-1, size - 1) - 1) / size.to(x.scalar_type());
  return (x - tau).clamp_min(0);
}

// On the support S: g - mean over S of g; 0 off it. Divided by T.
at::Tensor sparsemax_vjp(const at::Tensor& w, const at::Tensor& grad_w, double temperature) {
  const at::Tensor s = (w > 0).to(grad_w.scalar_type());
  const at::Tensor mean = (grad_w * s).sum(-1, true) / s.sum(-1, true);
  const at::Tensor g = s * (grad_w - mean);
  return temperature == 1.0 ? g : g / temperature;
}

// 1.5-entmax(z / T) (Peters, Niculae & Martins, 2019): max(x / 2 - tau, 0)^2
// with tau such that the row sums to 1, exactly, from the sorted row (the
// algorithm of the entmax package).
at::Tensor entmax15_forward(const at::Tensor& z, double temperature) {
  at::Tensor x = (temperature == 1.0 ? z : z / temperature) / 2;
  x = x - std::get<0>(x.max(-1, /*keepdim=*/true));
  const at::Tensor xs = std::get<0>(x.sort(-1, /*descending=*/true));
  const at::Tensor rho = at::arange(1, x.size(-1) + 1, x.options());
  const at::Tensor mean = xs.cumsum(-1) / rho;
  const at::Tensor mean_sq = (xs * xs).cumsum(-1) / rho;
  const at::Tensor delta = (1 - rho * (mean_sq - mean * mean)) / rho;
  const at::Tensor tau = mean - delta.clamp_min(0).sqrt();
  const at::Tensor size = support_size(tau <= xs);
  const at::Tensor y = (x - tau.gather(-1, size - 1)).clamp_min(0);
  return y * y;
}

// With r = sqrt(w) (the support's x / 2 - tau): r * g - r * <r, g> / sum(r).
// sqrt is taken on the support only, so that the product stays differentiable
// at the zeros (double backward).
at::Tensor entmax15_vjp(const at::Tensor& w, const at::Tensor& grad_w, double temperature) {
  const at::Tensor on = w > 0;
  const at::Tensor r = at::where(on, at::where(on, w, at::ones_like(w)).sqrt(), at::zeros_like(w));
  const at::Tensor rg = r * grad_w;
  const at::Tensor g = rg - r * (rg.sum(-1, true) / r.sum(-1, true));
  return temperature == 1.0 ? g : g / temperature;
}

constexpr SimplexMap kMaps[] = {
    {"softmax", softmax_forward, softmax_vjp, true},
    {"identity", identity_forward, identity_vjp, false},
    {"sparsemax", sparsemax_forward, sparsemax_vjp, true},
    {"entmax15", entmax15_forward, entmax15_vjp, true},
};

std::string map_names() {
  std::string names;
  for (const SimplexMap& m : kMaps) names += (names.empty() ? "'" : ", '") + std::string(m.name) + "'";
  return names;
}

at::Tensor simplex_weighted_sum(
    const at::Tensor& logits, at::TensorList inputs, c10::string_view map, double temperature) {
  return mapped_weighted_sum(logits, inputs, map, temperature).second;
}

at::Tensor softmax_weighted_sum(const at::Tensor& logits, at::TensorList inputs, double temperature) {
  return call_simplex_weighted_sum(logits, inputs, "softmax", temperature);
}

// The map of the (G, K) logits, then the grouped contraction. The map is
// taken in float64 when a group is float64, else in float32.
std::vector<at::Tensor> grouped_simplex_weighted_sum(
    const at::Tensor& logits, at::TensorList inputs, c10::string_view map, double temperature) {
  check_grouped_args(logits, inputs, "logits");
  const SimplexMap& m = find_map(map);
  check_temperature(temperature);
  at::ScalarType acc = at::kFloat;
  for (const at::Tensor& x : inputs) {
    if (x.scalar_type() == at::kDouble) acc = at::kDouble;
  }
  return call_grouped_weighted_sum(m.forward(logits.to(acc), temperature), inputs);
}

} // namespace

const SimplexMap& find_map(c10::string_view name) {
  for (const SimplexMap& m : kMaps) {
    if (name == m.name) return m;
  }
  fail_unknown_map(name, map_names());
}

std::pair<at::Tensor, at::Tensor> mapped_weighted_sum(
    const at::Tensor& logits, at::TensorList inputs, c10::string_view map, double temperature) {
  check_args(logits, inputs, "logits");
  const SimplexMap& m = find_map(map);
  check_temperature(temperature);
  const at::ScalarType acc = acc_type(inputs[0].scalar_type());
  // No aten::to dispatch when the dtype already matches: below autograd,
  // opcheck's schema check flags that op for returning its own input.
  at::Tensor w = m.forward(logits.scalar_type() == acc ? logits : logits.to(acc), temperature);
  at::Tensor out = call_weighted_sum(w, inputs);
  return {std::move(w), std::move(out)};
}

at::Tensor call_simplex_weighted_sum(
    const at::Tensor& logits, at::TensorList inputs, c10::string_view map, double temperature) {
  static const auto op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("simplex_param::simplex_weighted_sum", "")
      .typed<at::Tensor(const at::Tensor&, at::TensorList, c10::string_view, double)>();
  return op.call(logits, inputs, map, temperature);
}

std::vector<at::Tensor> call_grouped_simplex_weighted_sum(
    const at::Tensor& logits, at::TensorList inputs, c10::string_view map, double temperature) {
  static const auto op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("simplex_param::grouped_simplex_weighted_sum", "")
      .typed<std::vector<at::Tensor>(const at::Tensor&, at::TensorList, c10::string_view, double)>();
  return op.call(logits, inputs, map, temperature);
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
