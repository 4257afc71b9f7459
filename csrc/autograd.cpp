// Autograd of the ops, in C++ as torchvision does it: a
// torch::autograd::Function per op, registered at the Autograd key. Its
// forward redispatches below autograd to the backend kernel; its backward
// calls the op's private backward op, or, when a graph of the backward is
// being built (create_graph=True: double backward, DARTS' second-order
// step), composes it from differentiable ATen ops with the same formulas.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/TensorSubclassLikeUtils.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "contraction.h"
#include "maps.h"
#include "simplex_ops.h"

namespace simplex_param {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, std::vector<at::Tensor>> weighted_sum_backward_op(
    const at::Tensor& grad, const at::Tensor& weights, at::TensorList inputs, bool need_w,
    const c10::List<bool>& need_x, bool skip_zero_weights) {
  static const auto op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("simplex_param::_weighted_sum_backward", "")
      .typed<std::tuple<at::Tensor, std::vector<at::Tensor>>(
          const at::Tensor&, const at::Tensor&, at::TensorList, bool, const c10::List<bool>&, bool)>();
  return op.call(grad, weights, inputs, need_w, need_x, skip_zero_weights);
}

std::tuple<at::Tensor, std::vector<at::Tensor>> grouped_weighted_sum_backward_op(
    at::TensorList grads, const at::Tensor& weights, at::TensorList inputs, bool need_w,
    const c10::List<bool>& need_x) {
  static const auto op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("simplex_param::_grouped_weighted_sum_backward", "")
      .typed<std::tuple<at::Tensor, std::vector<at::Tensor>>(
          at::TensorList, const at::Tensor&, at::TensorList, bool, const c10::List<bool>&)>();
  return op.call(grads, weights, inputs, need_w, need_x);
}

std::tuple<at::Tensor, std::vector<at::Tensor>> mix_backward_op(
    const at::Tensor& grad, const at::Tensor& weights, at::TensorList inputs, bool need_w,
    const c10::List<bool>& need_x) {
  static const auto op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("simplex_param::_mix_backward", "")
      .typed<std::tuple<at::Tensor, std::vector<at::Tensor>>(
          const at::Tensor&, const at::Tensor&, at::TensorList, bool, const c10::List<bool>&)>();
  return op.call(grad, weights, inputs, need_w, need_x);
}

// For (K,) weights on the CPU, where reading them costs no synchronisation:
// which are exactly 0. Empty otherwise, and for tensors without plain data
// (fake tensors while torch.compile traces, functorch wrappers).
std::vector<bool> zero_weights(const at::Tensor& weights) {
  std::vector<bool> zero;
  if (weights.dim() != 1 || !weights.device().is_cpu() || !kernel_dtype(weights.scalar_type()) ||
      at::isTensorSubclassLike(weights)) {
    return zero;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights.scalar_type(), "zero_weights", [&] {
    const scalar_t* p = weights.const_data_ptr<scalar_t>();
    for (int64_t k = 0; k < weights.size(0); ++k) zero.push_back(p[k * weights.stride(0)] == scalar_t(0));
  });
  return zero;
}

// The contraction's backward from differentiable ops, in the accumulation
// dtype: grad x_k = w[..., k] * g broadcast over the trailing dimensions,
// grad w[..., k] = sum over the trailing dimensions of g * x_k.
variable_list differentiable_backward(
    const at::Tensor& grad, const at::Tensor& weights, const std::vector<at::Tensor>& xs, bool need_w,
    const std::vector<bool>& need_x) {
  const at::ScalarType acc = acc_type(grad.scalar_type());
  const at::Tensor g = grad.to(acc);
  const at::Tensor w = weights.to(acc);
  const int64_t K = w.size(-1), row_dims = w.dim() - 1;
  std::vector<int64_t> row_shape(w.sizes().begin(), w.sizes().end() - 1);
  row_shape.resize(g.dim(), 1);  // the rows, then a 1 per trailing dimension
  std::vector<int64_t> trailing;
  for (int64_t d = row_dims; d < g.dim(); ++d) trailing.push_back(d);

  variable_list grads(1 + K);
  if (need_w) {
    std::vector<at::Tensor> dots;
    for (const at::Tensor& x : xs) {
      const at::Tensor gx = g * x.to(acc);
      dots.push_back(trailing.empty() ? gx : gx.sum(trailing));
    }
    grads[0] = at::stack(dots, -1).to(weights.scalar_type());
  }
  for (int64_t k = 0; k < K; ++k) {
    if (need_x[k]) grads[1 + k] = (w.select(-1, k).reshape(row_shape) * g).to(grad.scalar_type());
  }
  return grads;
}

// The contraction's backward through the backend kernels: (grad w, grad x_1
// ... grad x_K), undefined where not wanted. An input of (K,) CPU weight 0
// gets a zero gradient that is never written (an expanded 0-D zero).
variable_list contraction_backward(
    const at::Tensor& grad, const at::Tensor& weights, const std::vector<at::Tensor>& xs, bool need_w,
    const std::vector<bool>& need_x, bool skip_zero_weights) {
  const std::vector<bool> zero = zero_weights(weights);
  c10::List<bool> need_x_list;
  need_x_list.reserve(need_x.size());
  for (size_t k = 0; k < need_x.size(); ++k) need_x_list.push_back(need_x[k] && (zero.empty() || !zero[k]));
  variable_list grads(1 + need_x.size());
  {
    // Straight to the backend kernel: the backward op has no autograd of its own.
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [grad_w, grad_x] = weighted_sum_backward_op(grad, weights, xs, need_w, need_x_list, skip_zero_weights);
    if (need_w) grads[0] = grad_w;
    for (size_t k = 0; k < need_x.size(); ++k) {
      if (need_x_list[k]) grads[1 + k] = grad_x[k];
    }
  }
  for (size_t k = 0; k < need_x.size(); ++k) {
    if (need_x[k] && !need_x_list[k]) grads[1 + k] = at::zeros({}, grad.options()).expand(grad.sizes());
  }
  return grads;
}

class WeightedSumFunction : public torch::autograd::Function<WeightedSumFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& weights, at::TensorList inputs) {
    // The inputs are needed only for the weights' gradient.
    std::vector<at::Tensor> saved{weights};
    if (weights.requires_grad()) saved.insert(saved.end(), inputs.begin(), inputs.end());
    ctx->save_for_backward(saved);
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_weighted_sum(weights, inputs);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& weights = saved[0];
    const int64_t K = weights.size(-1);
    const bool need_w = ctx->needs_input_grad(0);
    std::vector<bool> need_x(K);
    for (int64_t k = 0; k < K; ++k) need_x[k] = ctx->needs_input_grad(1 + k);
    const std::vector<at::Tensor> xs =
        need_w ? std::vector<at::Tensor>(saved.begin() + 1, saved.end()) : std::vector<at::Tensor>{};
    const at::Tensor& grad = grad_outputs[0];
    if (at::GradMode::is_enabled()) return differentiable_backward(grad, weights, xs, need_w, need_x);
    return contraction_backward(grad, weights, xs, need_w, need_x, /*skip_zero_weights=*/false);
  }
};

// out = sum_k w[..., k] * x_k with w = map(logits / T): one node for both.
class SimplexWeightedSumFunction : public torch::autograd::Function<SimplexWeightedSumFunction> {
 public:
  static at::Tensor forward(
      AutogradContext* ctx, const at::Tensor& logits, at::TensorList inputs, c10::string_view map,
      double temperature, c10::optional<double> alpha) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [w, out] = mapped_weighted_sum(logits, inputs, map, temperature, alpha);
    // The logits, to rebuild w differentiably for double backward; the
    // inputs, only for the logits' gradient.
    std::vector<at::Tensor> saved{logits, w};
    if (logits.requires_grad()) saved.insert(saved.end(), inputs.begin(), inputs.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["map"] = std::string(map);
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["alpha"] = alpha.value_or(MapArgs{}.alpha);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& logits = saved[0];
    const SimplexMap& m = find_map(ctx->saved_data["map"].toStringRef());
    const MapArgs args{ctx->saved_data["temperature"].toDouble(), ctx->saved_data["alpha"].toDouble()};
    const int64_t K = logits.size(-1);
    const bool need_l = ctx->needs_input_grad(0);
    std::vector<bool> need_x(K);
    for (int64_t k = 0; k < K; ++k) need_x[k] = ctx->needs_input_grad(1 + k);
    const std::vector<at::Tensor> xs =
        need_l ? std::vector<at::Tensor>(saved.begin() + 2, saved.end()) : std::vector<at::Tensor>{};
    const at::Tensor& grad = grad_outputs[0];

    variable_list grads;
    at::Tensor w = saved[1];
    if (at::GradMode::is_enabled()) {
      // The same w, now with a graph: the map's closed-form vjp to any order.
      w = map_with_graph(m, logits.to(w.scalar_type()), args);
      grads = differentiable_backward(grad, w, xs, need_l, need_x);
    } else {
      grads = contraction_backward(grad, w, xs, need_l, need_x, m.ignores_zero_weights);
    }
    if (need_l) grads[0] = m.vjp(w, grads[0], args).to(logits.scalar_type());
    grads.resize(1 + K + 3);  // no gradient for map, temperature and alpha
    return grads;
  }
};

// out[..., m, ...] = sum_k w[..., m, k] * x_k, for m < M, in one node.
class MixFunction : public torch::autograd::Function<MixFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& weights, at::TensorList inputs) {
    std::vector<at::Tensor> saved{weights};
    if (weights.requires_grad()) saved.insert(saved.end(), inputs.begin(), inputs.end());
    ctx->save_for_backward(saved);
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_mix(weights, inputs);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& weights = saved[0];
    const int64_t K = weights.size(-1);
    const bool need_w = ctx->needs_input_grad(0);
    c10::List<bool> need_x;
    need_x.reserve(K);
    for (int64_t k = 0; k < K; ++k) need_x.push_back(ctx->needs_input_grad(1 + k));
    const std::vector<at::Tensor> xs =
        need_w ? std::vector<at::Tensor>(saved.begin() + 1, saved.end()) : std::vector<at::Tensor>{};
    const at::Tensor& grad = grad_outputs[0];
    if (at::GradMode::is_enabled()) return differentiable_backward(grad, weights, xs, need_w, need_x);
    variable_list grads(1 + K);
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [grad_w, grad_x] = mix_backward_op(grad, weights, xs, need_w, need_x);
    if (need_w) grads[0] = grad_w;
    for (int64_t k = 0; k < K; ++k) {
      if (need_x[k]) grads[1 + k] = grad_x[k];
    }
    return grads;
  }

 private:
  // The backward with a graph of its own (double backward): the inputs'
  // gradients are the mix of the M output gradients with the transposed
  // weights (this op again, so any order works), the weights' gradient the
  // M x K dot products, a matrix product over the trailing elements.
  static variable_list differentiable_backward(
      const at::Tensor& grad, const at::Tensor& weights, const std::vector<at::Tensor>& xs, bool need_w,
      const c10::List<bool>& need_x) {
    const int64_t K = weights.size(-1), M = weights.size(-2), row_dims = weights.dim() - 2;
    variable_list grads(1 + K);
    bool any_x = false;
    for (bool b : need_x) any_x = any_x || b;
    if (any_x) {
      std::vector<at::Tensor> gx;
      if (M > 0) {
        gx = call_mix(weights.transpose(-1, -2), grad.unbind(row_dims)).unbind(row_dims);
      } else {
        std::vector<int64_t> sizes = grad.sizes().vec();
        sizes.erase(sizes.begin() + row_dims);
        gx.assign(K, at::zeros(sizes, grad.options()));
      }
      for (int64_t k = 0; k < K; ++k) {
        if (need_x[k]) grads[1 + k] = gx[k];
      }
    }
    if (need_w) {
      // (*P, M, L) @ (*P, L, K), L the trailing elements of a row.
      const at::ScalarType acc = acc_type(grad.scalar_type());
      std::vector<int64_t> rows(weights.sizes().begin(), weights.sizes().end() - 2);
      int64_t L = 1;
      for (int64_t d = row_dims + 1; d < grad.dim(); ++d) L *= grad.size(d);
      std::vector<int64_t> g_shape = rows, x_shape = rows;
      g_shape.insert(g_shape.end(), {M, L});
      x_shape.insert(x_shape.end(), {K, L});
      const at::Tensor g = grad.to(acc).reshape(g_shape);
      const at::Tensor x = at::stack(xs, row_dims).to(acc).reshape(x_shape);
      grads[0] = at::matmul(g, x.transpose(-1, -2)).to(weights.scalar_type());
    }
    return grads;
  }
};

// G contractions in one node: out_g = sum_k w[g, k] * x_{g,k}.
class GroupedWeightedSumFunction : public torch::autograd::Function<GroupedWeightedSumFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& weights, at::TensorList inputs) {
    std::vector<at::Tensor> saved{weights};
    if (weights.requires_grad()) saved.insert(saved.end(), inputs.begin(), inputs.end());
    ctx->save_for_backward(saved);
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_grouped_weighted_sum(weights, inputs);
  }

  // Unused outputs get zero gradients (materialised by autograd).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& weights = saved[0];
    const int64_t G = weights.size(0), K = weights.size(1);
    const bool need_w = ctx->needs_input_grad(0);
    std::vector<bool> need_x(G * K);
    for (int64_t i = 0; i < G * K; ++i) need_x[i] = ctx->needs_input_grad(1 + i);
    variable_list out(1 + G * K);
    if (at::GradMode::is_enabled()) {  // a graph of the backward: group by group
      std::vector<at::Tensor> rows;
      for (int64_t g = 0; g < G; ++g) {
        const std::vector<at::Tensor> xs =
            need_w ? std::vector<at::Tensor>(saved.begin() + 1 + g * K, saved.begin() + 1 + (g + 1) * K)
                   : std::vector<at::Tensor>{};
        const std::vector<bool> need_g(need_x.begin() + g * K, need_x.begin() + (g + 1) * K);
        variable_list gg = differentiable_backward(grads[g], weights.select(0, g), xs, need_w, need_g);
        if (need_w) rows.push_back(gg[0]);
        for (int64_t k = 0; k < K; ++k) out[1 + g * K + k] = gg[1 + k];
      }
      if (need_w) out[0] = G == 0 ? at::zeros_like(weights) : at::stack(rows);
      return out;
    }
    c10::List<bool> need_x_list;
    need_x_list.reserve(G * K);
    for (bool b : need_x) need_x_list.push_back(b);
    const std::vector<at::Tensor> xs =
        need_w ? std::vector<at::Tensor>(saved.begin() + 1, saved.end()) : std::vector<at::Tensor>{};
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [grad_w, grad_x] = grouped_weighted_sum_backward_op(grads, weights, xs, need_w, need_x_list);
    if (need_w) out[0] = grad_w;
    size_t j = 0;  // grad_x holds the wanted gradients only
    for (int64_t i = 0; i < G * K; ++i) {
      if (need_x[i]) out[1 + i] = grad_x[j++];
    }
    return out;
  }
};

at::Tensor weighted_sum_autograd(const at::Tensor& weights, at::TensorList inputs) {
  return WeightedSumFunction::apply(weights, inputs);
}

at::Tensor simplex_weighted_sum_autograd(
    const at::Tensor& logits, at::TensorList inputs, c10::string_view map, double temperature,
    c10::optional<double> alpha) {
  return SimplexWeightedSumFunction::apply(logits, inputs, map, temperature, alpha);
}

at::Tensor mix_autograd(const at::Tensor& weights, at::TensorList inputs) {
  return MixFunction::apply(weights, inputs);
}

std::vector<at::Tensor> grouped_weighted_sum_autograd(const at::Tensor& weights, at::TensorList inputs) {
  return GroupedWeightedSumFunction::apply(weights, inputs);
}

} // namespace

TORCH_LIBRARY_IMPL(simplex_param, Autograd, m) {
  m.impl("weighted_sum", &weighted_sum_autograd);
  m.impl("mix", &mix_autograd);
  m.impl("grouped_weighted_sum", &grouped_weighted_sum_autograd);
  m.impl("simplex_weighted_sum", &simplex_weighted_sum_autograd);
}

} // namespace simplex_param
