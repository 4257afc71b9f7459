// The layout rule: the kernels walk every operand of one call as a flat
// array, all in one layout, with the weight rows outermost.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <vector>

namespace simplex_param {

// The strides every operand is walked in: those of the first of `tensors`
// that is non-overlapping and dense with its first `row_dims` dimensions
// outermost and in order (so that row r is the flat range
// [r * row_len, (r + 1) * row_len)); the contiguous strides when none is.
std::vector<int64_t> walk_strides(at::TensorList tensors, int64_t row_dims);

// `t` itself when it is laid out in `strides` (compared on the dimensions of
// size > 1 only), else a copy of it in that layout: an input laid out
// unlike the others costs a copy of itself alone.
at::Tensor in_layout(const at::Tensor& t, at::IntArrayRef strides);

} // namespace simplex_param
