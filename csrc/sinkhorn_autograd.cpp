// Autograd of simplex_param::sinkhorn, in C++ as for the other ops
// (autograd.cpp): its forward redispatches below autograd to the backend
// kernel and saves the logits only; its backward calls the private
// _sinkhorn_backward op, which recomputes the iterates, or, when a graph of
// the backward is being built (create_graph=True, double backward), composes
// the same formulas from differentiable ATen ops (sinkhorn.cpp).
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "sinkhorn.h"

namespace simplex_param {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class SinkhornFunction : public torch::autograd::Function<SinkhornFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& logits, int64_t iters, double eps) {
    ctx->save_for_backward({logits});
    ctx->saved_data["iters"] = iters;
    ctx->saved_data["eps"] = eps;
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_sinkhorn(logits, iters, eps);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const at::Tensor logits = ctx->get_saved_variables()[0];
    const int64_t iters = ctx->saved_data["iters"].toInt();
    const double eps = ctx->saved_data["eps"].toDouble();
    const at::Tensor& grad = grad_outputs[0];
    at::Tensor grad_logits;
    if (at::GradMode::is_enabled()) {
      grad_logits = sinkhorn_backward_composite(grad, logits, iters, eps);
    } else {
      at::AutoDispatchBelowADInplaceOrView guard;
      grad_logits = call_sinkhorn_backward(grad, logits, iters, eps);
    }
    return {grad_logits, at::Tensor(), at::Tensor()};
  }
};

at::Tensor sinkhorn_autograd(const at::Tensor& logits, int64_t iters, double eps) {
  return SinkhornFunction::apply(logits, iters, eps);
}

} // namespace

TORCH_LIBRARY_IMPL(simplex_param, Autograd, m) {
  m.impl("sinkhorn", &sinkhorn_autograd);
}

} // namespace simplex_param
