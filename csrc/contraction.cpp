#include "contraction.h"

#include <ATen/Functions.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "checks.h"
#include "layout.h"

#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

namespace simplex_param {
namespace {

// The weight rows: the elements of the first `row_dims` dimensions.
int64_t num_rows(const at::Tensor& weights, int64_t row_dims) {
  int64_t rows = 1;
  for (int64_t i = 0; i < row_dims; ++i) rows *= weights.size(i);
  return rows;
}

// The (G, K) weights of a grouped op in the accumulation dtypes its groups
// need (float32, float64), each contiguous: row g for group g.
struct WeightRows {
  at::Tensor f, d;

  WeightRows(const at::Tensor& weights, const std::vector<at::ScalarType>& dtypes) {
    for (at::ScalarType t : dtypes) {
      at::Tensor& w = acc_type(t) == at::kDouble ? d : f;
      if (!w.defined()) w = weights.to(acc_type(t)).contiguous();
    }
  }
  // For a float32 or float64 buffer of G x K values.
  static void* row(const at::Tensor& t, int64_t g) {
    return static_cast<char*>(t.data_ptr()) + g * t.size(1) * t.element_size();
  }
  const void* operator()(at::ScalarType dtype, int64_t g) const {
    return row(acc_type(dtype) == at::kDouble ? d : f, g);
  }
};

} // namespace

int forward_streams(size_t bytes) {
  static const size_t llc = [] {  // the last-level cache's size
    long size = -1;
#if defined(_SC_LEVEL3_CACHE_SIZE)
    size = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
    return size > 0 ? static_cast<size_t>(size) : size_t{32} << 20;
  }();
  // From memory: on the Xeon of docs/benchmarks.md, eight streams per pass
  // beat four (the kernel alone 7% faster in float32; through the op, four
  // lost the beyond-cache forward to compile's one loop in 3 of 4 runs,
  // eight in none); four were chosen on an AMD EPYC, and are kept where
  // nothing was measured. Read at the first call.
  static const int from_memory = [] {
    const char* env = std::getenv("SIMPLEX_PARAM_MEMORY_STREAMS");
    if (env != nullptr && *env != '\0') {
      char* end = nullptr;
      const long n = std::strtol(env, &end, 10);
      TORCH_CHECK(*end == '\0' && n >= 1 && n <= 16, "SIMPLEX_PARAM_MEMORY_STREAMS=", env,
                  " must be a whole number from 1 to 16");
      return static_cast<int>(n);
    }
#if defined(__GNUC__) && (defined(__x86_64__) || defined(_M_X64))
    if (__builtin_cpu_is("intel")) return 8;
#endif
    return 4;
  }();
  return bytes <= llc ? 16 : from_memory;
}

bool stream_stores(size_t bytes) {
  // Off unless SIMPLEX_PARAM_STREAM_BYTES sets a limit: the outputs are
  // fresh memory, whose first touch zeroes the page in the cache, and
  // non-temporal stores over those lines were slower (docs/benchmarks.md).
  static const size_t limit = [] {
    const char* env = std::getenv("SIMPLEX_PARAM_STREAM_BYTES");
    return env != nullptr && *env != '\0' ? static_cast<size_t>(std::atoll(env)) : SIZE_MAX;
  }();
  return bytes > limit;
}

at::Tensor call_weighted_sum(const at::Tensor& weights, at::TensorList inputs) {
  static const auto op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("simplex_param::weighted_sum", "")
      .typed<at::Tensor(const at::Tensor&, at::TensorList)>();
  return op.call(weights, inputs);
}

at::Tensor call_mix(const at::Tensor& weights, at::TensorList inputs) {
  static const auto op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("simplex_param::mix", "")
      .typed<at::Tensor(const at::Tensor&, at::TensorList)>();
  return op.call(weights, inputs);
}

namespace {

std::vector<int64_t> contiguous_strides(at::IntArrayRef sizes) {
  std::vector<int64_t> strides(sizes.size());
  int64_t s = 1;
  for (size_t d = sizes.size(); d-- > 0;) {
    strides[d] = s;
    s *= std::max<int64_t>(sizes[d], 1);
  }
  return strides;
}

// The shape and strides of mix's M outputs stacked after the row dimensions,
// (*P, M, *rest), for inputs (*P, *rest) walked in `strides` (rows outermost
// and in order, layout.h): output m of row r starts at (r * M + m) * row_len.
std::pair<std::vector<int64_t>, std::vector<int64_t>> stacked_layout(
    at::IntArrayRef sizes, at::IntArrayRef strides, int64_t row_dims, int64_t M, int64_t row_len) {
  std::vector<int64_t> out_sizes(sizes.begin(), sizes.end()), out_strides(strides.begin(), strides.end());
  for (int64_t d = 0; d < row_dims; ++d) out_strides[d] *= M;
  out_sizes.insert(out_sizes.begin() + row_dims, M);
  out_strides.insert(out_strides.begin() + row_dims, row_len);
  return {out_sizes, out_strides};
}

// The inputs as the kernels read them: in place where their rows are one
// stride apart in the layout `strides` (row_skip), with that skip in
// `skips`; copied into the layout where they are not.
std::vector<at::Tensor> read_layout(
    at::TensorList inputs, at::IntArrayRef strides, int64_t row_dims, int64_t row_len, std::vector<int64_t>* skips) {
  std::vector<at::Tensor> xs;
  xs.reserve(inputs.size());
  bool any_skip = false;
  for (const at::Tensor& x : inputs) {
    const std::optional<int64_t> skip = row_skip(x, strides, row_dims, row_len);
    xs.push_back(skip.has_value() ? x : in_layout(x, strides));
    skips->push_back(skip.value_or(0));
    any_skip = any_skip || skip.value_or(0) != 0;
  }
  if (!any_skip) skips->clear();  // the kernels' plain case
  return xs;
}

// The forward of weighted_sum (stacked false: weights (*P, K), M = 1, the
// output shaped as the inputs) and of mix (stacked: weights (*P, M, K)).
at::Tensor contraction_forward(
    const at::Tensor& weights, at::TensorList inputs, bool stacked, ContractionKernel kernel) {
  const int64_t row_dims = weights.dim() - (stacked ? 2 : 1);
  const int64_t M = stacked ? weights.size(-2) : 1;
  const std::vector<int64_t> strides = walk_strides(inputs, row_dims);
  const int64_t rows = num_rows(weights, row_dims), n = inputs[0].numel();
  const int64_t row_len = rows == 0 ? 0 : n / rows;
  std::vector<int64_t> skips;
  const std::vector<at::Tensor> xs = read_layout(inputs, strides, row_dims, row_len, &skips);
  at::Tensor out;
  if (stacked) {
    const auto [sizes, out_strides] = stacked_layout(xs[0].sizes(), strides, row_dims, M, row_len);
    out = at::empty_strided(sizes, out_strides, xs[0].options());
  } else {
    out = at::empty_strided(xs[0].sizes(), strides, xs[0].options());
  }
  if (out.numel() == 0) return out;

  const at::Tensor w = weights.to(acc_type(out.scalar_type())).contiguous();
  Contraction c;
  c.K = static_cast<int64_t>(xs.size());
  c.M = M;
  c.rows = rows;
  c.row_len = row_len;
  c.dtype = out.scalar_type();
  c.device = out.device();
  c.w = w.const_data_ptr();
  for (const at::Tensor& x : xs) c.x.push_back(x.const_data_ptr());
  c.x_skip = std::move(skips);
  c.out = out.mutable_data_ptr();
  c.stream_stores = stream_stores(out.nbytes());
  c.streams = forward_streams(xs[0].nbytes() * c.K);
  kernel(c);
  return out;
}

// The backward of weighted_sum (stacked false) and of mix (stacked).
std::tuple<at::Tensor, std::vector<at::Tensor>> contraction_backward(
    const at::Tensor& grad_out,
    const at::Tensor& weights,
    at::TensorList inputs,
    bool weights_requires_grad,
    const c10::List<bool>& inputs_requires_grad,
    bool skip_zero_weights,
    bool stacked,
    ContractionKernel kernel) {
  const int64_t K = weights.size(-1);
  const int64_t row_dims = weights.dim() - (stacked ? 2 : 1);
  const int64_t M = stacked ? weights.size(-2) : 1;
  const int64_t rows = num_rows(weights, row_dims);

  // The gradient and, for the weights' gradient, the inputs: one layout (the
  // inputs read in place where their rows are evenly spaced), M outputs
  // stacked in the gradient of mix.
  std::vector<at::Tensor> operands{grad_out};
  if (weights_requires_grad) operands.insert(operands.end(), inputs.begin(), inputs.end());
  std::vector<int64_t> sizes = grad_out.sizes().vec(), strides, skips;  // of the inputs
  if (stacked) {
    sizes.erase(sizes.begin() + row_dims);
    const at::TensorList xs = at::TensorList(operands).slice(1);
    strides = xs.empty() ? contiguous_strides(sizes) : walk_strides(xs, row_dims);
  } else {
    strides = walk_strides(operands, row_dims);
  }
  const int64_t row_len = rows == 0 ? 0 : c10::multiply_integers(sizes) / rows;
  const std::vector<at::Tensor> read =
      read_layout(at::TensorList(operands).slice(1), strides, row_dims, row_len, &skips);
  std::copy(read.begin(), read.end(), operands.begin() + 1);
  operands[0] = in_layout(operands[0], stacked ? stacked_layout(sizes, strides, row_dims, M, row_len).second : strides);
  const at::Tensor& grad = operands[0];
  const int64_t n = c10::multiply_integers(sizes);
  const at::TensorOptions options = grad.options();

  Contraction c;
  c.K = K;
  c.M = M;
  c.rows = rows;
  c.row_len = row_len;
  c.dtype = grad.scalar_type();
  c.device = grad.device();
  c.grad = grad.const_data_ptr();
  c.skip_zero_weights = skip_zero_weights;
  std::vector<at::Tensor> grad_inputs;
  bool any = weights_requires_grad;
  for (int64_t k = 0; k < K; ++k) {
    const bool need = inputs_requires_grad[k];
    grad_inputs.push_back(need ? at::empty_strided(sizes, strides, options) : at::empty({0}, options));
    c.grad_x.push_back(need ? grad_inputs.back().mutable_data_ptr() : nullptr);
    any = any || need;
  }
  at::Tensor grad_w;
  if (weights_requires_grad) {
    grad_w = at::empty({rows, M * K}, options.dtype(acc_type(c.dtype)));
    c.grad_w = grad_w.mutable_data_ptr();
    for (size_t i = 1; i < operands.size(); ++i) c.x.push_back(operands[i].const_data_ptr());
    c.x_skip = std::move(skips);
  }
  if (n == 0 || M == 0) {  // nothing to read: the gradients are 0
    if (weights_requires_grad) grad_w.zero_();
    if (M == 0) {
      for (size_t k = 0; k < grad_inputs.size(); ++k) {
        if (inputs_requires_grad[k]) grad_inputs[k].zero_();
      }
    }
  } else if (any) {
    const at::Tensor w = weights.to(acc_type(c.dtype)).contiguous();
    c.w = w.const_data_ptr();
    size_t written = 0;
    for (const void* p : c.grad_x) written += p == nullptr ? 0 : n * grad.element_size();
    c.stream_stores = stream_stores(written);
    c.streams = forward_streams(n * grad.element_size() * (K + M));
    kernel(c);
  }
  at::Tensor grad_weights = weights_requires_grad
      ? grad_w.view(weights.sizes()).to(weights.scalar_type())
      : at::empty({0}, weights.options());
  return {grad_weights, grad_inputs};
}

} // namespace

at::Tensor weighted_sum_forward(const at::Tensor& weights, at::TensorList inputs, ContractionKernel kernel) {
  check_args(weights, inputs, "weights");
  return contraction_forward(weights, inputs, /*stacked=*/false, kernel);
}

std::tuple<at::Tensor, std::vector<at::Tensor>> weighted_sum_backward(
    const at::Tensor& grad,
    const at::Tensor& weights,
    at::TensorList inputs,
    bool weights_requires_grad,
    const c10::List<bool>& inputs_requires_grad,
    bool skip_zero_weights,
    ContractionKernel kernel) {
  check_backward_args(grad, weights, inputs, weights_requires_grad, inputs_requires_grad);
  return contraction_backward(
      grad, weights, inputs, weights_requires_grad, inputs_requires_grad, skip_zero_weights, false, kernel);
}

at::Tensor mix_forward(const at::Tensor& weights, at::TensorList inputs, ContractionKernel kernel) {
  check_mix_args(weights, inputs, "weights");
  return contraction_forward(weights, inputs, /*stacked=*/true, kernel);
}

std::tuple<at::Tensor, std::vector<at::Tensor>> mix_backward(
    const at::Tensor& grad,
    const at::Tensor& weights,
    at::TensorList inputs,
    bool weights_requires_grad,
    const c10::List<bool>& inputs_requires_grad,
    ContractionKernel kernel) {
  check_mix_backward_args(grad, weights, inputs, weights_requires_grad, inputs_requires_grad);
  return contraction_backward(
      grad, weights, inputs, weights_requires_grad, inputs_requires_grad, false, /*stacked=*/true, kernel);
}

std::vector<at::Tensor> call_grouped_weighted_sum(const at::Tensor& weights, at::TensorList inputs) {
  static const auto op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("simplex_param::grouped_weighted_sum", "")
      .typed<std::vector<at::Tensor>(const at::Tensor&, at::TensorList)>();
  return op.call(weights, inputs);
}

std::vector<at::Tensor> grouped_weighted_sum_forward(
    const at::Tensor& weights, at::TensorList inputs, BatchKernel kernel) {
  check_grouped_args(weights, inputs, "weights");
  const int64_t G = weights.size(0), K = weights.size(1);
  std::vector<at::ScalarType> dtypes;
  for (int64_t g = 0; g < G; ++g) dtypes.push_back(inputs[g * K].scalar_type());
  const WeightRows w(weights, dtypes);

  std::vector<at::Tensor> outs, copies;  // copies: inputs laid out unlike their group
  std::vector<Contraction> cs;
  for (int64_t g = 0; g < G; ++g) {
    const at::TensorList group = inputs.slice(g * K, K);
    const std::vector<int64_t> strides = walk_strides(group, 0);
    outs.push_back(at::empty_strided(group[0].sizes(), strides, group[0].options()));
    const int64_t n = outs.back().numel();
    if (n == 0) continue;
    Contraction c;
    c.K = K;
    c.row_len = n;
    c.dtype = dtypes[g];
    c.device = group[0].device();
    c.w = w(c.dtype, g);
    for (const at::Tensor& x : group) {
      copies.push_back(in_layout(x, strides));
      c.x.push_back(copies.back().const_data_ptr());
    }
    c.out = outs.back().mutable_data_ptr();
    cs.push_back(std::move(c));
  }
  size_t written = 0;
  for (const at::Tensor& out : outs) written += out.nbytes();
  for (Contraction& c : cs) {
    c.stream_stores = stream_stores(written);
    c.streams = forward_streams(written * K);
  }
  if (!cs.empty()) kernel(cs);
  return outs;
}

std::tuple<at::Tensor, std::vector<at::Tensor>> grouped_weighted_sum_backward(
    at::TensorList grads,
    const at::Tensor& weights,
    at::TensorList inputs,
    bool weights_requires_grad,
    const c10::List<bool>& inputs_requires_grad,
    BatchKernel kernel) {
  check_grouped_backward_args(grads, weights, inputs, weights_requires_grad, inputs_requires_grad);
  const int64_t G = weights.size(0), K = weights.size(1);
  std::vector<at::ScalarType> dtypes;
  for (const at::Tensor& grad : grads) dtypes.push_back(grad.scalar_type());
  const WeightRows w(weights, dtypes);
  // The weights' gradient, per group in its accumulation dtype; zero for
  // empty groups.
  at::Tensor grad_wf, grad_wd;
  if (weights_requires_grad) {
    for (at::ScalarType t : dtypes) {
      at::Tensor& gw = acc_type(t) == at::kDouble ? grad_wd : grad_wf;
      if (!gw.defined()) gw = at::zeros({G, K}, weights.options().dtype(acc_type(t)));
    }
  }

  std::vector<at::Tensor> grad_inputs, keep;
  std::vector<Contraction> cs;
  for (int64_t g = 0; g < G; ++g) {
    std::vector<at::Tensor> operands{grads[g]};
    if (weights_requires_grad) {
      const at::TensorList group = inputs.slice(g * K, K);
      operands.insert(operands.end(), group.begin(), group.end());
    }
    const std::vector<int64_t> strides = walk_strides(operands, 0);
    for (at::Tensor& t : operands) t = in_layout(t, strides);
    const at::Tensor& grad = operands[0];
    Contraction c;
    c.K = K;
    c.row_len = grad.numel();
    c.dtype = dtypes[g];
    c.device = grad.device();
    c.w = w(c.dtype, g);
    c.grad = grad.const_data_ptr();
    bool any = weights_requires_grad;
    for (int64_t k = 0; k < K; ++k) {
      const bool need = inputs_requires_grad[g * K + k];
      if (need) grad_inputs.push_back(at::empty_strided(grad.sizes(), strides, grad.options()));
      c.grad_x.push_back(need ? grad_inputs.back().mutable_data_ptr() : nullptr);
      any = any || need;
    }
    if (weights_requires_grad) {
      c.grad_w = WeightRows::row(acc_type(c.dtype) == at::kDouble ? grad_wd : grad_wf, g);
      for (size_t i = 1; i < operands.size(); ++i) c.x.push_back(operands[i].const_data_ptr());
    }
    if (c.row_len == 0 || !any) continue;
    keep.insert(keep.end(), operands.begin(), operands.end());
    cs.push_back(std::move(c));
  }
  size_t written = 0;
  for (const at::Tensor& g : grad_inputs) written += g.nbytes();
  for (Contraction& c : cs) c.stream_stores = stream_stores(written);
  if (!cs.empty()) kernel(cs);

  at::Tensor grad_weights = at::empty({0}, weights.options());
  if (weights_requires_grad) {
    if (grad_wf.defined() && grad_wd.defined()) {  // groups of float64 and of other dtypes
      at::Tensor is_double = at::empty({G, 1}, at::kBool);
      for (int64_t g = 0; g < G; ++g) is_double.data_ptr<bool>()[g] = acc_type(dtypes[g]) == at::kDouble;
      grad_weights = at::where(is_double.to(weights.device()), grad_wd, grad_wf.to(at::kDouble));
    } else {
      grad_weights = grad_wf.defined() ? grad_wf : grad_wd;
    }
    if (!grad_weights.defined()) grad_weights = at::zeros({G, K}, weights.options());  // G == 0
    grad_weights = grad_weights.to(weights.scalar_type());
  }
  return {grad_weights, grad_inputs};
}

} // namespace simplex_param
