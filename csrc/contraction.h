// The contraction out_m = sum_k w[r, m, k] * x_k, m < M, as every backend's
// kernels see it, and the op-level code the backends share (contraction.cpp).
// weighted_sum is its M = 1 case, mix (K inputs to M outputs) the general one.
//
// The inputs' shape S splits into rows P and trailing dimensions: weights
// (*P, K), or (*P, M, K) for mix, give one weight row (M x K) per element of
// P (one row, P empty, for (K,) or (M, K) weights). All operands are walked
// as flat arrays in one layout (layout.h), so row r of an input is the range
// [r * row_len, (r + 1) * row_len); the M outputs (and their gradients) of
// row r follow each other: output m of row r is the range starting at
// (r * M + m) * row_len.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>

#include <tuple>
#include <vector>

#include "dtypes.h"

namespace simplex_param {

struct Contraction {
  int64_t K = 0;
  int64_t M = 1;                    // outputs
  int64_t rows = 1;                 // weight rows
  int64_t row_len = 0;              // elements per row; rows * row_len elements in all
  at::ScalarType dtype;             // of the inputs, output and gradients
  at::Device device{at::kCPU};      // of every operand
  const void* w = nullptr;          // rows x M x K weights, accumulation dtype, contiguous
  std::vector<const void*> x;       // K inputs (backward: empty when grad_w is null)
  std::vector<int64_t> x_skip;      // empty, or per input: its row r starts at
                                    // r * (row_len + x_skip[k])
  void* out = nullptr;              // forward: the M outputs
  const void* grad = nullptr;       // backward: the M outputs' gradient
  std::vector<void*> grad_x;        // backward: K gradients, null where not wanted
  void* grad_w = nullptr;           // backward: rows x M x K, accumulation dtype, or null
  bool skip_zero_weights = false;   // backward: grad_w is 0 where w is, that input unread
  int streams = 16;                 // CPU: input streams per pass of the forward (forward_streams)
  bool stream_stores = false;       // CPU: outputs written with non-temporal stores
                                    // (same bits; opt-in, contraction.cpp)
};

using ContractionKernel = void (*)(const Contraction&);

// CPU: the input streams per pass over the accumulator of a forward whose
// inputs are `bytes` (kernels.h): 16, as many as the kernels take, while
// they fit in the last-level cache. Beyond it, where more concurrent streams
// can slow the reads down: SIMPLEX_PARAM_MEMORY_STREAMS (1 to 16) if set,
// else 8 on Intel CPUs and 4 on others, as measured (docs/benchmarks.md).
int forward_streams(size_t bytes);
// Whether a call writing `bytes` uses non-temporal stores (only when
// SIMPLEX_PARAM_STREAM_BYTES is set and `bytes` exceed it).
bool stream_stores(size_t bytes);
// Several contractions (the groups of a grouped op), in one pass where the
// backend can.
using BatchKernel = void (*)(c10::ArrayRef<Contraction>);

// weighted_sum and mix through the dispatcher (autograd and every backend).
at::Tensor call_weighted_sum(const at::Tensor& weights, at::TensorList inputs);
at::Tensor call_mix(const at::Tensor& weights, at::TensorList inputs);

// The ops, for a backend's kernels: checks, layout, allocation, then one
// call of `kernel` unless there is nothing to compute. Every kernel skips
// the inputs whose weight is exactly 0 in a row: the forward does not read
// them (so inf or NaN there does not reach the output), and the backward
// writes exactly 0 to their gradient there (not 0 * grad).
at::Tensor weighted_sum_forward(const at::Tensor& weights, at::TensorList inputs, ContractionKernel kernel);

std::tuple<at::Tensor, std::vector<at::Tensor>> weighted_sum_backward(
    const at::Tensor& grad,
    const at::Tensor& weights,
    at::TensorList inputs,
    bool weights_requires_grad,
    const c10::List<bool>& inputs_requires_grad,
    bool skip_zero_weights,
    ContractionKernel kernel);

// mix: weights (M, K) or (*P, M, K), the output (*P, M, *rest) for inputs
// (*P, *rest), in the inputs' layout with M inserted after P. The same code
// as weighted_sum's above, with M outputs.
at::Tensor mix_forward(const at::Tensor& weights, at::TensorList inputs, ContractionKernel kernel);

std::tuple<at::Tensor, std::vector<at::Tensor>> mix_backward(
    const at::Tensor& grad,
    const at::Tensor& weights,
    at::TensorList inputs,
    bool weights_requires_grad,
    const c10::List<bool>& inputs_requires_grad,
    ContractionKernel kernel);

// The grouped ops: G contractions of K inputs each, inputs[g * K + k] being
// input k of group g, with (G, K) weights, one row per group. Groups may
// differ in shape and dtype. One call of `kernel`, covering every non-empty
// group.
// The backward returns the gradients of the inputs that require grad only,
// in order: frozen inputs cost nothing.
std::vector<at::Tensor> grouped_weighted_sum_forward(
    const at::Tensor& weights, at::TensorList inputs, BatchKernel kernel);

std::tuple<at::Tensor, std::vector<at::Tensor>> grouped_weighted_sum_backward(
    at::TensorList grads,
    const at::Tensor& weights,
    at::TensorList inputs,
    bool weights_requires_grad,
    const c10::List<bool>& inputs_requires_grad,
    BatchKernel kernel);

// grouped_weighted_sum through the dispatcher.
std::vector<at::Tensor> call_grouped_weighted_sum(const at::Tensor& weights, at::TensorList inputs);

} // namespace simplex_param
