// CUDA kernels of the fused weighted sum, forward and backward.
//
// Every operand is walked as a flat array (validation.h: dense_operands).
// One launch of each op runs, on the current stream and with no host
// synchronisation:
//   1. weights_kernel: softmax(logits / T) (or the weights as given), once,
//      into K accumulation-type values in device memory;
//   2. the streaming kernel, which reads every input once and writes every
//      output once, with 16-byte vector loads when all pointers are aligned;
//   3. for the gradient of the weights only: finish_kernel, which sums the
//      per-block partial dot products in a fixed order and applies the
//      softmax Jacobian. No floating-point atomics: the same inputs on the
//      same device give the same bits.
// The K input pointers travel as kernel arguments, in chunks (kFwdChunk for
// the forward, kBwdChunk for the backward). See docs/cuda.md.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../validation.h"

namespace simplex_param {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kVecBytes = 16;
// Input pointers per forward launch. More inputs take several launches that
// carry the running sum in an accumulation-type buffer.
constexpr int kFwdChunk = 64;
// Input pointers per backward launch: each thread keeps one dot-product
// accumulator per input of the chunk in registers.
constexpr int kBwdChunk = 16;

template <typename T, int N>
struct Ptrs {
  T* p[N];
};

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Loads V elements at p as acc_t; V > 1 needs p aligned to V elements.
template <int V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load(const scalar_t* p, acc_t (&r)[V]) {
  if constexpr (V == 1) {
    r[0] = static_cast<acc_t>(p[0]);
  } else {
    const Pack<scalar_t, V> pack = *reinterpret_cast<const Pack<scalar_t, V>*>(p);
#pragma unroll
    for (int j = 0; j < V; ++j) r[j] = static_cast<acc_t>(pack.v[j]);
  }
}

template <int V, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store(scalar_t* p, const acc_t (&r)[V]) {
  if constexpr (V == 1) {
    p[0] = static_cast<scalar_t>(r[0]);
  } else {
    Pack<scalar_t, V> pack;
#pragma unroll
    for (int j = 0; j < V; ++j) pack.v[j] = static_cast<scalar_t>(r[j]);
    *reinterpret_cast<Pack<scalar_t, V>*>(p) = pack;
  }
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = max(v, __shfl_down_sync(0xffffffffu, v, off));
  return v;
}

// Sum (or max) over the block in a fixed order, returned to every thread.
template <bool kMax, typename T>
__device__ T block_reduce(T v) {
  __shared__ T partial[kWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v = kMax ? warp_max(v) : warp_sum(v);
  __syncthreads();  // `partial` may still be read by a previous call
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  T total = partial[0];
  for (int w = 1; w < kWarps; ++w) total = kMax ? max(total, partial[w]) : total + partial[w];
  return total;
}

// w[k] = softmax(l / T)[k] (softmax) or l[k], in acc_t. One block.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
weights_kernel(const acc_t* __restrict__ l, acc_t* __restrict__ w, int64_t K, bool softmax, acc_t inv_t) {
  if (!softmax) {
    for (int64_t k = threadIdx.x; k < K; k += kThreads) w[k] = l[k];
    return;
  }
  // NaN propagates through the sum, as in torch.softmax.
  acc_t m = -INFINITY;
  for (int64_t k = threadIdx.x; k < K; k += kThreads) m = max(m, l[k] * inv_t);
  m = block_reduce<true>(m);
  acc_t s = 0;
  for (int64_t k = threadIdx.x; k < K; k += kThreads) s += exp(l[k] * inv_t - m);
  s = block_reduce<false>(s);
  for (int64_t k = threadIdx.x; k < K; k += kThreads) w[k] = exp(l[k] * inv_t - m) / s;
}

// out = sum over the chunk of w[k] * xs[k], plus acc_in when given; written
// to acc_out when given (more chunks follow), else to out.
template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kThreads)
forward_kernel(
    Ptrs<const scalar_t, kFwdChunk> xs, int kc, const acc_t* __restrict__ w,
    const acc_t* acc_in, acc_t* acc_out,  // the same buffer in middle chunks
    scalar_t* __restrict__ out, int64_t n) {
  __shared__ acc_t ws[kFwdChunk];
  if (threadIdx.x < kc) ws[threadIdx.x] = w[threadIdx.x];
  __syncthreads();

  auto step = [&](auto v_tag, int64_t i) {
    constexpr int VV = decltype(v_tag)::value;
    acc_t acc[VV];
    if (acc_in != nullptr) {
#pragma unroll
      for (int j = 0; j < VV; ++j) acc[j] = acc_in[i + j];
    } else {
#pragma unroll
      for (int j = 0; j < VV; ++j) acc[j] = 0;
    }
#pragma unroll 4
    for (int k = 0; k < kc; ++k) {
      acc_t x[VV];
      load<VV>(xs.p[k] + i, x);
      const acc_t wk = ws[k];
#pragma unroll
      for (int j = 0; j < VV; ++j) acc[j] = fma(wk, x[j], acc[j]);
    }
    if (acc_out != nullptr) {
#pragma unroll
      for (int j = 0; j < VV; ++j) acc_out[i + j] = acc[j];
    } else {
      store<VV>(out + i, acc);
    }
  };

  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t nv = n / V;
  for (int64_t v = tid; v < nv; v += stride) step(std::integral_constant<int, V>{}, v * V);
  for (int64_t i = nv * V + tid; i < n; i += stride) step(std::integral_constant<int, 1>{}, i);
}

// For every k of the chunk: dxs[k] = w[k] * grad where dxs[k] is not null,
// and, when partials is not null, partials[k * nb + block] = <grad, xs[k]>
// over the elements this block visits.
template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kThreads)
backward_kernel(
    const scalar_t* __restrict__ grad, Ptrs<const scalar_t, kBwdChunk> xs,
    Ptrs<scalar_t, kBwdChunk> dxs, int kc, const acc_t* __restrict__ w,
    acc_t* __restrict__ partials, int64_t nb, int64_t n) {
  __shared__ acc_t ws[kBwdChunk];
  __shared__ acc_t dots[kBwdChunk][kWarps];
  if (threadIdx.x < kc) ws[threadIdx.x] = w[threadIdx.x];
  __syncthreads();
  const bool need_dot = partials != nullptr;

  acc_t dot[kBwdChunk];
#pragma unroll
  for (int k = 0; k < kBwdChunk; ++k) dot[k] = 0;

  auto step = [&](auto v_tag, int64_t i) {
    constexpr int VV = decltype(v_tag)::value;
    acc_t g[VV];
    load<VV>(grad + i, g);
#pragma unroll
    for (int k = 0; k < kBwdChunk; ++k) {
      if (k >= kc) continue;  // a constant trip count keeps dot[] in registers
      if (dxs.p[k] != nullptr) {
        acc_t d[VV];
#pragma unroll
        for (int j = 0; j < VV; ++j) d[j] = ws[k] * g[j];
        store<VV>(dxs.p[k] + i, d);
      }
      if (need_dot) {
        acc_t x[VV];
        load<VV>(xs.p[k] + i, x);
#pragma unroll
        for (int j = 0; j < VV; ++j) dot[k] = fma(g[j], x[j], dot[k]);
      }
    }
  };

  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t nv = n / V;
  for (int64_t v = tid; v < nv; v += stride) step(std::integral_constant<int, V>{}, v * V);
  for (int64_t i = nv * V + tid; i < n; i += stride) step(std::integral_constant<int, 1>{}, i);

  if (!need_dot) return;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int k = 0; k < kBwdChunk; ++k) {
    if (k >= kc) continue;
    const acc_t s = warp_sum(dot[k]);
    if (lane == 0) dots[k][warp] = s;
  }
  __syncthreads();
  if (threadIdx.x < kc) {
    acc_t s = dots[threadIdx.x][0];
    for (int j = 1; j < kWarps; ++j) s += dots[threadIdx.x][j];
    partials[threadIdx.x * nb + blockIdx.x] = s;
  }
}

// d[k] = sum over blocks of partials[k * nb + b], in a fixed order; then the
// gradient of the logits, w * (d - <w, d>) / T (softmax), or d. One block.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
finish_kernel(
    const acc_t* __restrict__ partials, int64_t nb, int64_t K, const acc_t* __restrict__ w,
    bool softmax, acc_t inv_t, acc_t* __restrict__ d, acc_t* __restrict__ grad_w) {
  for (int64_t k = 0; k < K; ++k) {
    acc_t s = 0;
    for (int64_t b = threadIdx.x; b < nb; b += kThreads) s += partials[k * nb + b];
    s = block_reduce<false>(s);
    if (threadIdx.x == 0) d[k] = s;
  }
  __syncthreads();
  if (!softmax) {
    for (int64_t k = threadIdx.x; k < K; k += kThreads) grad_w[k] = d[k];
    return;
  }
  acc_t pd = 0;
  for (int64_t k = threadIdx.x; k < K; k += kThreads) pd += w[k] * d[k];
  pd = block_reduce<false>(pd);
  for (int64_t k = threadIdx.x; k < K; k += kThreads) grad_w[k] = w[k] * (d[k] - pd) * inv_t;
}

bool aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % kVecBytes == 0;
}

// Blocks of a streaming launch: enough to fill the device, then grid-stride.
int64_t num_blocks(int64_t n, int vec) {
  // An attribute query: no synchronisation, and no cache to share between threads.
  int dev = 0;
  int count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, dev));
  const int64_t wanted = (n / vec + kThreads - 1) / kThreads;
  return std::max<int64_t>(1, std::min<int64_t>(wanted, static_cast<int64_t>(count) * (2048 / kThreads)));
}

// The K weights in acc type, on the device: softmax(logits / T) or as given.
at::Tensor device_weights(const at::Tensor& logits, at::ScalarType acc, bool softmax, double temperature,
                          cudaStream_t stream) {
  const at::Tensor l = logits.to(acc).contiguous();
  at::Tensor w = at::empty_like(l);
  AT_DISPATCH_FLOATING_TYPES(acc, "simplex_param_weights_cuda", [&] {
    weights_kernel<scalar_t><<<1, kThreads, 0, stream>>>(
        l.const_data_ptr<scalar_t>(), w.mutable_data_ptr<scalar_t>(), l.numel(), softmax,
        static_cast<scalar_t>(1.0 / temperature));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return w;
}

template <typename scalar_t, typename acc_t, int V>
void launch_forward(const std::vector<at::Tensor>& xs, const acc_t* w, scalar_t* out, int64_t n,
                    cudaStream_t stream) {
  const int64_t K = static_cast<int64_t>(xs.size());
  const int64_t blocks = num_blocks(n, V);
  // The running sum between chunks, only when there is more than one.
  at::Tensor acc_buf;
  if (K > kFwdChunk) {
    acc_buf = at::empty({n}, xs[0].options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  }
  for (int64_t k0 = 0; k0 < K; k0 += kFwdChunk) {
    const int kc = static_cast<int>(std::min<int64_t>(kFwdChunk, K - k0));
    Ptrs<const scalar_t, kFwdChunk> ptrs{};
    for (int k = 0; k < kc; ++k) ptrs.p[k] = xs[k0 + k].const_data_ptr<scalar_t>();
    const bool last = k0 + kc == K;
    acc_t* acc = acc_buf.defined() ? acc_buf.mutable_data_ptr<acc_t>() : nullptr;
    forward_kernel<scalar_t, acc_t, V><<<blocks, kThreads, 0, stream>>>(
        ptrs, kc, w + k0, k0 == 0 ? nullptr : acc, last ? nullptr : acc, out, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

at::Tensor forward(const at::Tensor& logits, at::TensorList inputs, bool softmax, double temperature) {
  const c10::cuda::CUDAGuard guard(inputs[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const std::vector<at::Tensor> xs = dense_operands(inputs);
  at::Tensor out = at::empty_like(xs[0]);
  const int64_t n = out.numel();
  if (n == 0) return out;
  const at::Tensor w = device_weights(logits, acc_type(out.scalar_type()), softmax, temperature, stream);
  bool vec = aligned(out.const_data_ptr());
  for (const auto& x : xs) vec = vec && aligned(x.const_data_ptr());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "simplex_param_forward_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    constexpr int V = kVecBytes / sizeof(scalar_t);
    const acc_t* wp = w.const_data_ptr<acc_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    if (vec) {
      launch_forward<scalar_t, acc_t, V>(xs, wp, op, n, stream);
    } else {
      launch_forward<scalar_t, acc_t, 1>(xs, wp, op, n, stream);
    }
  });
  return out;
}

template <typename scalar_t, typename acc_t, int V>
void launch_backward(const scalar_t* grad, const std::vector<at::Tensor>& xs,
                     const std::vector<at::Tensor>& grad_inputs, const c10::List<bool>& need_x,
                     const acc_t* w, acc_t* partials, int64_t nb, int64_t n, cudaStream_t stream) {
  const int64_t K = static_cast<int64_t>(grad_inputs.size());
  const bool need_dot = partials != nullptr;
  for (int64_t k0 = 0; k0 < K; k0 += kBwdChunk) {
    const int kc = static_cast<int>(std::min<int64_t>(kBwdChunk, K - k0));
    Ptrs<const scalar_t, kBwdChunk> xp{};
    Ptrs<scalar_t, kBwdChunk> dxp{};
    bool any = need_dot;
    for (int k = 0; k < kc; ++k) {
      if (need_dot) xp.p[k] = xs[k0 + k].const_data_ptr<scalar_t>();
      if (need_x[k0 + k]) {
        dxp.p[k] = grad_inputs[k0 + k].mutable_data_ptr<scalar_t>();
        any = true;
      }
    }
    if (!any) continue;  // nothing of this chunk is needed
    backward_kernel<scalar_t, acc_t, V><<<nb, kThreads, 0, stream>>>(
        grad, xp, dxp, kc, w + k0, need_dot ? partials + k0 * nb : nullptr, nb, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::tuple<at::Tensor, std::vector<at::Tensor>> backward(
    const at::Tensor& grad_out,
    const at::Tensor& logits,
    at::TensorList inputs,
    bool softmax,
    double temperature,
    bool logits_requires_grad,
    const c10::List<bool>& inputs_requires_grad) {
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t K = logits.size(0);

  // The gradient and the inputs walked together, in one shared layout.
  std::vector<at::Tensor> operands{grad_out};
  if (logits_requires_grad) operands.insert(operands.end(), inputs.begin(), inputs.end());
  operands = dense_operands(operands);
  const at::Tensor& grad = operands[0];
  const std::vector<at::Tensor> xs(operands.begin() + 1, operands.end());
  const int64_t n = grad.numel();

  std::vector<at::Tensor> grad_inputs;
  bool any_x = false;
  for (int64_t k = 0; k < K; ++k) {
    grad_inputs.push_back(
        inputs_requires_grad[k] ? at::empty_like(grad) : at::empty({0}, grad.options()));
    any_x = any_x || inputs_requires_grad[k];
  }
  at::Tensor grad_logits = at::empty({0}, logits.options());
  if (n == 0) {
    // d = 0: the gradient is p (0 - <p, 0>) / T, which is zero, or NaN where
    // the weights are NaN, as on the CPU.
    if (logits_requires_grad) {
      grad_logits = softmax
          ? device_weights(logits, acc_type(grad.scalar_type()), true, temperature, stream)
                .mul(0)
                .to(logits.scalar_type())
          : at::zeros({K}, logits.options());
    }
    return {grad_logits, grad_inputs};
  }
  if (!logits_requires_grad && !any_x) return {grad_logits, grad_inputs};

  const at::ScalarType acc = acc_type(grad.scalar_type());
  const at::Tensor w = device_weights(logits, acc, softmax, temperature, stream);
  bool vec = aligned(grad.const_data_ptr());
  for (const auto& x : xs) vec = vec && aligned(x.const_data_ptr());
  for (const auto& g : grad_inputs) vec = vec && (g.numel() == 0 || aligned(g.const_data_ptr()));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "simplex_param_backward_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    constexpr int V = kVecBytes / sizeof(scalar_t);
    const int64_t nb = num_blocks(n, vec ? V : 1);
    // partials (K * nb), then d (K); the weights' gradient on its own.
    at::Tensor scratch, grad_w;
    acc_t* partials = nullptr;
    if (logits_requires_grad) {
      scratch = at::empty({K * nb + K}, grad.options().dtype(acc));
      grad_w = at::empty({K}, grad.options().dtype(acc));
      partials = scratch.mutable_data_ptr<acc_t>();
    }
    const acc_t* wp = w.const_data_ptr<acc_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    if (vec) {
      launch_backward<scalar_t, acc_t, V>(gp, xs, grad_inputs, inputs_requires_grad, wp, partials, nb, n, stream);
    } else {
      launch_backward<scalar_t, acc_t, 1>(gp, xs, grad_inputs, inputs_requires_grad, wp, partials, nb, n, stream);
    }
    if (logits_requires_grad) {
      finish_kernel<acc_t><<<1, kThreads, 0, stream>>>(
          partials, nb, K, wp, softmax, static_cast<acc_t>(1.0 / temperature),
          partials + K * nb, grad_w.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      grad_logits = grad_w.to(logits.scalar_type());
    }
  });
  return {grad_logits, grad_inputs};
}

at::Tensor softmax_weighted_sum_cuda(const at::Tensor& logits, at::TensorList inputs, double temperature) {
  check_args(logits, inputs, "logits");
  check_temperature(temperature);
  return forward(logits, inputs, /*softmax=*/true, temperature);
}

at::Tensor weighted_sum_cuda(const at::Tensor& weights, at::TensorList inputs) {
  check_args(weights, inputs, "weights");
  return forward(weights, inputs, /*softmax=*/false, 1.0);
}

std::tuple<at::Tensor, std::vector<at::Tensor>> softmax_weighted_sum_backward_cuda(
    const at::Tensor& grad, const at::Tensor& logits, at::TensorList inputs,
    double temperature, bool logits_requires_grad, const c10::List<bool>& inputs_requires_grad) {
  check_backward_args(grad, logits, inputs, logits_requires_grad, inputs_requires_grad);
  check_temperature(temperature);
  return backward(grad, logits, inputs, true, temperature, logits_requires_grad, inputs_requires_grad);
}

std::tuple<at::Tensor, std::vector<at::Tensor>> weighted_sum_backward_cuda(
    const at::Tensor& grad, const at::Tensor& weights, at::TensorList inputs,
    bool weights_requires_grad, const c10::List<bool>& inputs_requires_grad) {
  check_backward_args(grad, weights, inputs, weights_requires_grad, inputs_requires_grad);
  return backward(grad, weights, inputs, false, 1.0, weights_requires_grad, inputs_requires_grad);
}

} // namespace

TORCH_LIBRARY_IMPL(simplex_param, CUDA, m) {
  m.impl("softmax_weighted_sum", &softmax_weighted_sum_cuda);
  m.impl("weighted_sum", &weighted_sum_cuda);
  m.impl("_softmax_weighted_sum_backward", &softmax_weighted_sum_backward_cuda);
  m.impl("_weighted_sum_backward", &weighted_sum_backward_cuda);
}

} // namespace simplex_param
