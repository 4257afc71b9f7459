// The CPU kernels (kernels.h) built for the instruction set avx2.
#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>
#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#endif

#include "tiles.h"

// GCC only: Clang does not honour #pragma GCC target.
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(_M_X64))
#pragma GCC push_options
#pragma GCC target("avx2")
#define SP_ISA avx2
#define SP_NATIVE_BF16 0
#include "kernels.h"
#pragma GCC pop_options

simplex_param::cpu::IsaKernels simplex_param::cpu::avx2_kernels() {
  return SIMPLEX_PARAM_ISA_KERNELS(simplex_param::cpu::avx2, "avx2");
}
#else
simplex_param::cpu::IsaKernels simplex_param::cpu::avx2_kernels() {
  return {nullptr, {}, {}};  // not built: another compiler or CPU
}
#endif
