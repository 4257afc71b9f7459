// The CUDA kernels of the Sinkhorn normalisation (../sinkhorn.h): device
// code only, as kernels.cuh, so that nvcc compiles it for the GPU
// (sinkhorn_cuda.cu) and a host compiler against the HIP CPU runtime for the
// emulation (tests/cuda_emulation/). The launches are in sinkhorn_launch.cuh.
//
// One thread per matrix, n <= 16 a template argument N, the matrix in a
// local array (registers for small n). The order of operations is that of
// the CPU kernels (csrc/cpu/sinkhorn_kernels.h): every sum in index order,
// each step a true division. The backward runs the forward again, writing
// the softmax, every step's output and its denominators to a tape in global
// memory (entry e of matrix j at tape[e * count + j], so that a warp's
// accesses are coalesced), then goes back through the steps.
// No barriers and no atomics: a thread past the last matrix returns.
#pragma once

#include <cstdint>

#include "kernels.cuh"

namespace simplex_param {
namespace cuda {

// The largest n with a kernel; larger matrices run the composite (sinkhorn_launch.cuh).
constexpr int kSinkhornMaxN = 16;

__device__ __forceinline__ float sk_exp(float x) { return expf(x); }
__device__ __forceinline__ double sk_exp(double x) { return exp(x); }

// Row softmax of m, in place, the row maximum subtracted first.
template <int N, typename A>
__device__ __forceinline__ void sk_softmax(A* m) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    A mx = m[i * N];
#pragma unroll
    for (int j = 1; j < N; ++j) mx = mx < m[i * N + j] ? m[i * N + j] : mx;
#pragma unroll
    for (int j = 0; j < N; ++j) m[i * N + j] = sk_exp(m[i * N + j] - mx);
    A sum = m[i * N];
#pragma unroll
    for (int j = 1; j < N; ++j) sum += m[i * N + j];
#pragma unroll
    for (int j = 0; j < N; ++j) m[i * N + j] /= sum;
  }
}

// Step k, in place: m / (sum + eps) over columns (k even) or rows (k odd);
// d gets the N denominators.
template <int N, typename A>
__device__ __forceinline__ void sk_normalize(A* m, A* d, int64_t k, A eps) {
  if (k % 2 == 0) {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      A s = m[j];
#pragma unroll
      for (int i = 1; i < N; ++i) s += m[i * N + j];
      d[j] = s + eps;
    }
#pragma unroll
    for (int i = 0; i < N; ++i) {
#pragma unroll
      for (int j = 0; j < N; ++j) m[i * N + j] /= d[j];
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      A s = m[i * N];
#pragma unroll
      for (int j = 1; j < N; ++j) s += m[i * N + j];
      d[i] = s + eps;
#pragma unroll
      for (int j = 0; j < N; ++j) m[i * N + j] /= d[i];
    }
  }
}

// The vector-Jacobian product of step k, in place on g: z the step's output,
// d its denominators; g = (g - sum(g * z)) / d along the step's direction.
template <int N, typename A>
__device__ __forceinline__ void sk_normalize_vjp(A* g, const A* z, const A* d, int64_t k) {
  if (k % 2 == 0) {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      A t = g[j] * z[j];
#pragma unroll
      for (int i = 1; i < N; ++i) t += g[i * N + j] * z[i * N + j];
#pragma unroll
      for (int i = 0; i < N; ++i) g[i * N + j] = (g[i * N + j] - t) / d[j];
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      A t = g[i * N] * z[i * N];
#pragma unroll
      for (int j = 1; j < N; ++j) t += g[i * N + j] * z[i * N + j];
#pragma unroll
      for (int j = 0; j < N; ++j) g[i * N + j] = (g[i * N + j] - t) / d[i];
    }
  }
}

template <int N, typename A>
__global__ void sinkhorn_forward_kernel(const A* x, A* out, int64_t count, int64_t steps, A eps) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= count) return;
  A m[N * N], d[N];
  const A* xj = x + j * (N * N);
#pragma unroll
  for (int e = 0; e < N * N; ++e) m[e] = xj[e];
  sk_softmax<N>(m);
#pragma unroll
  for (int e = 0; e < N * N; ++e) m[e] += eps;
  for (int64_t k = 0; k < steps; ++k) sk_normalize<N>(m, d, k, eps);
  A* oj = out + j * (N * N);
#pragma unroll
  for (int e = 0; e < N * N; ++e) oj[e] = m[e];
}

// The tape of `count` matrices: the softmax (N * N entries), then each
// step's output (steps * N * N), then each step's denominators (steps * N).
template <int N>
constexpr int64_t sk_tape_entries(int64_t steps) {
  return (steps + 1) * N * N + steps * N;
}

template <int N, typename A>
__global__ void sinkhorn_backward_kernel(
    const A* x, const A* grad, A* out, int64_t count, int64_t steps, A eps, A* tape) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= count) return;
  A* t = tape + j;  // entry e at t[e * count]
  const int64_t z0 = N * N, d0 = (steps + 1) * N * N;
  A m[N * N], d[N];
  const A* xj = x + j * (N * N);
#pragma unroll
  for (int e = 0; e < N * N; ++e) m[e] = xj[e];
  sk_softmax<N>(m);
#pragma unroll
  for (int e = 0; e < N * N; ++e) {
    t[e * count] = m[e];
    m[e] += eps;
  }
  for (int64_t k = 0; k < steps; ++k) {
    sk_normalize<N>(m, d, k, eps);
#pragma unroll
    for (int e = 0; e < N * N; ++e) t[(z0 + k * N * N + e) * count] = m[e];
#pragma unroll
    for (int i = 0; i < N; ++i) t[(d0 + k * N + i) * count] = d[i];
  }
  A g[N * N];
  const A* gj = grad + j * (N * N);
#pragma unroll
  for (int e = 0; e < N * N; ++e) g[e] = gj[e];
  for (int64_t k = steps - 1; k >= 0; --k) {
#pragma unroll
    for (int e = 0; e < N * N; ++e) m[e] = t[(z0 + k * N * N + e) * count];
#pragma unroll
    for (int i = 0; i < N; ++i) d[i] = t[(d0 + k * N + i) * count];
    sk_normalize_vjp<N>(g, m, d, k);
  }
  // The softmax's vector-Jacobian product, row by row: s * (g - sum(g * s)).
#pragma unroll
  for (int e = 0; e < N * N; ++e) m[e] = t[e * count];
  A* oj = out + j * (N * N);
#pragma unroll
  for (int i = 0; i < N; ++i) {
    A s = g[i * N] * m[i * N];
#pragma unroll
    for (int c = 1; c < N; ++c) s += g[i * N + c] * m[i * N + c];
#pragma unroll
    for (int c = 0; c < N; ++c) oj[i * N + c] = m[i * N + c] * (g[i * N + c] - s);
  }
}

} // namespace cuda
} // namespace simplex_param
