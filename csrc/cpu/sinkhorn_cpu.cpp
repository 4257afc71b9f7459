// CPU kernels of the Sinkhorn ops (../sinkhorn.h): the kernels of
// sinkhorn_kernels.h built for three instruction sets in this one file, the
// one to run chosen as the contraction's is (SIMPLEX_PARAM_CPU_CAPABILITY,
// else the best the CPU has; capability.h), and the CPU registrations.
//
// Parallel over blocks of matrices with at::parallel_for; every matrix is
// computed on its own, in an order fixed by n, so the bits depend neither on
// the thread count nor on the instruction set.
#include <ATen/Parallel.h>
#include <c10/core/ScalarType.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../sinkhorn.h"
#include "capability.h"

#define SP_SINK_ISA baseline
#include "sinkhorn_kernels.h"
#undef SP_SINK_ISA

// GCC only: Clang does not honour #pragma GCC target.
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(_M_X64))
#define SP_SINK_X86 1
#pragma GCC push_options
#pragma GCC target("avx2")
#define SP_SINK_ISA avx2
#include "sinkhorn_kernels.h"
#undef SP_SINK_ISA
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")
#define SP_SINK_ISA avx512
#include "sinkhorn_kernels.h"
#undef SP_SINK_ISA
#pragma GCC pop_options
#else
#define SP_SINK_X86 0
#endif

namespace simplex_param {
namespace cpu {
namespace {

struct SinkhornKernels {
  SinkhornKernel forward, backward;
};

// The set named by active_capability() (the contraction's choice, which
// has checked that this CPU runs it).
SinkhornKernels choose() {
#if SP_SINK_X86
  const std::string isa = active_capability();
  if (isa == "avx512" || isa == "avx512_bf16") return {avx512::forward, avx512::backward};
  if (isa == "avx2") return {avx2::forward, avx2::backward};
#endif
  return {baseline::forward, baseline::backward};
}

const SinkhornKernels& kernels() {
  static const SinkhornKernels k = choose();
  return k;
}

at::Tensor sinkhorn_cpu(const at::Tensor& logits, int64_t iters, double eps) {
  return sinkhorn_forward(logits, iters, eps, kernels().forward);
}

at::Tensor sinkhorn_backward_cpu(const at::Tensor& grad, const at::Tensor& logits, int64_t iters, double eps) {
  return sinkhorn_backward(grad, logits, iters, eps, kernels().backward);
}

} // namespace

TORCH_LIBRARY_IMPL(simplex_param, CPU, m) {
  m.impl("sinkhorn", &sinkhorn_cpu);
  m.impl("_sinkhorn_backward", &sinkhorn_backward_cpu);
}

} // namespace cpu
} // namespace simplex_param
