#include "layout.h"

#include <ATen/Functions.h>

#include <algorithm>

namespace simplex_param {
namespace {

bool walkable(const at::Tensor& t, int64_t row_dims) {
  if (!t.is_non_overlapping_and_dense()) return false;
  int64_t expected = 1;
  for (int64_t i = t.dim() - 1; i >= 0; --i) {
    if (i < row_dims && t.size(i) > 1 && t.stride(i) != expected) return false;
    expected *= t.size(i);
  }
  return true;
}

bool same_layout(const at::Tensor& t, at::IntArrayRef strides) {
  for (int64_t i = 0; i < t.dim(); ++i) {
    if (t.size(i) > 1 && t.stride(i) != strides[i]) return false;
  }
  return true;
}

} // namespace

std::vector<int64_t> walk_strides(at::TensorList tensors, int64_t row_dims) {
  for (const at::Tensor& t : tensors) {
    if (walkable(t, row_dims)) return t.strides().vec();
  }
  const at::Tensor& t0 = tensors[0];
  std::vector<int64_t> strides(t0.dim());
  int64_t expected = 1;
  for (int64_t i = t0.dim() - 1; i >= 0; --i) {
    strides[i] = expected;
    expected *= std::max<int64_t>(t0.size(i), 1);
  }
  return strides;
}

std::optional<int64_t> row_skip(const at::Tensor& t, at::IntArrayRef strides, int64_t row_dims, int64_t row_len) {
  if (t.numel() == 0) return 0;  // nothing is read (and a dimension of size 0 would divide below)
  for (int64_t i = row_dims; i < t.dim(); ++i) {
    if (t.size(i) > 1 && t.stride(i) != strides[i]) return std::nullopt;
  }
  // One stride from row to row: the row dimensions collapse into one.
  std::optional<int64_t> row_stride;
  int64_t later = 1;  // rows per step of dimension i
  for (int64_t i = row_dims - 1; i >= 0; --i) {
    if (t.size(i) > 1) {
      if (t.stride(i) % later != 0) return std::nullopt;
      const int64_t r = t.stride(i) / later;
      if (row_stride && *row_stride != r) return std::nullopt;
      row_stride = r;
    }
    later *= t.size(i);
  }
  return row_stride ? *row_stride - row_len : 0;
}

at::Tensor in_layout(const at::Tensor& t, at::IntArrayRef strides) {
  if (same_layout(t, strides)) return t;
  return at::empty_strided(t.sizes(), strides, t.options()).copy_(t);
}

} // namespace simplex_param
