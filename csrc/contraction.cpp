#include "contraction.h"

#include <ATen/Functions.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "checks.h"
#include "layout.h"

namespace simplex_param {
namespace {

int64_t num_rows(const at::Tensor& weights) {
  int64_t rows = 1;
  for (int64_t i = 0; i + 1 < weights.dim(); ++i) rows *= weights.size(i);
  return rows;
}

} // namespace

at::Tensor call_weighted_sum(const at::Tensor& weights, at::TensorList inputs) {
  static const auto op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("simplex_param::weighted_sum", "")
      .typed<at::Tensor(const at::Tensor&, at::TensorList)>();
  return op.call(weights, inputs);
}

at::Tensor weighted_sum_forward(const at::Tensor& weights, at::TensorList inputs, ContractionKernel kernel) {
  check_args(weights, inputs, "weights");
  const int64_t row_dims = weights.dim() - 1;
  const std::vector<int64_t> strides = walk_strides(inputs, row_dims);
  std::vector<at::Tensor> xs;
  xs.reserve(inputs.size());
  for (const at::Tensor& x : inputs) xs.push_back(in_layout(x, strides));
  at::Tensor out = at::empty_strided(xs[0].sizes(), strides, xs[0].options());
  const int64_t n = out.numel();
  if (n == 0) return out;

  const at::Tensor w = weights.to(acc_type(out.scalar_type())).contiguous();
  Contraction c;
  c.K = static_cast<int64_t>(xs.size());
  c.rows = num_rows(weights);
  c.row_len = n / c.rows;
  c.dtype = out.scalar_type();
  c.device = out.device();
  c.w = w.const_data_ptr();
  for (const at::Tensor& x : xs) c.x.push_back(x.const_data_ptr());
  c.out = out.mutable_data_ptr();
  kernel(c);
  return out;
}

std::tuple<at::Tensor, std::vector<at::Tensor>> weighted_sum_backward(
    const at::Tensor& grad_out,
    const at::Tensor& weights,
    at::TensorList inputs,
    bool weights_requires_grad,
    const c10::List<bool>& inputs_requires_grad,
    bool skip_zero_weights,
    ContractionKernel kernel) {
  check_backward_args(grad_out, weights, inputs, weights_requires_grad, inputs_requires_grad);
  const int64_t K = weights.size(-1);
  const int64_t row_dims = weights.dim() - 1;

  // The gradient and, for the weights' gradient, the inputs: one layout.
  std::vector<at::Tensor> operands{grad_out};
  if (weights_requires_grad) operands.insert(operands.end(), inputs.begin(), inputs.end());
  const std::vector<int64_t> strides = walk_strides(operands, row_dims);
  for (at::Tensor& t : operands) t = in_layout(t, strides);
  const at::Tensor& grad = operands[0];
  const int64_t n = grad.numel();

  Contraction c;
  c.K = K;
  c.rows = num_rows(weights);
  c.row_len = c.rows == 0 ? 0 : n / c.rows;
  c.dtype = grad.scalar_type();
  c.device = grad.device();
  c.grad = grad.const_data_ptr();
  c.skip_zero_weights = skip_zero_weights;
  std::vector<at::Tensor> grad_inputs;
  bool any = weights_requires_grad;
  for (int64_t k = 0; k < K; ++k) {
    const bool need = inputs_requires_grad[k];
    grad_inputs.push_back(
        need ? at::empty_strided(grad.sizes(), strides, grad.options()) : at::empty({0}, grad.options()));
    c.grad_x.push_back(need ? grad_inputs.back().mutable_data_ptr() : nullptr);
    any = any || need;
  }
  at::Tensor grad_w;
  if (weights_requires_grad) {
    grad_w = at::empty({c.rows, K}, grad.options().dtype(acc_type(c.dtype)));
    c.grad_w = grad_w.mutable_data_ptr();
    for (size_t i = 1; i < operands.size(); ++i) c.x.push_back(operands[i].const_data_ptr());
  }
  if (n == 0) {
    if (weights_requires_grad) grad_w.zero_();
  } else if (any) {
    const at::Tensor w = weights.to(acc_type(c.dtype)).contiguous();
    c.w = w.const_data_ptr();
    kernel(c);
  }
  at::Tensor grad_weights = weights_requires_grad
      ? grad_w.view(weights.sizes()).to(weights.scalar_type())
      : at::empty({0}, weights.options());
  return {grad_weights, grad_inputs};
}

} // namespace simplex_param
