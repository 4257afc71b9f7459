// The Python module simplex_param._C: importing it loads the ops, and its
// functions are direct entry points to them for simplex_param/ops.py.
//
// They call the ops through the dispatcher, exactly as torch.ops does, so
// autograd, dispatch modes and every backend behave the same; they only skip
// the boxed argument parsing of a torch.ops call, which costs several
// microseconds per call with a list of tensors (docs/benchmarks.md,
// "overhead"). Under torch.compile, ops.py calls torch.ops instead.
#include <torch/extension.h>

#include <string>
#include <vector>

#include "contraction.h"
#include "cpu/capability.h"
#include "simplex_ops.h"

namespace {

at::Tensor weighted_sum(const at::Tensor& weights, const std::vector<at::Tensor>& inputs) {
  return simplex_param::call_weighted_sum(weights, inputs);
}

at::Tensor simplex_weighted_sum(
    const at::Tensor& logits, const std::vector<at::Tensor>& inputs, const std::string& map, double temperature,
    c10::optional<double> alpha) {
  return simplex_param::call_simplex_weighted_sum(logits, inputs, map, temperature, alpha);
}

at::Tensor mix(const at::Tensor& weights, const std::vector<at::Tensor>& inputs) {
  return simplex_param::call_mix(weights, inputs);
}

std::vector<at::Tensor> grouped_weighted_sum(const at::Tensor& weights, const std::vector<at::Tensor>& inputs) {
  return simplex_param::call_grouped_weighted_sum(weights, inputs);
}

std::vector<at::Tensor> grouped_simplex_weighted_sum(
    const at::Tensor& logits, const std::vector<at::Tensor>& inputs, const std::string& map, double temperature,
    c10::optional<double> alpha) {
  return simplex_param::call_grouped_simplex_weighted_sum(logits, inputs, map, temperature, alpha);
}

} // namespace

PYBIND11_MODULE(_C, m) {
  // The GIL is released while the op runs, as in a torch.ops call.
  m.def("weighted_sum", &weighted_sum, py::call_guard<py::gil_scoped_release>());
  m.def("simplex_weighted_sum", &simplex_weighted_sum, py::call_guard<py::gil_scoped_release>());
  m.def("mix", &mix, py::call_guard<py::gil_scoped_release>());
  m.def("grouped_weighted_sum", &grouped_weighted_sum, py::call_guard<py::gil_scoped_release>());
  m.def("cpu_capability", &simplex_param::cpu::active_capability,
        "The instruction set of the CPU kernels: default, avx2, avx512 or avx512_bf16.");
  m.def("cpu_capabilities", &simplex_param::cpu::supported_capabilities,
        "The instruction sets this CPU can run the kernels on.");
  m.def("grouped_simplex_weighted_sum", &grouped_simplex_weighted_sum, py::call_guard<py::gil_scoped_release>());
}
