// The launches of the Sinkhorn CUDA kernels (sinkhorn_kernels.cuh): one
// source for the GPU build (sinkhorn_cuda.cu) and for the emulation on the
// CPU (tests/cuda_emulation/), templated on the runtime policy R of
// launch.cuh (scratch(), launch()), which also says how many bytes the
// backward's tape may take at a time:
//
//   int64_t tape_bytes() const;                  kSinkhornTapeBytes on a GPU
//
// One thread per matrix, kThreads a block. n > kSinkhornMaxN has no kernel:
// the CUDA entry points run the composite of ATen ops for it
// (sinkhorn_composite and sinkhorn_backward_composite of ../sinkhorn.h).
// The backward's tape (sk_tape_entries values per matrix) is allocated for
// at most rt.tape_bytes() at a time: more matrices take several launches
// over consecutive ranges, so the backward's extra memory is bounded
// whatever the batch (it grows with iters only up to that bound).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

#include "../sinkhorn.h"
#include "launch.cuh"
#include "sinkhorn_kernels.cuh"

namespace simplex_param {
namespace cuda {

constexpr int64_t kSinkhornTapeBytes = int64_t{64} << 20;

inline bool sinkhorn_has_kernel(int64_t n) { return n >= 1 && n <= kSinkhornMaxN; }

template <int N, typename A, typename R>
void launch_sinkhorn(const Sinkhorn& p, const R& rt) {
  const int64_t steps = sinkhorn_steps(p.iters);
  const A eps = static_cast<A>(p.eps);
  const A* x = static_cast<const A*>(p.logits);
  A* out = static_cast<A*>(p.out);
  if (p.grad == nullptr) {
    const int64_t blocks = (p.count + kThreads - 1) / kThreads;
    TORCH_CHECK(blocks < (int64_t{1} << 31), "simplex_param: too many matrices for one CUDA launch: ", p.count);
    rt.launch(&sinkhorn_forward_kernel<N, A>, blocks, x, out, p.count, steps, eps);
    return;
  }
  const int64_t per_matrix = sk_tape_entries<N>(steps) * static_cast<int64_t>(sizeof(A));
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(p.count, rt.tape_bytes() / per_matrix));
  at::Tensor tape = at::empty({chunk * sk_tape_entries<N>(steps)}, rt.scratch(p.device).dtype(p.dtype));
  const A* grad = static_cast<const A*>(p.grad);
  for (int64_t first = 0; first < p.count; first += chunk) {
    const int64_t count = std::min<int64_t>(chunk, p.count - first);
    const int64_t offset = first * N * N;
    rt.launch(&sinkhorn_backward_kernel<N, A>, (count + kThreads - 1) / kThreads, x + offset, grad + offset,
              out + offset, count, steps, eps, tape.mutable_data_ptr<A>());
  }
}

template <typename A, typename R>
void sinkhorn_by_size(const Sinkhorn& p, const R& rt) {
  switch (p.n) {
#define SP_SINK_CUDA_CASE(n) \
  case n: return launch_sinkhorn<n, A>(p, rt);
    SP_SINK_CUDA_CASE(1) SP_SINK_CUDA_CASE(2) SP_SINK_CUDA_CASE(3) SP_SINK_CUDA_CASE(4) SP_SINK_CUDA_CASE(5)
    SP_SINK_CUDA_CASE(6) SP_SINK_CUDA_CASE(7) SP_SINK_CUDA_CASE(8) SP_SINK_CUDA_CASE(9) SP_SINK_CUDA_CASE(10)
    SP_SINK_CUDA_CASE(11) SP_SINK_CUDA_CASE(12) SP_SINK_CUDA_CASE(13) SP_SINK_CUDA_CASE(14)
    SP_SINK_CUDA_CASE(15) SP_SINK_CUDA_CASE(16)
#undef SP_SINK_CUDA_CASE
    default: TORCH_CHECK(false, "simplex_param: no CUDA Sinkhorn kernel for n = ", p.n);
  }
}

// The forward (p.grad null) or the backward of p, n <= kSinkhornMaxN.
template <typename R>
void sinkhorn(const Sinkhorn& p, const R& rt) {
  if (p.dtype == at::kDouble) return sinkhorn_by_size<double>(p, rt);
  TORCH_CHECK(p.dtype == at::kFloat, "simplex_param: the Sinkhorn kernels compute in float32 or float64, got ",
              p.dtype);
  return sinkhorn_by_size<float>(p, rt);
}

// The ops' entry points for a backend whose runtime is R (the caller has set
// the device guard): the kernels for n <= kSinkhornMaxN, the composite above.
inline at::Tensor sinkhorn_op(const at::Tensor& logits, int64_t iters, double eps, SinkhornKernel kernel) {
  check_sinkhorn_args(logits, iters, eps);
  if (!sinkhorn_has_kernel(logits.size(-1)) && logits.numel() > 0) {
    return sinkhorn_composite(logits, iters, eps).contiguous();
  }
  return sinkhorn_forward(logits, iters, eps, kernel);
}

inline at::Tensor sinkhorn_backward_op(
    const at::Tensor& grad, const at::Tensor& logits, int64_t iters, double eps, SinkhornKernel kernel) {
  check_sinkhorn_backward_args(grad, logits, iters, eps);
  if (!sinkhorn_has_kernel(logits.size(-1)) && logits.numel() > 0) {
    return sinkhorn_backward_composite(grad, logits, iters, eps).contiguous();
  }
  return sinkhorn_backward(grad, logits, iters, eps, kernel);
}

} // namespace cuda
} // namespace simplex_param
