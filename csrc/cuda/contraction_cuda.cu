// The CUDA backend of the contraction: the runtime policy of the launches
// (launch.cuh) on a real GPU, and the ops' CUDA entry points. The kernels
// are in kernels.cuh; the same kernels and launches run on the CPU in the
// emulation (tests/cuda_emulation/, docs/cuda.md).
//
// Launches go to the current stream, with no host synchronisation. The
// grouped ops' tables are copied to the device asynchronously from pinned
// memory (the caching host allocator keeps the buffer until the copy is
// done).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <tuple>
#include <vector>

#include "../contraction.h"
#include "launch.cuh"

namespace simplex_param {
namespace cuda {
namespace {

struct GpuRuntime {
  cudaStream_t stream;

  int multiprocessors() const {
    int dev = 0, count = 0;
    C10_CUDA_CHECK(cudaGetDevice(&dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, dev));
    return count;
  }
  at::TensorOptions scratch(at::Device device) const {
    return at::TensorOptions().device(device);
  }
  at::Tensor host_table(int64_t size) const {
    return at::empty({size}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  }
  at::Tensor to_device(const at::Tensor& host, at::Device device) const {
    return host.to(host.options().device(device), /*non_blocking=*/true);
  }
  template <typename... P>
  void launch(void (*kernel)(P...), int64_t blocks, same_t<P>... args) const {
    kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// The guard and the current stream, then f(runtime).
template <typename F>
void on_device(at::Device device, F&& f) {
  const c10::cuda::CUDAGuard guard(device);
  f(GpuRuntime{c10::cuda::getCurrentCUDAStream()});
}

void forward_kernel_cuda(const Contraction& c) {
  on_device(c.device, [&](const GpuRuntime& rt) { forward(c, rt); });
}

void backward_kernel_cuda(const Contraction& c) {
  on_device(c.device, [&](const GpuRuntime& rt) { backward(c, rt); });
}

void forward_batch_cuda(c10::ArrayRef<Contraction> cs) {
  on_device(cs[0].device, [&](const GpuRuntime& rt) { forward_batch(cs, rt); });
}

void backward_batch_cuda(c10::ArrayRef<Contraction> cs) {
  on_device(cs[0].device, [&](const GpuRuntime& rt) { backward_batch(cs, rt); });
}

at::Tensor weighted_sum_cuda(const at::Tensor& weights, at::TensorList inputs) {
  return weighted_sum_forward(weights, inputs, forward_kernel_cuda);
}

std::tuple<at::Tensor, std::vector<at::Tensor>> weighted_sum_backward_cuda(
    const at::Tensor& grad, const at::Tensor& weights, at::TensorList inputs,
    bool weights_requires_grad, const c10::List<bool>& inputs_requires_grad, bool skip_zero_weights) {
  return weighted_sum_backward(
      grad, weights, inputs, weights_requires_grad, inputs_requires_grad, skip_zero_weights, backward_kernel_cuda);
}

at::Tensor mix_cuda(const at::Tensor& weights, at::TensorList inputs) {
  return mix_forward(weights, inputs, forward_kernel_cuda);
}

std::tuple<at::Tensor, std::vector<at::Tensor>> mix_backward_cuda(
    const at::Tensor& grad, const at::Tensor& weights, at::TensorList inputs, bool weights_requires_grad,
    const c10::List<bool>& inputs_requires_grad) {
  return mix_backward(grad, weights, inputs, weights_requires_grad, inputs_requires_grad, backward_kernel_cuda);
}

std::vector<at::Tensor> grouped_weighted_sum_cuda(const at::Tensor& weights, at::TensorList inputs) {
  return grouped_weighted_sum_forward(weights, inputs, forward_batch_cuda);
}

std::tuple<at::Tensor, std::vector<at::Tensor>> grouped_weighted_sum_backward_cuda(
    at::TensorList grads, const at::Tensor& weights, at::TensorList inputs, bool weights_requires_grad,
    const c10::List<bool>& inputs_requires_grad) {
  return grouped_weighted_sum_backward(
      grads, weights, inputs, weights_requires_grad, inputs_requires_grad, backward_batch_cuda);
}

} // namespace
} // namespace cuda

TORCH_LIBRARY_IMPL(simplex_param, CUDA, m) {
  m.impl("weighted_sum", &cuda::weighted_sum_cuda);
  m.impl("_weighted_sum_backward", &cuda::weighted_sum_backward_cuda);
  m.impl("mix", &cuda::mix_cuda);
  m.impl("_mix_backward", &cuda::mix_backward_cuda);
  m.impl("grouped_weighted_sum", &cuda::grouped_weighted_sum_cuda);
  m.impl("_grouped_weighted_sum_backward", &cuda::grouped_weighted_sum_backward_cuda);
}

} // namespace simplex_param
