// CPU kernels of the fused weighted sum, forward and backward.
//
// Every operand is walked as a flat array (validation.h: dense_operands)
// in blocks of kBlock elements. A block's accumulator lives on the stack
// (L1), so the forward reads each input once and writes the output once,
// and the backward reads the gradient and each input once and writes each
// input's gradient once. Blocks depend on the element count only, never on
// the number of threads, and the per-block partial dot products are summed
// in block order: results are bitwise reproducible.
#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../validation.h"

namespace simplex_param {
namespace {

constexpr int64_t kBlock = 2048;

int64_t num_blocks(int64_t n) {
  return (n + kBlock - 1) / kBlock;
}

// Grain, in blocks, for at::parallel_for: small problems stay on one thread.
int64_t block_grain(int64_t K) {
  return std::max<int64_t>(1, 16 / std::max<int64_t>(K, 1));
}

// Loads `len` elements at `src` as acc_t: the pointer itself when no
// conversion is needed, else a converted copy in `buf`.
template <typename scalar_t, typename acc_t>
const acc_t* load_acc(const scalar_t* src, acc_t* buf, int64_t len) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    at::vec::convert(src, buf, len);
    return buf;
  }
}

// dst[i] = w * x[i] (first) or dst[i] += w * x[i], on acc_t arrays.
template <typename acc_t>
void axpy(acc_t w, const acc_t* x, acc_t* dst, int64_t len, bool first) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec wv(w);
  int64_t i = 0;
  if (first) {
    for (; i + Vec::size() <= len; i += Vec::size()) (wv * Vec::loadu(x + i)).store(dst + i);
    for (; i < len; ++i) dst[i] = w * x[i];
  } else {
    for (; i + Vec::size() <= len; i += Vec::size())
      at::vec::fmadd(wv, Vec::loadu(x + i), Vec::loadu(dst + i)).store(dst + i);
    for (; i < len; ++i) dst[i] = std::fma(w, x[i], dst[i]);
  }
}

// Sum of a[i] * b[i], with four vector accumulators in a fixed order.
template <typename acc_t>
acc_t dot(const acc_t* a, const acc_t* b, int64_t len) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  Vec s0(0), s1(0), s2(0), s3(0);
  int64_t i = 0;
  for (; i + 4 * V <= len; i += 4 * V) {
    s0 = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), s0);
    s1 = at::vec::fmadd(Vec::loadu(a + i + V), Vec::loadu(b + i + V), s1);
    s2 = at::vec::fmadd(Vec::loadu(a + i + 2 * V), Vec::loadu(b + i + 2 * V), s2);
    s3 = at::vec::fmadd(Vec::loadu(a + i + 3 * V), Vec::loadu(b + i + 3 * V), s3);
  }
  for (; i + V <= len; i += V) s0 = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), s0);
  const Vec s = (s0 + s1) + (s2 + s3);
  acc_t total = at::vec::vec_reduce_all<acc_t>(
      [](Vec& x, Vec& y) { return x + y; }, s);
  for (; i < len; ++i) total = std::fma(a[i], b[i], total);
  return total;
}

template <typename scalar_t, typename acc_t>
void forward_kernel(
    const std::vector<const scalar_t*>& xs,
    const std::vector<acc_t>& w,
    scalar_t* out,
    int64_t n) {
  const int64_t K = static_cast<int64_t>(xs.size());
  at::parallel_for(0, num_blocks(n), block_grain(K), [&](int64_t b0, int64_t b1) {
    alignas(64) acc_t acc[kBlock];
    alignas(64) acc_t buf[kBlock];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * kBlock;
      const int64_t len = std::min(kBlock, n - start);
      // Same-dtype outputs accumulate in place; others through `acc`.
      acc_t* dst;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        dst = out + start;
      } else {
        dst = acc;
      }
      for (int64_t k = 0; k < K; ++k) {
        axpy(w[k], load_acc(xs[k] + start, buf, len), dst, len, k == 0);
      }
      if constexpr (!std::is_same_v<scalar_t, acc_t>) {
        at::vec::convert(acc, out + start, len);
      }
    }
  });
}

// One pass over the blocks. For every k: dxs[k] = w[k] * grad where dxs[k]
// is not null, and, when `partials` is not null, partials[b * K + k] =
// <grad, xs[k]> over block b.
template <typename scalar_t, typename acc_t>
void backward_kernel(
    const scalar_t* grad,
    const std::vector<const scalar_t*>& xs,
    const std::vector<acc_t>& w,
    const std::vector<scalar_t*>& dxs,
    acc_t* partials,
    int64_t n) {
  const int64_t K = static_cast<int64_t>(w.size());
  at::parallel_for(0, num_blocks(n), block_grain(K), [&](int64_t b0, int64_t b1) {
    alignas(64) acc_t gbuf[kBlock];
    alignas(64) acc_t buf[kBlock];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * kBlock;
      const int64_t len = std::min(kBlock, n - start);
      const acc_t* g = load_acc(grad + start, gbuf, len);
      for (int64_t k = 0; k < K; ++k) {
        if (dxs[k] != nullptr) {
          if constexpr (std::is_same_v<scalar_t, acc_t>) {
            axpy(w[k], g, dxs[k] + start, len, /*first=*/true);
          } else {
            axpy(w[k], g, buf, len, /*first=*/true);
            at::vec::convert(buf, dxs[k] + start, len);
          }
        }
        if (partials != nullptr) {
          partials[b * K + k] = dot(g, load_acc(xs[k] + start, buf, len), len);
        }
      }
    }
  });
}

// Weights as float64 on the host: softmax(logits / temperature) or the
// weights as given.
std::vector<double> host_weights(const at::Tensor& logits, bool softmax, double temperature) {
  const at::Tensor l = logits.to(at::kDouble).contiguous();
  const double* p = l.const_data_ptr<double>();
  std::vector<double> w(p, p + l.numel());
  if (!softmax) return w;
  double m = -INFINITY;
  for (double& v : w) {
    v /= temperature;
    m = std::max(m, v);
  }
  double total = 0;
  for (double& v : w) {
    v = std::exp(v - m);
    total += v;
  }
  for (double& v : w) v /= total;
  return w;
}

at::Tensor forward(const at::Tensor& logits, at::TensorList inputs, bool softmax, double temperature) {
  const std::vector<double> w64 = host_weights(logits, softmax, temperature);
  const std::vector<at::Tensor> xs = dense_operands(inputs);
  at::Tensor out = at::empty_like(xs[0]);
  const int64_t n = out.numel();
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "weighted_sum_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> w(w64.begin(), w64.end());
    std::vector<const scalar_t*> ptrs;
    for (const auto& x : xs) ptrs.push_back(x.const_data_ptr<scalar_t>());
    forward_kernel<scalar_t, acc_t>(ptrs, w, out.mutable_data_ptr<scalar_t>(), n);
  });
  return out;
}

std::tuple<at::Tensor, std::vector<at::Tensor>> backward(
    const at::Tensor& grad_out,
    const at::Tensor& logits,
    at::TensorList inputs,
    bool softmax,
    double temperature,
    bool logits_requires_grad,
    const c10::List<bool>& inputs_requires_grad) {
  const int64_t K = logits.size(0);
  const std::vector<double> w64 = host_weights(logits, softmax, temperature);

  // The gradient and the inputs walked together, in one shared layout.
  std::vector<at::Tensor> operands{grad_out};
  if (logits_requires_grad) operands.insert(operands.end(), inputs.begin(), inputs.end());
  operands = dense_operands(operands);
  const at::Tensor& grad = operands[0];
  const int64_t n = grad.numel();

  std::vector<at::Tensor> grad_inputs;
  for (int64_t k = 0; k < K; ++k) {
    grad_inputs.push_back(
        inputs_requires_grad[k] ? at::empty_like(grad) : at::empty({0}, grad.options()));
  }
  std::vector<double> d(K, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "weighted_sum_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (n == 0) return;
    std::vector<acc_t> w(w64.begin(), w64.end());
    std::vector<const scalar_t*> xs;
    for (size_t i = 1; i < operands.size(); ++i) xs.push_back(operands[i].const_data_ptr<scalar_t>());
    std::vector<scalar_t*> dxs;
    for (int64_t k = 0; k < K; ++k) {
      dxs.push_back(inputs_requires_grad[k] ? grad_inputs[k].mutable_data_ptr<scalar_t>() : nullptr);
    }
    std::vector<acc_t> partials(logits_requires_grad ? num_blocks(n) * K : 0);
    backward_kernel<scalar_t, acc_t>(
        grad.const_data_ptr<scalar_t>(), xs, w, dxs,
        logits_requires_grad ? partials.data() : nullptr, n);
    for (int64_t b = 0; b < num_blocks(n) && logits_requires_grad; ++b) {
      for (int64_t k = 0; k < K; ++k) d[k] += partials[b * K + k];
    }
  });

  at::Tensor grad_logits = at::empty({0}, logits.options());
  if (logits_requires_grad) {
    if (softmax) {
      // Softmax Jacobian: dL/dl_k = p_k (d_k - sum_j p_j d_j) / T.
      double pd = 0;
      for (int64_t k = 0; k < K; ++k) pd += w64[k] * d[k];
      for (int64_t k = 0; k < K; ++k) d[k] = w64[k] * (d[k] - pd) / temperature;
    }
    grad_logits = at::tensor(d, at::TensorOptions().dtype(at::kDouble)).to(logits.scalar_type());
  }
  return {grad_logits, grad_inputs};
}

at::Tensor softmax_weighted_sum_cpu(const at::Tensor& logits, at::TensorList inputs, double temperature) {
  check_args(logits, inputs, "logits");
  check_temperature(temperature);
  return forward(logits, inputs, /*softmax=*/true, temperature);
}

at::Tensor weighted_sum_cpu(const at::Tensor& weights, at::TensorList inputs) {
  check_args(weights, inputs, "weights");
  return forward(weights, inputs, /*softmax=*/false, 1.0);
}

std::tuple<at::Tensor, std::vector<at::Tensor>> softmax_weighted_sum_backward_cpu(
    const at::Tensor& grad, const at::Tensor& logits, at::TensorList inputs,
    double temperature, bool logits_requires_grad, const c10::List<bool>& inputs_requires_grad) {
  check_backward_args(grad, logits, inputs, logits_requires_grad, inputs_requires_grad);
  check_temperature(temperature);
  return backward(grad, logits, inputs, true, temperature, logits_requires_grad, inputs_requires_grad);
}

std::tuple<at::Tensor, std::vector<at::Tensor>> weighted_sum_backward_cpu(
    const at::Tensor& grad, const at::Tensor& weights, at::TensorList inputs,
    bool weights_requires_grad, const c10::List<bool>& inputs_requires_grad) {
  check_backward_args(grad, weights, inputs, weights_requires_grad, inputs_requires_grad);
  return backward(grad, weights, inputs, false, 1.0, weights_requires_grad, inputs_requires_grad);
}

} // namespace

TORCH_LIBRARY_IMPL(simplex_param, CPU, m) {
  m.impl("softmax_weighted_sum", &softmax_weighted_sum_cpu);
  m.impl("weighted_sum", &weighted_sum_cpu);
  m.impl("_softmax_weighted_sum_backward", &softmax_weighted_sum_backward_cpu);
  m.impl("_weighted_sum_backward", &weighted_sum_backward_cpu);
}

} // namespace simplex_param
