// What the CUDA kernels (csrc/cuda/kernels.cuh) need of CUDA, on the HIP CPU
// runtime: each block runs as fibers on one host thread, __syncthreads() is
// a fiber barrier and __shared__ is thread_local (docs/cuda.md).
//
// HIP-CPU's own __shfl_down(v, d, 32) is wrong for lanes 32..63 of its
// 64-lane warps (it compares the absolute lane with the width), and it has
// no *_sync variants. __shfl_down_sync below is the 32-lane shuffle of CUDA
// built on the block barrier: every thread of the block must call it, as
// every thread of a full warp must on a GPU with the full mask.
#pragma once

// ATen's and c10's headers before HIP's: hip_runtime.h defines __HIPCC__,
// which would make them include thrust and the ROCm headers.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <hip/hip_runtime.h>
#undef __HIPCC__
#undef __HIP__

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

// fma(float, float, float) must be the single-rounding float overload, as on
// the GPU, not the double one.
using std::fma;

namespace simplex_param {
namespace emulation {

constexpr int kMaxBlockThreads = 1024;
constexpr int kWarpSize = 32;

// One slot per thread of the block running on this host thread.
inline unsigned char* shuffle_slots() {
  alignas(16) static thread_local unsigned char slots[kMaxBlockThreads * 16];
  return slots;
}

inline int linear_thread_index() {
  return static_cast<int>(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z));
}

} // namespace emulation
} // namespace simplex_param

// CUDA's __shfl_down_sync with the full mask and width 32: lane l gets the
// value of lane l + delta of its warp, or its own when l + delta >= 32.
template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 16, "emulated shuffle of an unsupported type");
  using namespace simplex_param::emulation;
  TORCH_CHECK(mask == 0xffffffffu, "emulated __shfl_down_sync: only the full mask is emulated");
  const int t = linear_thread_index();
  const int lane = t % kWarpSize;
  unsigned char* slots = shuffle_slots();
  std::memcpy(slots + t * 16, &value, sizeof(T));
  __syncthreads();
  T result = value;
  if (lane + static_cast<int>(delta) < kWarpSize) std::memcpy(&result, slots + (t + delta) * 16, sizeof(T));
  __syncthreads();  // the slots are free for the next shuffle
  return result;
}
