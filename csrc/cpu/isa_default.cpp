// The CPU kernels (kernels.h) built for the instruction set default.
#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "tiles.h"

#define SP_ISA baseline
#define SP_NATIVE_BF16 0
#include "kernels.h"

simplex_param::cpu::IsaKernels simplex_param::cpu::default_kernels() {
  return SIMPLEX_PARAM_ISA_KERNELS(simplex_param::cpu::baseline, "default");
}
