// CUDA kernels of the contraction (contraction.h), forward and backward.
//
// Every operand is walked as a flat array in one layout (layout.h); row r
// of the weights covers [r * row_len, (r + 1) * row_len). Launches go to the
// current stream, with no host synchronisation:
//   forward:  forward_kernel, grid-stride over the elements, reading every
//             input once and writing the output once, with 16-byte vector
//             loads when every pointer is aligned and no vector straddles
//             two rows;
//   backward: backward_kernel, one block per tile (a piece of one row),
//             writing w[r, k] * g for the wanted inputs and, for the
//             weights' gradient, one partial dot product <g, x_k> per tile;
//             then finish_kernel sums each row's partials in a fixed order;
//   grouped:  the launches above, group after group.
// No floating-point atomics: the same inputs on the same device give the
// same bits. The K input pointers travel as kernel arguments, in chunks.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../contraction.h"

namespace simplex_param {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kVecBytes = 16;
// Input pointers per forward launch; more inputs take several launches that
// carry the running sum in an accumulation-type buffer.
constexpr int kFwdChunk = 32;
// Input pointers per backward launch: each thread keeps one dot-product
// accumulator per input of the chunk in registers.
constexpr int kBwdChunk = 16;
// Vectors per thread in a backward tile.
constexpr int kTileVecs = 8;

template <typename T, int N>
struct Ptrs {
  T* p[N];
};

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

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

// out (or acc_out, when more chunks follow) = sum over the chunk's kc inputs
// of w[row, k] * x_k, plus acc_in when given. `w` points at the chunk's
// first column; rows are K apart. V divides row_len unless there is one row.
template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kThreads)
forward_kernel(
    Ptrs<const scalar_t, kFwdChunk> xs, int kc, const acc_t* __restrict__ w, int64_t K, int64_t row_len,
    const acc_t* acc_in, acc_t* acc_out,  // the same buffer in middle chunks
    scalar_t* __restrict__ out, int64_t n) {
  auto step = [&](auto v_tag, int64_t i) {
    constexpr int VV = decltype(v_tag)::value;
    const acc_t* wr = w + (i / row_len) * K;
    acc_t acc[VV];
#pragma unroll
    for (int j = 0; j < VV; ++j) acc[j] = acc_in != nullptr ? acc_in[i + j] : acc_t(0);
#pragma unroll 4
    for (int k = 0; k < kc; ++k) {
      const acc_t wk = wr[k];
      if (wk == acc_t(0)) continue;  // an input of weight 0 is not read
      acc_t x[VV];
      load<VV>(xs.p[k] + i, x);
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

// Block b does tile (row, piece) = (b / pieces, b % pieces), the elements
// [piece * tile_len, (piece + 1) * tile_len) of its row. For every input k
// of the chunk: dxs[k] = w[row, k] * grad where dxs[k] is not null, and,
// when partials is not null, partials[(row * K + k) * pieces + piece] =
// <grad, xs[k]> over the tile. tile_len and row_len are multiples of V
// unless there is one row.
template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kThreads)
backward_kernel(
    const scalar_t* __restrict__ grad, Ptrs<const scalar_t, kBwdChunk> xs, Ptrs<scalar_t, kBwdChunk> dxs,
    int kc, const acc_t* __restrict__ w, int64_t K, int64_t row_len, int64_t pieces, int64_t tile_len,
    acc_t* __restrict__ partials, bool skip_zero) {
  __shared__ acc_t dots[kBwdChunk][kWarps];
  const int64_t row = blockIdx.x / pieces, piece = blockIdx.x % pieces;
  const int64_t begin = row * row_len + piece * tile_len;
  const int64_t end = row * row_len + ((piece + 1) * tile_len < row_len ? (piece + 1) * tile_len : row_len);
  const acc_t* wr = w + row * K;
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
        const acc_t wk = wr[k];  // a zero weight gives exactly 0, also for inf or NaN in grad
#pragma unroll
        for (int j = 0; j < VV; ++j) d[j] = wk == acc_t(0) ? acc_t(0) : wk * g[j];
        store<VV>(dxs.p[k] + i, d);
      }
      if (need_dot && !(skip_zero && wr[k] == acc_t(0))) {
        acc_t x[VV];
        load<VV>(xs.p[k] + i, x);
#pragma unroll
        for (int j = 0; j < VV; ++j) dot[k] = fma(g[j], x[j], dot[k]);
      }
    }
  };
  const int64_t nv = (end - begin) / V;
  for (int64_t v = threadIdx.x; v < nv; v += kThreads) step(std::integral_constant<int, V>{}, begin + v * V);
  for (int64_t i = begin + nv * V + threadIdx.x; i < end; i += kThreads) step(std::integral_constant<int, 1>{}, i);

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
    partials[(row * K + threadIdx.x) * pieces + piece] = s;
  }
}

// grad_w[i] = sum over p of partials[i * pieces + p], i < count, one warp
// per i: lane j sums p = j, j + 32, ... in order, then a fixed shuffle tree.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
finish_kernel(const acc_t* __restrict__ partials, int64_t count, int64_t pieces, acc_t* __restrict__ grad_w) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= count) return;  // whole warps leave together
  acc_t s = 0;
  for (int64_t p = lane; p < pieces; p += 32) s += partials[i * pieces + p];
  s = warp_sum(s);
  if (lane == 0) grad_w[i] = s;
}

bool aligned(const void* p) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % kVecBytes == 0;
}

// Vector width: V when every pointer is aligned and vectors stay in a row.
template <typename scalar_t>
bool vectorizable(const Contraction& c) {
  constexpr int V = kVecBytes / sizeof(scalar_t);
  bool ok = aligned(c.out) && aligned(c.grad) && (c.rows == 1 || c.row_len % V == 0);
  for (const void* p : c.x) ok = ok && aligned(p);
  for (const void* p : c.grad_x) ok = ok && aligned(p);
  return ok;
}

// Blocks of a grid-stride launch: enough to fill the device.
int64_t grid_blocks(int64_t n, int vec) {
  int dev = 0, count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, dev));
  const int64_t wanted = (n / vec + kThreads - 1) / kThreads;
  return std::max<int64_t>(1, std::min<int64_t>(wanted, static_cast<int64_t>(count) * (2048 / kThreads)));
}

template <typename scalar_t, typename acc_t, int V>
void launch_forward(const Contraction& c, cudaStream_t stream) {
  const int64_t n = c.rows * c.row_len;
  const int64_t blocks = grid_blocks(n, V);
  at::Tensor acc_buf;  // the running sum between chunks, when there are several
  if (c.K > kFwdChunk) {
    acc_buf = at::empty({n}, at::TensorOptions().device(c.device).dtype(c10::CppTypeToScalarType<acc_t>::value));
  }
  acc_t* acc = acc_buf.defined() ? acc_buf.mutable_data_ptr<acc_t>() : nullptr;
  const acc_t* w = static_cast<const acc_t*>(c.w);
  for (int64_t k0 = 0; k0 < c.K; k0 += kFwdChunk) {
    const int kc = static_cast<int>(std::min<int64_t>(kFwdChunk, c.K - k0));
    Ptrs<const scalar_t, kFwdChunk> xs{};
    for (int k = 0; k < kc; ++k) xs.p[k] = static_cast<const scalar_t*>(c.x[k0 + k]);
    const bool last = k0 + kc == c.K;
    forward_kernel<scalar_t, acc_t, V><<<blocks, kThreads, 0, stream>>>(
        xs, kc, w + k0, c.K, c.row_len, k0 == 0 ? nullptr : acc, last ? nullptr : acc,
        static_cast<scalar_t*>(c.out), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename scalar_t, typename acc_t, int V>
void launch_backward(const Contraction& c, cudaStream_t stream) {
  const int64_t tile_len = int64_t{kThreads} * V * kTileVecs;
  const int64_t pieces = std::max<int64_t>(1, (c.row_len + tile_len - 1) / tile_len);
  const int64_t blocks = c.rows * pieces;
  TORCH_CHECK(blocks < (int64_t{1} << 31), "simplex_param: too many rows for one CUDA launch: ", c.rows);
  const bool need_dot = c.grad_w != nullptr;
  at::Tensor partials;
  if (need_dot) {
    partials = at::empty(
        {c.rows * c.K * pieces}, at::TensorOptions().device(c.device).dtype(c10::CppTypeToScalarType<acc_t>::value));
  }
  const acc_t* w = static_cast<const acc_t*>(c.w);
  for (int64_t k0 = 0; k0 < c.K; k0 += kBwdChunk) {
    const int kc = static_cast<int>(std::min<int64_t>(kBwdChunk, c.K - k0));
    Ptrs<const scalar_t, kBwdChunk> xs{};
    Ptrs<scalar_t, kBwdChunk> dxs{};
    bool any = need_dot;
    for (int k = 0; k < kc; ++k) {
      if (need_dot) xs.p[k] = static_cast<const scalar_t*>(c.x[k0 + k]);
      dxs.p[k] = static_cast<scalar_t*>(c.grad_x[k0 + k]);
      any = any || dxs.p[k] != nullptr;
    }
    if (!any) continue;  // nothing of this chunk is wanted
    backward_kernel<scalar_t, acc_t, V><<<blocks, kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(c.grad), xs, dxs, kc, w + k0, c.K, c.row_len, pieces, tile_len,
        need_dot ? partials.mutable_data_ptr<acc_t>() + k0 * pieces : nullptr, c.skip_zero_weights);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (need_dot) {
    const int64_t count = c.rows * c.K;
    TORCH_CHECK((count + kWarps - 1) / kWarps < (int64_t{1} << 31),
                "simplex_param: too many weights for one CUDA launch: ", count);
    finish_kernel<acc_t><<<(count + kWarps - 1) / kWarps, kThreads, 0, stream>>>(
        partials.const_data_ptr<acc_t>(), count, pieces, static_cast<acc_t*>(c.grad_w));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void forward_kernel_cuda(const Contraction& c) {
  const c10::cuda::CUDAGuard guard(c.device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.dtype, "simplex_param_forward_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    constexpr int V = kVecBytes / sizeof(scalar_t);
    if (vectorizable<scalar_t>(c)) {
      launch_forward<scalar_t, acc_t, V>(c, stream);
    } else {
      launch_forward<scalar_t, acc_t, 1>(c, stream);
    }
  });
}

void backward_kernel_cuda(const Contraction& c) {
  const c10::cuda::CUDAGuard guard(c.device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.dtype, "simplex_param_backward_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    constexpr int V = kVecBytes / sizeof(scalar_t);
    if (vectorizable<scalar_t>(c)) {
      launch_backward<scalar_t, acc_t, V>(c, stream);
    } else {
      launch_backward<scalar_t, acc_t, 1>(c, stream);
    }
  });
}

at::Tensor weighted_sum_cuda(const at::Tensor& weights, at::TensorList inputs) {
  return weighted_sum_forward(weights, inputs, forward_kernel_cuda);
}

std::tuple<at::Tensor, std::vector<at::Tensor>> weighted_sum_backward_cuda(
    const at::Tensor& grad, const at::Tensor& weights, at::TensorList inputs,
    bool weights_requires_grad, const c10::List<bool>& inputs_requires_grad, bool skip_zero_weights) {
  return weighted_sum_backward(
      grad, weights, inputs, weights_requires_grad, inputs_requires_grad, skip_zero_weights, backward_kernel_cuda);
}

// The grouped ops: the groups' kernels one after the other on the stream
// (not yet one launch over a chunk table, as multi_tensor_apply does).
void forward_batch_cuda(c10::ArrayRef<Contraction> cs) {
  for (const Contraction& c : cs) forward_kernel_cuda(c);
}

void backward_batch_cuda(c10::ArrayRef<Contraction> cs) {
  for (const Contraction& c : cs) backward_kernel_cuda(c);
}

std::vector<at::Tensor> grouped_weighted_sum_cuda(const at::Tensor& weights, at::TensorList inputs) {
  return grouped_weighted_sum_forward(weights, inputs, forward_batch_cuda);
}

std::tuple<at::Tensor, std::vector<at::Tensor>> grouped_weighted_sum_backward_cuda(
    at::TensorList grads, const at::Tensor& weights, at::TensorList inputs, bool weights_requires_grad,
    const c10::List<bool>& inputs_requires_grad) {
  return grouped_weighted_sum_backward(
      grads, weights, inputs, weights_requires_grad, inputs_requires_grad, backward_batch_cuda);
}

} // namespace

TORCH_LIBRARY_IMPL(simplex_param, CUDA, m) {
  m.impl("weighted_sum", &weighted_sum_cuda);
  m.impl("_weighted_sum_backward", &weighted_sum_backward_cuda);
  m.impl("grouped_weighted_sum", &grouped_weighted_sum_cuda);
  m.impl("_grouped_weighted_sum_backward", &grouped_weighted_sum_backward_cuda);
}

} // namespace simplex_param
