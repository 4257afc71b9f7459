// The instruction set the CPU kernels run on, and those this CPU can run
// (defined in contraction_cpu.cpp, which picks the kernels at first use).
#pragma once

#include <string>
#include <vector>

namespace simplex_param {
namespace cpu {

// "default", "avx2", "avx512" or "avx512_bf16".
const char* active_capability();
std::vector<std::string> supported_capabilities();

} // namespace cpu
} // namespace simplex_param
