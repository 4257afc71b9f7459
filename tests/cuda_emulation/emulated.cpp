// The CUDA kernels and their launches (csrc/cuda/kernels.cuh, launch.cuh),
// compiled by the host compiler against the HIP CPU runtime and registered
// as the ops of `simplex_param_emulated`, on CPU tensors. The op-level code
// around them (checks, layout, allocation: csrc/contraction.cpp) is the
// same as for the real backends; only the runtime policy differs: "device
// memory" is host memory, each launch runs to completion before the next.
#include "hip_cuda.h"  // first: what kernels.cuh needs of CUDA, after ATen

#include <cstdlib>
#include <tuple>
#include <vector>

#include "contraction.h"
#include "cuda/launch.cuh"
#include "cuda/sinkhorn_launch.cuh"
#include "sinkhorn.h"

namespace simplex_param {
namespace emulation {
namespace {

struct EmulatedRuntime {
  // Few multiprocessors, so that the grid-stride loops take several turns.
  int multiprocessors() const {
    static const int count = [] {
      const char* env = std::getenv("SIMPLEX_PARAM_EMULATED_SMS");
      return env != nullptr && *env != '\0' ? std::atoi(env) : 2;
    }();
    return count;
  }
  at::TensorOptions scratch(at::Device) const {
    return at::TensorOptions().device(at::kCPU);
  }
  // Sinkhorn's backward tape: small, so that a case of a few hundred
  // matrices takes several launches.
  int64_t tape_bytes() const {
    static const int64_t bytes = [] {
      const char* env = std::getenv("SIMPLEX_PARAM_EMULATED_TAPE_BYTES");
      return env != nullptr && *env != '\0' ? std::atoll(env) : int64_t{64} << 10;
    }();
    return bytes;
  }
  at::Tensor host_table(int64_t size) const {
    return at::empty({size}, at::TensorOptions().dtype(at::kLong));
  }
  at::Tensor to_device(const at::Tensor& host, at::Device) const {
    return host.clone();  // a copy, as the upload is
  }
  template <typename... P>
  void launch(void (*kernel)(P...), int64_t blocks, cuda::same_t<P>... args) const {
    TORCH_CHECK(blocks > 0 && blocks < (int64_t{1} << 31), "emulated launch of ", blocks, " blocks");
    hipLaunchKernelGGL(kernel, dim3(static_cast<unsigned>(blocks)), dim3(cuda::kThreads), 0, nullptr, args...);
    TORCH_CHECK(hipDeviceSynchronize() == hipSuccess, "emulated launch failed");
  }
};

void forward_kernel(const Contraction& c) {
  cuda::forward(c, EmulatedRuntime{});
}

void backward_kernel(const Contraction& c) {
  cuda::backward(c, EmulatedRuntime{});
}

void forward_batch(c10::ArrayRef<Contraction> cs) {
  cuda::forward_batch(cs, EmulatedRuntime{});
}

void backward_batch(c10::ArrayRef<Contraction> cs) {
  cuda::backward_batch(cs, EmulatedRuntime{});
}

at::Tensor weighted_sum(const at::Tensor& weights, at::TensorList inputs) {
  return weighted_sum_forward(weights, inputs, forward_kernel);
}

std::tuple<at::Tensor, std::vector<at::Tensor>> weighted_sum_backward_(
    const at::Tensor& grad, const at::Tensor& weights, at::TensorList inputs,
    bool weights_requires_grad, const c10::List<bool>& inputs_requires_grad, bool skip_zero_weights) {
  return weighted_sum_backward(
      grad, weights, inputs, weights_requires_grad, inputs_requires_grad, skip_zero_weights, backward_kernel);
}

at::Tensor mix(const at::Tensor& weights, at::TensorList inputs) {
  return mix_forward(weights, inputs, forward_kernel);
}

std::tuple<at::Tensor, std::vector<at::Tensor>> mix_backward_(
    const at::Tensor& grad, const at::Tensor& weights, at::TensorList inputs, bool weights_requires_grad,
    const c10::List<bool>& inputs_requires_grad) {
  return mix_backward(grad, weights, inputs, weights_requires_grad, inputs_requires_grad, backward_kernel);
}

std::vector<at::Tensor> grouped_weighted_sum(const at::Tensor& weights, at::TensorList inputs) {
  return grouped_weighted_sum_forward(weights, inputs, forward_batch);
}

std::tuple<at::Tensor, std::vector<at::Tensor>> grouped_weighted_sum_backward_(
    at::TensorList grads, const at::Tensor& weights, at::TensorList inputs, bool weights_requires_grad,
    const c10::List<bool>& inputs_requires_grad) {
  return grouped_weighted_sum_backward(
      grads, weights, inputs, weights_requires_grad, inputs_requires_grad, backward_batch);
}

void sinkhorn_kernel(const Sinkhorn& p) {
  cuda::sinkhorn(p, EmulatedRuntime{});
}

at::Tensor sinkhorn(const at::Tensor& logits, int64_t iters, double eps) {
  return cuda::sinkhorn_op(logits, iters, eps, sinkhorn_kernel);
}

at::Tensor sinkhorn_backward_(const at::Tensor& grad, const at::Tensor& logits, int64_t iters, double eps) {
  return cuda::sinkhorn_backward_op(grad, logits, iters, eps, sinkhorn_kernel);
}

} // namespace
} // namespace emulation

// The schemas of csrc/simplex_param.cpp, for the ops with CUDA kernels.
TORCH_LIBRARY(simplex_param_emulated, m) {
  m.def("weighted_sum(Tensor weights, Tensor[] inputs) -> Tensor");
  m.def(
      "_weighted_sum_backward(Tensor grad, Tensor weights, Tensor[] inputs, "
      "bool weights_requires_grad, bool[] inputs_requires_grad, bool skip_zero_weights=False) "
      "-> (Tensor, Tensor[])");
  m.def("mix(Tensor weights, Tensor[] inputs) -> Tensor");
  m.def(
      "_mix_backward(Tensor grad, Tensor weights, Tensor[] inputs, "
      "bool weights_requires_grad, bool[] inputs_requires_grad) -> (Tensor, Tensor[])");
  m.def("grouped_weighted_sum(Tensor weights, Tensor[] inputs) -> Tensor[]");
  m.def(
      "_grouped_weighted_sum_backward(Tensor[] grads, Tensor weights, Tensor[] inputs, "
      "bool weights_requires_grad, bool[] inputs_requires_grad) -> (Tensor, Tensor[])");
  m.def("sinkhorn(Tensor logits, int iters, float eps) -> Tensor");
  m.def("_sinkhorn_backward(Tensor grad, Tensor logits, int iters, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(simplex_param_emulated, CPU, m) {
  m.impl("weighted_sum", &emulation::weighted_sum);
  m.impl("_weighted_sum_backward", &emulation::weighted_sum_backward_);
  m.impl("mix", &emulation::mix);
  m.impl("_mix_backward", &emulation::mix_backward_);
  m.impl("grouped_weighted_sum", &emulation::grouped_weighted_sum);
  m.impl("_grouped_weighted_sum_backward", &emulation::grouped_weighted_sum_backward_);
  m.impl("sinkhorn", &emulation::sinkhorn);
  m.impl("_sinkhorn_backward", &emulation::sinkhorn_backward_);
}

} // namespace simplex_param
