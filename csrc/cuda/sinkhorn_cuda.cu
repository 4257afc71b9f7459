// The CUDA backend of the Sinkhorn ops: the runtime policy of the launches
// (sinkhorn_launch.cuh) on a real GPU, and the ops' CUDA entry points. The
// kernels are in sinkhorn_kernels.cuh; the same kernels and launches run on
// the CPU in the emulation (tests/cuda_emulation/, docs/cuda.md).
//
// Entry points in torchvision's order: checks (sinkhorn_op), the device
// guard, the current stream, nothing launched for zero matrices
// (sinkhorn_forward / sinkhorn_backward of ../sinkhorn.cpp), launch, launch
// check. No host synchronisation.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include "../sinkhorn.h"
#include "sinkhorn_launch.cuh"

namespace simplex_param {
namespace cuda {
namespace {

struct SinkhornGpuRuntime {
  cudaStream_t stream;

  at::TensorOptions scratch(at::Device device) const {
    return at::TensorOptions().device(device);
  }
  int64_t tape_bytes() const { return kSinkhornTapeBytes; }
  template <typename... P>
  void launch(void (*kernel)(P...), int64_t blocks, same_t<P>... args) const {
    kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

void sinkhorn_kernel_cuda(const Sinkhorn& p) {
  const c10::cuda::CUDAGuard guard(p.device);
  sinkhorn(p, SinkhornGpuRuntime{c10::cuda::getCurrentCUDAStream()});
}

at::Tensor sinkhorn_cuda(const at::Tensor& logits, int64_t iters, double eps) {
  const c10::cuda::CUDAGuard guard(logits.device());
  return sinkhorn_op(logits, iters, eps, sinkhorn_kernel_cuda);
}

at::Tensor sinkhorn_backward_cuda(const at::Tensor& grad, const at::Tensor& logits, int64_t iters, double eps) {
  const c10::cuda::CUDAGuard guard(logits.device());
  return sinkhorn_backward_op(grad, logits, iters, eps, sinkhorn_kernel_cuda);
}

} // namespace
} // namespace cuda

TORCH_LIBRARY_IMPL(simplex_param, CUDA, m) {
  m.impl("sinkhorn", &cuda::sinkhorn_cuda);
  m.impl("_sinkhorn_backward", &cuda::sinkhorn_backward_cuda);
}

} // namespace simplex_param
