// The layout rule: the kernels walk every operand of one call as a flat
// array, all in one layout, with the weight rows outermost.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <optional>
#include <vector>

namespace simplex_param {

// The strides every operand is walked in: those of the first of `tensors`
// that is non-overlapping and dense with its first `row_dims` dimensions
// outermost and in order (so that row r is the flat range
// [r * row_len, (r + 1) * row_len)); the contiguous strides when none is.
std::vector<int64_t> walk_strides(at::TensorList tensors, int64_t row_dims);

// For an input that is only read: the offset, in elements, that each of its
// rows adds to where `strides` would put the next (row r then starts at
// r * (row_len + skip)), when its trailing dimensions are laid out in
// `strides` and its first `row_dims` step by one stride, however it
// compares with row_len (0: the rows repeat, as an expanded input's);
// nothing otherwise. A slice of a stacked tensor (one stream of a residual
// (tokens, n, C)) is read in place this way.
std::optional<int64_t> row_skip(const at::Tensor& t, at::IntArrayRef strides, int64_t row_dims, int64_t row_len);

// `t` itself when it is laid out in `strides` (compared on the dimensions of
// size > 1 only), else a copy of it in that layout: an input laid out
// unlike the others costs a copy of itself alone.
at::Tensor in_layout(const at::Tensor& t, at::IntArrayRef strides);

} // namespace simplex_param
