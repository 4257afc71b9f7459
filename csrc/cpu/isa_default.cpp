// The CPU kernels (kernels.h) built for the instruction set default.
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

#define SP_ISA baseline
#define SP_NATIVE_BF16 0
#include "kernels.h"

simplex_param::cpu::IsaKernels simplex_param::cpu::default_kernels() {
  return SIMPLEX_PARAM_ISA_KERNELS(simplex_param::cpu::baseline, "default");
}
