#include "validation.h"

#include <c10/util/Exception.h>

#include <charconv>
#include <cmath>
#include <sstream>

namespace simplex_param {
namespace {

// Python's spelling of a dtype, as in the fallback's messages.
std::string py_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kByte: return "torch.uint8";
    case at::kChar: return "torch.int8";
    case at::kShort: return "torch.int16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kBool: return "torch.bool";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(t);
  }
}

// Python's repr() of a float: shortest round trip, with ".0" on integers.
std::string py_float(double x) {
  if (std::isnan(x)) return "nan";
  if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof(buf), x);
  std::string s(buf, res.ptr);
  if (s.find_first_of(".e") == std::string::npos) s += ".0";
  return s;
}

std::string py_shape(at::IntArrayRef sizes) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < sizes.size(); ++i) os << (i ? ", " : "") << sizes[i];
  os << "]";
  return os.str();
}

} // namespace

void check_args(const at::Tensor& weights, at::TensorList inputs, const char* name) {
  const auto K = static_cast<int64_t>(inputs.size());
  TORCH_CHECK_VALUE(K >= 1, "inputs must contain at least one tensor");
  TORCH_CHECK_VALUE(
      weights.dim() == 1, name, " must be a 1-D tensor, got a tensor of ",
      weights.dim(), " dimensions");
  TORCH_CHECK_TYPE(
      at::isFloatingType(weights.scalar_type()), name,
      " must have a floating dtype, got ", py_dtype(weights.scalar_type()));
  TORCH_CHECK_VALUE(
      weights.size(0) == K, name, " has ", weights.size(0),
      " entries but inputs has ", K, " tensors");
  const at::Tensor& x0 = inputs[0];
  TORCH_CHECK_TYPE(
      at::isFloatingType(x0.scalar_type()),
      "inputs[0] must have a floating dtype, got ", py_dtype(x0.scalar_type()));
  for (int64_t k = 1; k < K; ++k) {
    const at::Tensor& x = inputs[k];
    TORCH_CHECK_TYPE(
        x.scalar_type() == x0.scalar_type(), "inputs[", k, "] has dtype ",
        py_dtype(x.scalar_type()), " but inputs[0] has dtype ",
        py_dtype(x0.scalar_type()));
    TORCH_CHECK_VALUE(
        x.sizes().equals(x0.sizes()), "inputs[", k, "] has shape ",
        py_shape(x.sizes()), " but inputs[0] has shape ", py_shape(x0.sizes()));
    TORCH_CHECK_VALUE(
        x.device() == x0.device(), "inputs[", k, "] is on device ", x.device().str(),
        " but inputs[0] is on device ", x0.device().str());
  }
  TORCH_CHECK_VALUE(
      weights.device() == x0.device(), name, " is on device ", weights.device().str(),
      " but inputs are on device ", x0.device().str());
}

void check_temperature(double temperature) {
  TORCH_CHECK_VALUE(
      std::isfinite(temperature) && temperature > 0,
      "temperature must be a positive finite number, got ", py_float(temperature));
}

void check_backward_args(
    const at::Tensor& grad,
    const at::Tensor& weights,
    at::TensorList inputs,
    bool weights_requires_grad,
    const c10::List<bool>& inputs_requires_grad) {
  const int64_t K = weights.dim() == 1 ? weights.size(0) : -1;
  TORCH_CHECK_VALUE(K >= 1, "weights must be a non-empty 1-D tensor");
  TORCH_CHECK_VALUE(
      static_cast<int64_t>(inputs_requires_grad.size()) == K,
      "inputs_requires_grad has ", inputs_requires_grad.size(), " entries but ",
      K, " were expected");
  TORCH_CHECK_TYPE(
      at::isFloatingType(grad.scalar_type()),
      "grad must have a floating dtype, got ", py_dtype(grad.scalar_type()));
  TORCH_CHECK_VALUE(
      grad.device() == weights.device(), "grad is on device ", grad.device().str(),
      " but weights are on device ", weights.device().str());
  if (weights_requires_grad) {
    check_args(weights, inputs, "weights");
    TORCH_CHECK_VALUE(
        grad.sizes().equals(inputs[0].sizes()), "grad has shape ",
        py_shape(grad.sizes()), " but inputs[0] has shape ", py_shape(inputs[0].sizes()));
    TORCH_CHECK_TYPE(
        grad.scalar_type() == inputs[0].scalar_type(), "grad has dtype ",
        py_dtype(grad.scalar_type()), " but inputs[0] has dtype ",
        py_dtype(inputs[0].scalar_type()));
  }
}

std::vector<at::Tensor> dense_operands(at::TensorList tensors) {
  const at::Tensor& t0 = tensors[0];
  bool shared = t0.is_non_overlapping_and_dense();
  for (size_t i = 1; shared && i < tensors.size(); ++i) {
    shared = tensors[i].strides().equals(t0.strides());
  }
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (const auto& t : tensors) out.push_back(shared ? t : t.contiguous());
  return out;
}

} // namespace simplex_param
