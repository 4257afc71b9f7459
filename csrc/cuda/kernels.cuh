// The CUDA kernels of the contraction (contraction.h) and their device
// helpers: device code only, with nothing of ATen's CUDA runtime, so that
// the same source is compiled by nvcc for the GPU (contraction_cuda.cu) and
// by a host compiler against the HIP CPU runtime for the emulation
// (tests/cuda_emulation/). The launches, grid sizes and tables are in
// launch.cuh.
//
// Every operand is walked as a flat array in one layout (layout.h); row r
// of the weights covers [r * row_len, (r + 1) * row_len).
//   forward:  forward_kernel, grid-stride over the elements, reading every
//             input once and writing the output once, with 16-byte vector
//             loads when every pointer is aligned and no vector straddles
//             two rows;
//   backward: backward_kernel, one block per tile (a piece of one row),
//             writing w[r, k] * g for the wanted inputs and, for the
//             weights' gradient, one partial dot product <g, x_k> per tile;
//             then finish_kernel sums each row's partials in a fixed order;
//   mix:      M > 1 outputs (contraction.h): mix_kernel, grid-stride as the
//             forward, each thread writing a chunk of the M outputs from
//             each input vector it loads (the others of its chunk re-read
//             from the cache); the backward's input gradients are the same
//             kernel over the M output gradients, and backward_kernel
//             loops over the M gradients for the weights' gradient;
//   grouped:  one launch per dtype over the tiles of all its groups, driven
//             by a table in device memory (Table); then, for the weights'
//             gradient, one launch of grouped_finish_kernel.
// No floating-point atomics: the same inputs on the same device give the
// same bits, and a group of a grouped call the bits of its own call.
// Every thread of a block reaches every warp_sum and __syncthreads (no
// early return before them): the emulation's shuffle is a block barrier.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

namespace simplex_param {
namespace cuda {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kVecBytes = 16;
// Input pointers per forward launch; more inputs take several launches that
// carry the running sum in an accumulation-type buffer.
constexpr int kFwdChunk = 32;
// Input pointers per backward launch: each thread keeps one dot-product
// accumulator per input of the chunk in registers.
constexpr int kBwdChunk = 16;
// Outputs per mix_kernel launch.
constexpr int kMixOuts = 8;
// Vectors per thread in a backward tile.
constexpr int kTileVecs = 8;

template <typename T, int N>
struct Ptrs {
  T* p[N];
};

// Per input of a chunk: the offset each row adds (contraction.h, x_skip).
template <int N>
struct Skips {
  int64_t s[N];
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

// step(width tag, i) for every element i < n, grid-stride over the threads
// of the launch: vectors of V elements, then the scalar tail.
template <int V, typename F>
__device__ __forceinline__ void grid_stride(int64_t n, F&& step) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t nv = n / V;
  for (int64_t v = tid; v < nv; v += stride) step(std::integral_constant<int, V>{}, v * V);
  for (int64_t i = nv * V + tid; i < n; i += stride) step(std::integral_constant<int, 1>{}, i);
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
  grid_stride<V>(n, step);
}

// One tile of the backward, [begin, end) of one row, for the chunk's kc
// inputs (at most kBwdChunk): dxs[k] = wr[k] * grad where dxs[k] is not
// null, and, when `dst` is not null, dst[k * stride] = <grad, xs[k]> over
// the tile. Called by every thread of the block (it synchronises). end -
// begin is a multiple of V unless the tile ends its contraction.
template <typename scalar_t, typename acc_t, int V>
__device__ __forceinline__ void backward_tile(
    const scalar_t* __restrict__ grad, const Ptrs<const scalar_t, kBwdChunk>& xs,
    const Ptrs<scalar_t, kBwdChunk>& dxs, int kc, const acc_t* __restrict__ wr, int64_t begin, int64_t end,
    acc_t* __restrict__ dst, int64_t stride, bool skip_zero, acc_t (&dots)[kBwdChunk][kWarps]) {
  const bool need_dot = dst != nullptr;
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
    dst[threadIdx.x * stride] = s;
  }
  __syncthreads();  // dots[] is free for the next chunk
}

// Block b does tile (row, piece) = (b / pieces, b % pieces), the elements
// [piece * tile_len, (piece + 1) * tile_len) of its row, for the chunk's
// inputs (each shifted by its row skip) and each of the M outputs'
// gradients (contraction.h: that of output m of row r starts at
// (r * M + m) * row_len; dxs all null when M > 1); the dot products go to partials[((row * M + m) * K + k) * pieces +
// piece] (partials points at the chunk's first input). tile_len and row_len
// are multiples of V unless there is one row.
template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kThreads)
backward_kernel(
    const scalar_t* __restrict__ grad, Ptrs<const scalar_t, kBwdChunk> xs, Skips<kBwdChunk> x_skip,
    Ptrs<scalar_t, kBwdChunk> dxs, int kc, const acc_t* __restrict__ w, int64_t K, int64_t M, int64_t row_len,
    int64_t pieces, int64_t tile_len, acc_t* __restrict__ partials, bool skip_zero) {
  __shared__ acc_t dots[kBwdChunk][kWarps];
  const int64_t row = blockIdx.x / pieces, piece = blockIdx.x % pieces;
  for (int k = 0; k < kc; ++k) {
    if (xs.p[k] != nullptr) xs.p[k] += row * x_skip.s[k];
  }
  const int64_t begin = row * row_len + piece * tile_len;
  const int64_t end = row * row_len + ((piece + 1) * tile_len < row_len ? (piece + 1) * tile_len : row_len);
  for (int64_t m = 0; m < M; ++m) {
    const int64_t shift = (row * (M - 1) + m) * row_len;  // of output m's gradient, indexed as the inputs
    acc_t* dst = partials != nullptr ? partials + (row * M + m) * K * pieces + piece : nullptr;
    backward_tile<scalar_t, acc_t, V>(grad + shift, xs, dxs, kc, w + (row * M + m) * K, begin, end, dst, pieces,
                                      skip_zero, dots);
  }
}

// out_j = sum over the chunk's kc inputs of w[row, j, k] * x_k, for the mc
// outputs j of the chunk (outs.p[j] null: not wanted), plus acc_in, or into
// acc_out when more input chunks follow (the running sums, output j at
// j * n). Weight (row, j, k) is w[row * w_row + j * w_out + k * w_in]; input
// k's element i of row r is xs.p[k][i + r * x_skip.s[k]], output j's
// outs.p[j][i + r * out_skip]: mix's forward has the inputs' row skips
// (contraction.h) and out_skip (M - 1) * row_len; its backward's input
// gradients, the M output gradients as inputs (skips (M - 1) * row_len)
// and the weights transposed. The
// order of arithmetic is forward_kernel's: fma in k order, weight 0 unread.
// V divides row_len.
template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kThreads)
mix_kernel(
    Ptrs<const scalar_t, kFwdChunk> xs, int kc, Skips<kFwdChunk> x_skip, Ptrs<scalar_t, kMixOuts> outs, int mc,
    int64_t out_skip, const acc_t* __restrict__ w, int64_t w_row, int64_t w_out, int64_t w_in, int64_t row_len,
    const acc_t* acc_in, acc_t* acc_out, int64_t n) {
  auto step = [&](auto v_tag, int64_t i) {
    constexpr int VV = decltype(v_tag)::value;
    const int64_t row = i / row_len;
    for (int j = 0; j < mc; ++j) {
      if (outs.p[j] == nullptr) continue;
      const acc_t* wr = w + row * w_row + j * w_out;
      acc_t acc[VV];
#pragma unroll
      for (int q = 0; q < VV; ++q) acc[q] = acc_in != nullptr ? acc_in[j * n + i + q] : acc_t(0);
#pragma unroll 4
      for (int k = 0; k < kc; ++k) {
        const acc_t wk = wr[k * w_in];
        if (wk == acc_t(0)) continue;
        acc_t x[VV];
        load<VV>(xs.p[k] + i + row * x_skip.s[k], x);
#pragma unroll
        for (int q = 0; q < VV; ++q) acc[q] = fma(wk, x[q], acc[q]);
      }
      if (acc_out != nullptr) {
#pragma unroll
        for (int q = 0; q < VV; ++q) acc_out[j * n + i + q] = acc[q];
      } else {
        store<VV>(outs.p[j] + i + row * out_skip, acc);
      }
    }
  };
  grid_stride<V>(n, step);
}

// grad_w[i] = sum over p of partials[i * pieces + p], i < count, one warp
// per i: lane j sums p = j, j + 32, ... in order, then a fixed shuffle tree.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
finish_kernel(const acc_t* __restrict__ partials, int64_t count, int64_t pieces, acc_t* __restrict__ grad_w) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const bool live = i < count;  // the whole warp alike; every thread shuffles
  acc_t s = 0;
  if (live) {
    for (int64_t p = lane; p < pieces; p += 32) s += partials[i * pieces + p];
  }
  s = warp_sum(s);
  if (live && lane == 0) grad_w[i] = s;
}

// The grouped ops: one launch over every group of a dtype, driven by a
// table in device memory, in the style of multi_tensor_apply (which passes
// its table as kernel arguments, and so needs a launch per ~100 tensors).
// Block b finds its group j by binary search in first[], then does tile
// b - first[j] of it, of the group's own tile length. The tiles and every
// sum are those of the single-call kernels above, so a group gets the
// same bits as its own call.
//
// Table (int64): first[G + 1]; G records of kRecord fields; x[G * K];
// grad_x[G * K] (backward). Pointers are stored as integers.
constexpr int kRecord = 8;
enum Field { kN, kW, kData, kGradW, kVec, kTileLen, kPartials, kPieces };

struct Table {
  const int64_t* first;
  const int64_t* rec;
  const int64_t* x;
  const int64_t* grad_x;
  int64_t G, K;

  __device__ int64_t find(int64_t b) const {  // the group j with first[j] <= b < first[j + 1]
    int64_t lo = 0, hi = G;
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) / 2;
      (first[mid] <= b ? lo : hi) = mid;
    }
    return lo;
  }
  template <typename T>
  __device__ T* ptr(const int64_t* base, int64_t j, int64_t k) const {
    return reinterpret_cast<T*>(static_cast<uintptr_t>(base[j * K + k]));
  }
  template <typename T>
  __device__ T* field(int64_t j, Field f) const {
    return reinterpret_cast<T*>(static_cast<uintptr_t>(rec[j * kRecord + f]));
  }
};

template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kThreads) grouped_forward_kernel(Table t) {
  const int64_t j = t.find(blockIdx.x);
  const int64_t* r = t.rec + j * kRecord;
  const int64_t tile_len = r[kTileLen];
  const int64_t begin = (blockIdx.x - t.first[j]) * tile_len;
  const int64_t end = begin + tile_len < r[kN] ? begin + tile_len : r[kN];
  const acc_t* w = t.field<const acc_t>(j, kW);
  scalar_t* out = t.field<scalar_t>(j, kData);
  auto step = [&](auto v_tag, int64_t i) {
    constexpr int VV = decltype(v_tag)::value;
    acc_t acc[VV];
#pragma unroll
    for (int q = 0; q < VV; ++q) acc[q] = acc_t(0);
#pragma unroll 4
    for (int64_t k = 0; k < t.K; ++k) {  // as forward_kernel: fma in k order, weight 0 unread
      const acc_t wk = w[k];
      if (wk == acc_t(0)) continue;
      acc_t x[VV];
      load<VV>(t.ptr<const scalar_t>(t.x, j, k) + i, x);
#pragma unroll
      for (int q = 0; q < VV; ++q) acc[q] = fma(wk, x[q], acc[q]);
    }
    store<VV>(out + i, acc);
  };
  const int64_t vec = r[kVec] ? V : 1;
  const int64_t nv = (end - begin) / vec;
  for (int64_t v = threadIdx.x; v < nv; v += kThreads) {
    if (vec == V) {
      step(std::integral_constant<int, V>{}, begin + v * V);
    } else {
      step(std::integral_constant<int, 1>{}, begin + v);
    }
  }
  for (int64_t i = begin + nv * vec + threadIdx.x; i < end; i += kThreads) step(std::integral_constant<int, 1>{}, i);
}

template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kThreads) grouped_backward_kernel(Table t, bool skip_zero) {
  __shared__ acc_t dots[kBwdChunk][kWarps];
  const int64_t j = t.find(blockIdx.x);
  const int64_t* r = t.rec + j * kRecord;
  const int64_t piece = blockIdx.x - t.first[j], tile_len = r[kTileLen], pieces = r[kPieces];
  const int64_t begin = piece * tile_len;
  const int64_t end = begin + tile_len < r[kN] ? begin + tile_len : r[kN];
  const acc_t* w = t.field<const acc_t>(j, kW);
  const scalar_t* grad = t.field<const scalar_t>(j, kData);
  const bool need_dot = r[kGradW] != 0;
  acc_t* partials = need_dot ? t.field<acc_t>(j, kPartials) : nullptr;
  for (int64_t k0 = 0; k0 < t.K; k0 += kBwdChunk) {  // the chunks of the single-call launches
    const int kc = static_cast<int>(t.K - k0 < kBwdChunk ? t.K - k0 : kBwdChunk);
    Ptrs<const scalar_t, kBwdChunk> xs{};
    Ptrs<scalar_t, kBwdChunk> dxs{};
    bool any = need_dot;
    for (int k = 0; k < kc; ++k) {
      if (need_dot) xs.p[k] = t.ptr<const scalar_t>(t.x, j, k0 + k);
      dxs.p[k] = t.ptr<scalar_t>(t.grad_x, j, k0 + k);
      any = any || dxs.p[k] != nullptr;
    }
    if (!any) continue;  // the same for the whole block
    acc_t* dst = need_dot ? partials + k0 * pieces + piece : nullptr;
    if (r[kVec]) {
      backward_tile<scalar_t, acc_t, V>(grad, xs, dxs, kc, w + k0, begin, end, dst, pieces, skip_zero, dots);
    } else {
      backward_tile<scalar_t, acc_t, 1>(grad, xs, dxs, kc, w + k0, begin, end, dst, pieces, skip_zero, dots);
    }
  }
}

// grad_w of group j, input k = sum over its pieces of its partials, one warp
// per (j, k), as finish_kernel.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) grouped_finish_kernel(Table t) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t j = i / t.K, k = i % t.K;
  // The whole warp alike; every thread shuffles.
  const bool live = i < t.G * t.K && t.rec[j * kRecord + kGradW] != 0;
  acc_t s = 0;
  if (live) {
    const acc_t* p = t.field<const acc_t>(j, kPartials) + k * t.rec[j * kRecord + kPieces];
    for (int64_t q = lane; q < t.rec[j * kRecord + kPieces]; q += 32) s += p[q];
  }
  s = warp_sum(s);
  if (live && lane == 0) t.field<acc_t>(j, kGradW)[k] = s;
}


} // namespace cuda
} // namespace simplex_param
