#include "layout.h"

#include <ATen/Functions.h>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

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

at::Tensor in_layout(const at::Tensor& t, at::IntArrayRef strides) {
  if (same_layout(t, strides)) return t;
  return at::empty_strided(t.sizes(), strides, t.options()).copy_(t);
}

at::Tensor empty_output(at::IntArrayRef sizes, at::IntArrayRef strides, const at::TensorOptions& options) {
  at::Tensor t = at::empty_strided(sizes, strides, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr size_t kLarge = size_t{4} << 20;
  const size_t bytes = t.storage().nbytes();
  if (t.is_cpu() && bytes >= kLarge) {
    const auto page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
    const auto begin = reinterpret_cast<uintptr_t>(t.storage().mutable_data());
    const uintptr_t first = (begin + page - 1) / page * page, last = (begin + bytes) / page * page;
    // Advice only: where transparent huge pages are off, nothing changes.
    if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  return t;
}

} // namespace simplex_param
