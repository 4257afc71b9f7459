#include "checks.h"

#include "dtypes.h"

#include <c10/util/Exception.h>

#include <charconv>
#include <cmath>
#include <initializer_list>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace simplex_param {
namespace {

enum class Error {
#define SP_ERROR(id, type, text) id,
#include "../simplex_param/errors.def"
#undef SP_ERROR
};

enum class Kind { ValueError, TypeError };

struct Entry {
  Kind kind;
  const char* text;
};

constexpr Entry kErrors[] = {
#define SP_ERROR(id, type, text) {Kind::type, text},
#include "../simplex_param/errors.def"
#undef SP_ERROR
};

using Fields = std::initializer_list<std::pair<const char*, std::string>>;

// Raises error `e` with its {fields} filled in, as str.format does in Python.
[[noreturn]] void fail(Error e, Fields fields) {
  const Entry& entry = kErrors[static_cast<int>(e)];
  std::string msg = entry.text;
  for (const auto& [key, value] : fields) {
    const std::string slot = std::string("{") + key + "}";
    for (size_t at = msg.find(slot); at != std::string::npos; at = msg.find(slot, at + value.size())) {
      msg.replace(at, slot.size(), value);
    }
  }
  if (entry.kind == Kind::TypeError) TORCH_CHECK_TYPE(false, msg);
  TORCH_CHECK_VALUE(false, msg);
}

// Python's spelling of a dtype, shape, device and float.
std::string py(at::ScalarType t) {
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
    case at::kFloat8_e4m3fn: return "torch.float8_e4m3fn";
    case at::kFloat8_e5m2: return "torch.float8_e5m2";
    default: return std::string("torch.") + c10::toString(t);
  }
}

std::string py(at::IntArrayRef sizes) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < sizes.size(); ++i) os << (i ? ", " : "") << sizes[i];
  os << "]";
  return os.str();
}

std::string py(const at::Device& d) {
  return d.str();
}

// Python's repr() of a float: the shortest digits that round-trip, in fixed
// notation for decimal exponents from -4 to 15 (with ".0" on integers), else
// as d.ddde+XX.
std::string py_float(double x) {
  if (std::isnan(x)) return "nan";
  if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
  char buf[64];
  const auto res = std::to_chars(buf, buf + sizeof(buf), x, std::chars_format::scientific);
  const std::string sci(buf, res.ptr);  // [-]d[.ddd]e(+|-)XX
  const size_t e = sci.find('e');
  const int exp = std::stoi(sci.substr(e + 1));
  const bool negative = sci[0] == '-';
  std::string digits;
  for (char c : sci.substr(negative, e - negative)) {
    if (c != '.') digits += c;
  }
  std::string out = negative ? "-" : "";
  if (exp < -4 || exp >= 16) {
    out += digits.substr(0, 1);
    if (digits.size() > 1) out += "." + digits.substr(1);
    const int a = std::abs(exp);
    out += std::string("e") + (exp < 0 ? "-" : "+") + (a < 10 ? "0" : "") + std::to_string(a);
  } else if (exp < 0) {
    out += "0." + std::string(-exp - 1, '0') + digits;
  } else {
    if (digits.size() <= static_cast<size_t>(exp) + 1) digits += std::string(exp + 1 - digits.size(), '0');
    out += digits.substr(0, exp + 1) + "." + (digits.size() > static_cast<size_t>(exp) + 1 ? digits.substr(exp + 1) : "0");
  }
  return out;
}

// The weights' leading dimensions, all but the last `matrix_dims` (1 for
// weighted_sum's K, 2 for mix's M x K), are the first ones of `other` (a shape).
void check_prefix(
    const at::Tensor& weights, const char* name, at::IntArrayRef other, const char* other_name, int64_t matrix_dims = 1) {
  const auto P = weights.dim() - matrix_dims;
  bool ok = P <= static_cast<int64_t>(other.size());
  for (int64_t i = 0; ok && i < P; ++i) ok = weights.size(i) == other[i];
  if (!ok) {
    fail(Error::weights_prefix,
         {{"name", name}, {"shape", py(weights.sizes())}, {"other_shape", py(other)}, {"other", other_name}});
  }
}

void check_weights(const at::Tensor& weights, const char* name) {
  if (weights.dim() == 0) fail(Error::weights_0d, {{"name", name}});
  if (!at::isFloatingType(weights.scalar_type())) {
    fail(Error::weights_dtype, {{"name", name}, {"dtype", py(weights.scalar_type())}});
  }
}

} // namespace

namespace {

// "inputs" for a single op, "groups[g]" for group g of a grouped op: built
// only for a message.
std::string inputs_name(int64_t group) {
  return group < 0 ? "inputs" : "groups[" + std::to_string(group) + "]";
}

} // namespace

void check_inputs(at::TensorList inputs, int64_t group) {
  if (inputs.empty()) fail(Error::no_inputs, {});
  const at::Tensor& x0 = inputs[0];
  if (!kernel_dtype(x0.scalar_type())) {
    fail(Error::input_dtype, {{"inputs", inputs_name(group)}, {"dtype", py(x0.scalar_type())}});
  }
  for (size_t k = 1; k < inputs.size(); ++k) {
    const at::Tensor& x = inputs[k];
    if (x.scalar_type() != x0.scalar_type()) {
      fail(Error::input_dtype_mismatch,
           {{"inputs", inputs_name(group)}, {"k", std::to_string(k)}, {"dtype", py(x.scalar_type())},
            {"dtype0", py(x0.scalar_type())}});
    }
    if (!x.sizes().equals(x0.sizes())) {
      fail(Error::input_shape_mismatch,
           {{"inputs", inputs_name(group)}, {"k", std::to_string(k)}, {"shape", py(x.sizes())}, {"shape0", py(x0.sizes())}});
    }
    if (x.device() != x0.device()) {
      fail(Error::input_device_mismatch,
           {{"inputs", inputs_name(group)}, {"k", std::to_string(k)}, {"device", py(x.device())},
            {"device0", py(x0.device())}});
    }
  }
}

void check_args(const at::Tensor& weights, at::TensorList inputs, const char* name) {
  const auto K = static_cast<int64_t>(inputs.size());
  if (K < 1) fail(Error::no_inputs, {});
  check_weights(weights, name);
  if (weights.size(-1) != K) {
    fail(Error::weights_k,
         {{"name", name}, {"n", std::to_string(weights.size(-1))}, {"inputs", "inputs"}, {"K", std::to_string(K)}});
  }
  check_inputs(inputs, -1);
  const at::Tensor& x0 = inputs[0];
  check_prefix(weights, name, x0.sizes(), "inputs[0]");
  if (weights.device() != x0.device()) {
    fail(Error::weights_device,
         {{"name", name}, {"device", py(weights.device())}, {"other", "inputs[0]"}, {"other_device", py(x0.device())}});
  }
}

void check_mix_args(const at::Tensor& weights, at::TensorList inputs, const char* name) {
  if (weights.dim() < 2) fail(Error::mix_weights, {{"name", name}, {"shape", py(weights.sizes())}});
  check_weights(weights, name);
  const auto K = static_cast<int64_t>(inputs.size());
  if (weights.size(-1) != K) {
    fail(Error::weights_k,
         {{"name", name}, {"n", std::to_string(weights.size(-1))}, {"inputs", "inputs"}, {"K", std::to_string(K)}});
  }
  check_inputs(inputs, -1);
  const at::Tensor& x0 = inputs[0];
  check_prefix(weights, name, x0.sizes(), "inputs[0]", 2);
  if (weights.device() != x0.device()) {
    fail(Error::weights_device,
         {{"name", name}, {"device", py(weights.device())}, {"other", "inputs[0]"}, {"other_device", py(x0.device())}});
  }
}

void check_grouped_weights(const at::Tensor& weights, const char* name) {
  if (weights.dim() != 2) fail(Error::grouped_weights, {{"name", name}, {"shape", py(weights.sizes())}});
  check_weights(weights, name);
}

void check_grouped_args(const at::Tensor& weights, at::TensorList inputs, const char* name) {
  check_grouped_weights(weights, name);
  const int64_t G = weights.size(0), K = weights.size(1);
  if (static_cast<int64_t>(inputs.size()) != G * K) {
    fail(Error::grouped_count,
         {{"n", std::to_string(inputs.size())}, {"name", name}, {"shape", py(weights.sizes())},
          {"GK", std::to_string(G * K)}});
  }
  if (G > 0 && K == 0) fail(Error::no_inputs, {});
  for (int64_t g = 0; g < G; ++g) {
    const at::TensorList xs = inputs.slice(g * K, K);
    check_inputs(xs, g);
    if (weights.device() != xs[0].device()) {
      fail(Error::weights_device,
           {{"name", name}, {"device", py(weights.device())}, {"other", inputs_name(g) + "[0]"},
            {"other_device", py(xs[0].device())}});
    }
  }
}

void check_temperature(double temperature) {
  if (!(std::isfinite(temperature) && temperature > 0)) {
    fail(Error::temperature, {{"value", py_float(temperature)}});
  }
}

namespace {

// "grad" for a single op, "grads[g]" for group g of a grouped op.
std::string grad_name(int64_t group) {
  return group < 0 ? "grad" : "grads[" + std::to_string(group) + "]";
}

void check_grad(const at::Tensor& grad, at::TensorList inputs, int64_t group) {
  const at::Tensor& x0 = inputs[0];
  if (!grad.sizes().equals(x0.sizes())) {
    fail(Error::grad_shape_mismatch,
         {{"grad", grad_name(group)}, {"shape", py(grad.sizes())}, {"inputs", inputs_name(group)},
          {"shape0", py(x0.sizes())}});
  }
  if (grad.scalar_type() != x0.scalar_type()) {
    fail(Error::grad_dtype_mismatch,
         {{"grad", grad_name(group)}, {"dtype", py(grad.scalar_type())}, {"inputs", inputs_name(group)},
          {"dtype0", py(x0.scalar_type())}});
  }
}

} // namespace

void check_backward_args(
    const at::Tensor& grad,
    const at::Tensor& weights,
    at::TensorList inputs,
    bool weights_requires_grad,
    const c10::List<bool>& inputs_requires_grad) {
  check_weights(weights, "weights");
  const int64_t K = weights.size(-1);
  if (static_cast<int64_t>(inputs_requires_grad.size()) != K) {
    fail(Error::requires_grad_count,
         {{"n", std::to_string(inputs_requires_grad.size())}, {"K", std::to_string(K)}});
  }
  if (!kernel_dtype(grad.scalar_type())) fail(Error::grad_dtype, {{"grad", "grad"}, {"dtype", py(grad.scalar_type())}});
  check_prefix(weights, "weights", grad.sizes(), "grad");
  if (weights.device() != grad.device()) {
    fail(Error::weights_device,
         {{"name", "weights"}, {"device", py(weights.device())}, {"other", "grad"}, {"other_device", py(grad.device())}});
  }
  if (weights_requires_grad) {
    check_args(weights, inputs, "weights");
    check_grad(grad, inputs, -1);
  }
}

void check_mix_backward_args(
    const at::Tensor& grad,
    const at::Tensor& weights,
    at::TensorList inputs,
    bool weights_requires_grad,
    const c10::List<bool>& inputs_requires_grad) {
  if (weights.dim() < 2) fail(Error::mix_weights, {{"name", "weights"}, {"shape", py(weights.sizes())}});
  check_weights(weights, "weights");
  const int64_t K = weights.size(-1), P = weights.dim() - 2;
  if (static_cast<int64_t>(inputs_requires_grad.size()) != K) {
    fail(Error::requires_grad_count,
         {{"n", std::to_string(inputs_requires_grad.size())}, {"K", std::to_string(K)}});
  }
  if (!kernel_dtype(grad.scalar_type())) fail(Error::grad_dtype, {{"grad", "grad"}, {"dtype", py(grad.scalar_type())}});
  // grad: (*P, M, *rest), the weights' (*P, M) its first dimensions.
  check_prefix(weights, "weights", grad.sizes(), "grad", 1);
  if (weights.device() != grad.device()) {
    fail(Error::weights_device,
         {{"name", "weights"}, {"device", py(weights.device())}, {"other", "grad"}, {"other_device", py(grad.device())}});
  }
  if (weights_requires_grad) {
    check_mix_args(weights, inputs, "weights");
    std::vector<int64_t> expected = inputs[0].sizes().vec();
    expected.insert(expected.begin() + P, weights.size(-2));
    if (!grad.sizes().equals(expected)) {
      fail(Error::mix_grad_shape, {{"grad", "grad"}, {"shape", py(grad.sizes())}, {"expected", py(expected)}});
    }
    if (grad.scalar_type() != inputs[0].scalar_type()) {
      fail(Error::grad_dtype_mismatch,
           {{"grad", "grad"}, {"dtype", py(grad.scalar_type())}, {"inputs", "inputs"},
            {"dtype0", py(inputs[0].scalar_type())}});
    }
  }
}

void check_grouped_backward_args(
    at::TensorList grads,
    const at::Tensor& weights,
    at::TensorList inputs,
    bool weights_requires_grad,
    const c10::List<bool>& inputs_requires_grad) {
  check_grouped_weights(weights, "weights");
  const int64_t G = weights.size(0), K = weights.size(1);
  if (static_cast<int64_t>(grads.size()) != G) {
    fail(Error::grouped_grads, {{"n", std::to_string(grads.size())}, {"G", std::to_string(G)}});
  }
  if (static_cast<int64_t>(inputs_requires_grad.size()) != G * K) {
    fail(Error::grouped_requires_grad_count,
         {{"n", std::to_string(inputs_requires_grad.size())}, {"shape", py(weights.sizes())},
          {"GK", std::to_string(G * K)}});
  }
  for (int64_t g = 0; g < G; ++g) {
    if (!kernel_dtype(grads[g].scalar_type())) {
      fail(Error::grad_dtype, {{"grad", grad_name(g)}, {"dtype", py(grads[g].scalar_type())}});
    }
    if (weights.device() != grads[g].device()) {
      fail(Error::weights_device,
           {{"name", "weights"}, {"device", py(weights.device())}, {"other", grad_name(g)},
            {"other_device", py(grads[g].device())}});
    }
  }
  if (weights_requires_grad) {
    check_grouped_args(weights, inputs, "weights");
    for (int64_t g = 0; g < G; ++g) {
      check_grad(grads[g], inputs.slice(g * K, K), g);
    }
  }
}

void check_alpha(const char* map, bool has_alpha, c10::optional<double> alpha) {
  if (!alpha.has_value()) return;
  if (!has_alpha) fail(Error::alpha_map, {{"map", map}});
  if (!(std::isfinite(*alpha) && *alpha >= 1)) fail(Error::alpha_value, {{"value", py_float(*alpha)}});
}

void fail_unknown_map(c10::string_view map, const std::string& known) {
  fail(Error::unknown_map, {{"maps", known}, {"map", std::string(map)}});
}

} // namespace simplex_param
