// mHC's Sinkhorn normalisation, as every backend's kernels see it, and the
// op-level code the backends share (sinkhorn.cpp). The semantics are those
// of simplex_param/sinkhorn.py, over the last two dimensions of (*P, n, n)
// logits, per matrix:
//
//   y = softmax(x, -1) + eps             the row maximum subtracted first
//   y = y / (colsum(y) + eps)            step 0
//   (iters - 1) times: rows, then columns  steps 1 .. 2 * iters - 2
//
// in float32 for float32, float16 and bfloat16 logits, in float64 for
// float64. The backward (_sinkhorn_backward) runs the same forward again,
// keeping every iterate of one matrix (a few KiB), and back-propagates
// through the steps: for z = y / d, d = sum(y) + eps along the step's
// direction, dL/dy = (g - sum(g * z)) / d along it; then the softmax's
// vector-Jacobian product s * (g - sum(g * s)).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace simplex_param {

struct Sinkhorn {
  int64_t count = 0;             // matrices
  int64_t n = 0;                 // each n x n
  int64_t iters = 1;             // column normalisations (>= 1)
  double eps = 0.0;              // added to the softmax and to every sum
  at::ScalarType dtype;          // the compute dtype, float32 or float64, of every operand below
  at::Device device{at::kCPU};
  const void* logits = nullptr;  // count x n x n, contiguous
  const void* grad = nullptr;    // backward: the output's gradient, same layout
  void* out = nullptr;           // forward: the output; backward: the logits' gradient
};

using SinkhornKernel = void (*)(const Sinkhorn&);

// The number of forward steps (normalisations): 2 * iters - 1.
inline int64_t sinkhorn_steps(int64_t iters) { return 2 * iters - 1; }

// The argument checks of the ops (the texts of sinkhorn.py's _check).
void check_sinkhorn_args(const at::Tensor& logits, int64_t iters, double eps);
void check_sinkhorn_backward_args(const at::Tensor& grad, const at::Tensor& logits, int64_t iters, double eps);

// The ops, for a backend's kernels: checks, conversion to the compute dtype
// (contiguous), allocation, one call of `kernel` unless there is nothing to
// compute, conversion back to the logits' dtype. The results are contiguous.
at::Tensor sinkhorn_forward(const at::Tensor& logits, int64_t iters, double eps, SinkhornKernel kernel);
at::Tensor sinkhorn_backward(
    const at::Tensor& grad, const at::Tensor& logits, int64_t iters, double eps, SinkhornKernel kernel);

// The same computations composed of differentiable ATen ops, with the same
// formulas: the forward, and the backward (differentiable to any order, for
// double backward).
at::Tensor sinkhorn_composite(const at::Tensor& logits, int64_t iters, double eps);
at::Tensor sinkhorn_backward_composite(const at::Tensor& grad, const at::Tensor& logits, int64_t iters, double eps);

// The ops through the dispatcher.
at::Tensor call_sinkhorn(const at::Tensor& logits, int64_t iters, double eps);
at::Tensor call_sinkhorn_backward(const at::Tensor& grad, const at::Tensor& logits, int64_t iters, double eps);

} // namespace simplex_param
