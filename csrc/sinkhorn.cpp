// The Sinkhorn ops' code that every backend shares (sinkhorn.h): argument
// checks, conversion and allocation around the backend's kernel, the same
// computation composed of ATen ops (for double backward), and the calls
// through the dispatcher.
#include "sinkhorn.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <vector>

#include "dtypes.h"

namespace simplex_param {
namespace {

// The dimension step k normalises: columns (sums over dim -2) on even
// steps, rows (dim -1) on odd ones.
int64_t step_dim(int64_t k) { return k % 2 == 0 ? -2 : -1; }

Sinkhorn params(const at::Tensor& x, int64_t iters, double eps) {
  Sinkhorn s;
  s.n = x.size(-1);
  s.count = s.n == 0 ? 0 : x.numel() / (s.n * s.n);
  s.iters = iters;
  s.eps = eps;
  s.dtype = x.scalar_type();
  s.device = x.device();
  s.logits = x.const_data_ptr();
  return s;
}

} // namespace

void check_sinkhorn_args(const at::Tensor& logits, int64_t iters, double eps) {
  TORCH_CHECK_TYPE(kernel_dtype(logits.scalar_type()),
                   "sinkhorn: logits must be a floating tensor (float16, bfloat16, float32 or float64), got ",
                   logits.scalar_type());
  TORCH_CHECK_VALUE(logits.dim() >= 2 && logits.size(-1) == logits.size(-2),
                    "sinkhorn: logits must have square last two dimensions (*P, n, n), got shape ", logits.sizes());
  TORCH_CHECK_VALUE(iters >= 1, "sinkhorn: iters must be an int >= 1, got ", iters);
  TORCH_CHECK_VALUE(eps >= 0.0 && std::isfinite(eps), "sinkhorn: eps must be a finite float >= 0, got ", eps);
}

void check_sinkhorn_backward_args(const at::Tensor& grad, const at::Tensor& logits, int64_t iters, double eps) {
  check_sinkhorn_args(logits, iters, eps);
  TORCH_CHECK_TYPE(grad.scalar_type() == logits.scalar_type(), "_sinkhorn_backward: grad has dtype ",
                   grad.scalar_type(), " but logits has dtype ", logits.scalar_type());
  TORCH_CHECK_VALUE(grad.sizes() == logits.sizes(), "_sinkhorn_backward: grad has shape ", grad.sizes(),
                    " but logits has shape ", logits.sizes());
  TORCH_CHECK_VALUE(grad.device() == logits.device(), "_sinkhorn_backward: grad is on device ", grad.device(),
                    " but logits is on device ", logits.device());
}

at::Tensor sinkhorn_forward(const at::Tensor& logits, int64_t iters, double eps, SinkhornKernel kernel) {
  check_sinkhorn_args(logits, iters, eps);
  const at::Tensor x = logits.to(acc_type(logits.scalar_type())).contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  Sinkhorn s = params(x, iters, eps);
  s.out = out.mutable_data_ptr();
  if (s.count > 0) kernel(s);
  return out.to(logits.scalar_type());
}

at::Tensor sinkhorn_backward(
    const at::Tensor& grad, const at::Tensor& logits, int64_t iters, double eps, SinkhornKernel kernel) {
  check_sinkhorn_backward_args(grad, logits, iters, eps);
  const at::ScalarType acc = acc_type(logits.scalar_type());
  const at::Tensor x = logits.to(acc).contiguous();
  const at::Tensor g = grad.to(acc).contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  Sinkhorn s = params(x, iters, eps);
  s.grad = g.const_data_ptr();
  s.out = out.mutable_data_ptr();
  if (s.count > 0) kernel(s);
  return out.to(logits.scalar_type());
}

at::Tensor sinkhorn_composite(const at::Tensor& logits, int64_t iters, double eps) {
  at::Tensor y = at::softmax(logits.to(acc_type(logits.scalar_type())), -1) + eps;
  for (int64_t k = 0; k < sinkhorn_steps(iters); ++k) y = y / (y.sum(step_dim(k), true) + eps);
  return y.to(logits.scalar_type());
}

at::Tensor sinkhorn_backward_composite(const at::Tensor& grad, const at::Tensor& logits, int64_t iters, double eps) {
  const at::ScalarType acc = acc_type(logits.scalar_type());
  const int64_t steps = sinkhorn_steps(iters);
  const at::Tensor s = at::softmax(logits.to(acc), -1);
  std::vector<at::Tensor> z, d;  // the output and the denominator of each step
  at::Tensor y = s + eps;
  for (int64_t k = 0; k < steps; ++k) {
    d.push_back(y.sum(step_dim(k), true) + eps);
    y = y / d.back();
    z.push_back(y);
  }
  at::Tensor g = grad.to(acc);
  for (int64_t k = steps - 1; k >= 0; --k) g = (g - (g * z[k]).sum(step_dim(k), true)) / d[k];
  return (s * (g - (g * s).sum(-1, true))).to(logits.scalar_type());
}

at::Tensor call_sinkhorn(const at::Tensor& logits, int64_t iters, double eps) {
  static const auto op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("simplex_param::sinkhorn", "")
      .typed<at::Tensor(const at::Tensor&, int64_t, double)>();
  return op.call(logits, iters, eps);
}

at::Tensor call_sinkhorn_backward(const at::Tensor& grad, const at::Tensor& logits, int64_t iters, double eps) {
  static const auto op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("simplex_param::_sinkhorn_backward", "")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, double)>();
  return op.call(grad, logits, iters, eps);
}

} // namespace simplex_param
