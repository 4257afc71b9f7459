// CPU kernels of the fused weighted sum, forward and backward.
//
// Every operand is walked as a flat array (validation.h: dense_operands)
// in blocks of kBlock elements. A block's accumulator lives on the stack
// (L1), so the forward reads each input once and writes the output once,
// and the backward reads the gradient and each input once and writes each
// input's gradient once: the minimum traffic, so the op runs at memory
// bandwidth (docs/benchmarks.md).
//
// The loops are plain C++ that the compiler vectorises. On x86-64 they are
// compiled twice, for the baseline ISA and with AVX2, and the AVX2 copy is
// chosen at run time when the CPU has it (AVX2 without FMA: neither copy
// can contract a * b + c, and the dot products keep kLanes fixed partial
// sums, so both copies give bitwise the same results). The op is memory
// bound: wider vectors matter only while the data sits in cache. Blocks depend on the element
// count only, never on the number of threads, and the per-block partial dot
// products are summed in block order: results are reproducible.
#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../validation.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(_M_X64))
#define SIMPLEX_PARAM_AVX2_PATH 1
#define SIMPLEX_PARAM_TARGET_AVX2 __attribute__((target("avx2")))
#else
#define SIMPLEX_PARAM_AVX2_PATH 0
#endif

#if defined(__GNUC__)
#define SIMPLEX_PARAM_INLINE inline __attribute__((always_inline))
#else
#define SIMPLEX_PARAM_INLINE inline
#endif

namespace simplex_param {
namespace {

constexpr int64_t kBlock = 2048;
constexpr int kLanes = 16;

int64_t num_blocks(int64_t n) {
  return (n + kBlock - 1) / kBlock;
}

// Grain, in blocks, for at::parallel_for: at least 64K elements of traffic
// per thread, so that small problems stay on one thread.
int64_t block_grain(int64_t K) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / (kBlock * std::max<int64_t>(K, 1)));
}

// Element conversions to and from the accumulation type. bfloat16 is done on
// the bits (round to nearest even, NaN kept quiet), which vectorises.
template <typename T>
SIMPLEX_PARAM_INLINE auto load(const T* p, int64_t i) {
  return static_cast<at::opmath_type<T>>(p[i]);
}
template <>
SIMPLEX_PARAM_INLINE auto load(const c10::BFloat16* p, int64_t i) {
  const uint32_t bits = static_cast<uint32_t>(p[i].x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
template <typename T, typename A>
SIMPLEX_PARAM_INLINE void store(T* p, int64_t i, A v) {
  p[i] = static_cast<T>(v);
}
template <>
SIMPLEX_PARAM_INLINE void store(c10::BFloat16* p, int64_t i, float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  p[i].x = static_cast<uint16_t>(v != v ? 0x7FC0u : rounded);
}

// acc (+)= sum over r < R of w[r] * x[r][i], for i < len: R input streams
// advance together.
template <int R, bool First, typename scalar_t, typename acc_t>
SIMPLEX_PARAM_INLINE void accumulate(
    acc_t* acc, const scalar_t* const* xs, const acc_t* w, int64_t start, int64_t len) {
  const scalar_t* x[R];
  acc_t wr[R];
  for (int r = 0; r < R; ++r) {
    x[r] = xs[r] + start;
    wr[r] = w[r];
  }
  for (int64_t i = 0; i < len; ++i) {
    acc_t a = First ? wr[0] * load(x[0], i) : acc[i] + wr[0] * load(x[0], i);
    for (int r = 1; r < R; ++r) a = a + wr[r] * load(x[r], i);
    acc[i] = a;
  }
}

// Forward over blocks [b0, b1): out = sum_k w[k] * xs[k]. The block's
// accumulator lives on the stack (L1) and takes up to four inputs per pass,
// so that four input streams advance together: one stream at a time reads
// at about 60% of the copy bandwidth here, and all K at once (K up to 25)
// overflows the prefetchers (docs/benchmarks.md).
template <typename scalar_t, typename acc_t>
SIMPLEX_PARAM_INLINE void forward_blocks(
    const scalar_t* const* xs, const acc_t* w, int64_t K, scalar_t* out, int64_t n,
    int64_t b0, int64_t b1) {
  alignas(64) acc_t acc[kBlock];
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * kBlock;
    const int64_t len = std::min(kBlock, n - start);
    for (int64_t k = 0; k < K; k += 4) {
      const bool first = k == 0;
      switch (std::min<int64_t>(4, K - k)) {
        case 4:
          first ? accumulate<4, true>(acc, xs + k, w + k, start, len)
                : accumulate<4, false>(acc, xs + k, w + k, start, len);
          break;
        case 3:
          first ? accumulate<3, true>(acc, xs + k, w + k, start, len)
                : accumulate<3, false>(acc, xs + k, w + k, start, len);
          break;
        case 2:
          first ? accumulate<2, true>(acc, xs + k, w + k, start, len)
                : accumulate<2, false>(acc, xs + k, w + k, start, len);
          break;
        default:
          first ? accumulate<1, true>(acc, xs + k, w + k, start, len)
                : accumulate<1, false>(acc, xs + k, w + k, start, len);
      }
    }
    scalar_t* o = out + start;
    for (int64_t i = 0; i < len; ++i) store(o, i, acc[i]);
  }
}

// Backward over blocks [b0, b1). For every k: dxs[k] = w[k] * grad where
// dxs[k] is not null, and, when `partials` is not null, partials[b * K + k]
// = <grad, xs[k]> over block b, as kLanes fixed partial sums added pairwise.
template <typename scalar_t, typename acc_t>
SIMPLEX_PARAM_INLINE void backward_blocks(
    const scalar_t* grad, const scalar_t* const* xs, const acc_t* w, int64_t K,
    scalar_t* const* dxs, acc_t* partials, int64_t n, int64_t b0, int64_t b1) {
  alignas(64) acc_t g[kBlock];
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * kBlock;
    const int64_t len = std::min(kBlock, n - start);
    for (int64_t i = 0; i < len; ++i) g[i] = load(grad + start, i);
    for (int64_t k = 0; k < K; ++k) {
      if (dxs[k] != nullptr) {
        scalar_t* dx = dxs[k] + start;
        const acc_t wk = w[k];
        for (int64_t i = 0; i < len; ++i) store(dx, i, wk * g[i]);
      }
      if (partials != nullptr) {
        const scalar_t* x = xs[k] + start;
        acc_t s[kLanes] = {};
        int64_t i = 0;
        for (; i + kLanes <= len; i += kLanes) {
          for (int j = 0; j < kLanes; ++j) s[j] = s[j] + g[i + j] * load(x, i + j);
        }
        for (int j = 0; i < len; ++i, ++j) s[j] = s[j] + g[i] * load(x, i);
        for (int width = kLanes / 2; width > 0; width /= 2) {
          for (int j = 0; j < width; ++j) s[j] = s[j] + s[j + width];
        }
        partials[b * K + k] = s[0];
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
void forward_default(const scalar_t* const* xs, const acc_t* w, int64_t K, scalar_t* out, int64_t n, int64_t b0, int64_t b1) {
  forward_blocks(xs, w, K, out, n, b0, b1);
}
template <typename scalar_t, typename acc_t>
void backward_default(const scalar_t* grad, const scalar_t* const* xs, const acc_t* w, int64_t K,
                      scalar_t* const* dxs, acc_t* partials, int64_t n, int64_t b0, int64_t b1) {
  backward_blocks(grad, xs, w, K, dxs, partials, n, b0, b1);
}

#if SIMPLEX_PARAM_AVX2_PATH
template <typename scalar_t, typename acc_t>
SIMPLEX_PARAM_TARGET_AVX2 void forward_avx2(
    const scalar_t* const* xs, const acc_t* w, int64_t K, scalar_t* out, int64_t n, int64_t b0, int64_t b1) {
  forward_blocks(xs, w, K, out, n, b0, b1);
}
template <typename scalar_t, typename acc_t>
SIMPLEX_PARAM_TARGET_AVX2 void backward_avx2(
    const scalar_t* grad, const scalar_t* const* xs, const acc_t* w, int64_t K,
    scalar_t* const* dxs, acc_t* partials, int64_t n, int64_t b0, int64_t b1) {
  backward_blocks(grad, xs, w, K, dxs, partials, n, b0, b1);
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}
#endif

template <typename scalar_t, typename acc_t>
void forward_kernel(
    const std::vector<const scalar_t*>& xs,
    const std::vector<acc_t>& w,
    scalar_t* out,
    int64_t n) {
  const int64_t K = static_cast<int64_t>(xs.size());
  auto body = forward_default<scalar_t, acc_t>;
#if SIMPLEX_PARAM_AVX2_PATH
  if (cpu_has_avx2()) body = forward_avx2<scalar_t, acc_t>;
#endif
  at::parallel_for(0, num_blocks(n), block_grain(K), [&](int64_t b0, int64_t b1) {
    body(xs.data(), w.data(), K, out, n, b0, b1);
  });
}

template <typename scalar_t, typename acc_t>
void backward_kernel(
    const scalar_t* grad,
    const std::vector<const scalar_t*>& xs,
    const std::vector<acc_t>& w,
    const std::vector<scalar_t*>& dxs,
    acc_t* partials,
    int64_t n) {
  const int64_t K = static_cast<int64_t>(w.size());
  auto body = backward_default<scalar_t, acc_t>;
#if SIMPLEX_PARAM_AVX2_PATH
  if (cpu_has_avx2()) body = backward_avx2<scalar_t, acc_t>;
#endif
  at::parallel_for(0, num_blocks(n), block_grain(K), [&](int64_t b0, int64_t b1) {
    body(grad, xs.data(), w.data(), K, dxs.data(), partials, n, b0, b1);
  });
}

// Weights as float64 on the host: softmax(logits / temperature) or the
// weights as given.
std::vector<double> host_weights(const at::Tensor& logits, bool softmax, double temperature) {
  // Read in place (a 1-D CPU tensor, any stride): no tensor op per call.
  const at::Tensor l = at::isFloatingType(logits.scalar_type()) ? logits : logits.to(at::kDouble);
  std::vector<double> w(l.size(0));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, l.scalar_type(), "host_weights", [&] {
    const scalar_t* p = l.const_data_ptr<scalar_t>();
    const int64_t stride = l.stride(0);
    for (size_t k = 0; k < w.size(); ++k) w[k] = static_cast<double>(p[k * stride]);
  });
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
    const at::ScalarType dtype = logits.scalar_type();
    if (dtype == at::kFloat || dtype == at::kDouble) {
      grad_logits = at::empty({K}, logits.options());
      AT_DISPATCH_FLOATING_TYPES(dtype, "grad_logits", [&] {
        scalar_t* p = grad_logits.mutable_data_ptr<scalar_t>();
        for (int64_t k = 0; k < K; ++k) p[k] = static_cast<scalar_t>(d[k]);
      });
    } else {
      grad_logits = at::tensor(d, at::TensorOptions().dtype(at::kDouble)).to(dtype);
    }
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
