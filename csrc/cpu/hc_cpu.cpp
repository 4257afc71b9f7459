// The CPU kernels of mHC's fused pre-mix and post-mix
// (../hyper_connections.h): the kernels of hc_kernels.h built for three
// instruction sets in this file, the
// one to run chosen as the contraction's is (capability.h); the argument
// checks, conversion and allocation around them; the CPU registrations.
// Other devices run HyperConnections' composite (hyper_connections.py).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "../dtypes.h"
#include "../hyper_connections.h"
#include "capability.h"

// The kernels pass 64-byte GCC vectors by value between always-inline
// functions (no ABI boundary: -Wpsabi), and pick __m256 or __m256d with
// std::conditional (whose attributes GCC notes it ignores).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#pragma GCC diagnostic ignored "-Wignored-attributes"

#define SP_HC_ISA baseline
#define SP_HC_TILE_TOKENS 1
#define SP_HC_TILE_ROWS 2
#define SP_HC_FMA 0
#include "hc_kernels.h"
#undef SP_HC_FMA
#undef SP_HC_TILE_ROWS
#undef SP_HC_TILE_TOKENS
#undef SP_HC_ISA

// GCC only: Clang does not honour #pragma GCC target.
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(_M_X64))
#define SP_HC_X86 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define SP_HC_ISA avx2
#define SP_HC_TILE_TOKENS 2
#define SP_HC_TILE_ROWS 2
#define SP_HC_FMA 256
#include "hc_kernels.h"
#undef SP_HC_FMA
#undef SP_HC_TILE_ROWS
#undef SP_HC_TILE_TOKENS
#undef SP_HC_ISA
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")
#define SP_HC_ISA avx512
#define SP_HC_TILE_TOKENS 4
#define SP_HC_TILE_ROWS 4
#define SP_HC_FMA 512
#include "hc_kernels.h"
#undef SP_HC_FMA
#undef SP_HC_TILE_ROWS
#undef SP_HC_TILE_TOKENS
#undef SP_HC_ISA
#pragma GCC pop_options
#else
#define SP_HC_X86 0
#endif
#pragma GCC diagnostic pop

namespace simplex_param {
namespace cpu {
namespace {

struct HcKernels {
  HcKernel forward, backward;
  HcPostKernel post_forward, post_backward;
};

HcKernels choose() {
#if SP_HC_X86
  const std::string isa = active_capability();
  if (isa == "avx512" || isa == "avx512_bf16") {
    return {avx512::forward, avx512::backward, avx512::post_forward, avx512::post_backward};
  }
  // avx2 with FMA (every AVX2 CPU from Intel and AMD has it).
  if (isa == "avx2" && __builtin_cpu_supports("fma")) {
    return {avx2::forward, avx2::backward, avx2::post_forward, avx2::post_backward};
  }
#endif
  return {baseline::forward, baseline::backward, baseline::post_forward, baseline::post_backward};
}

const HcKernels& kernels() {
  static const HcKernels k = choose();
  return k;
}

std::vector<int64_t> with_last(at::IntArrayRef lead, int64_t last) {
  std::vector<int64_t> sizes(lead.begin(), lead.end());
  sizes.push_back(last);
  return sizes;
}

void check_shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef want) {
  TORCH_CHECK_VALUE(t.sizes() == want, op, ": ", name, " must have shape ", want, ", got ", t.sizes());
}

void check_floating(const char* op, const char* name, const at::Tensor& t, const at::Tensor& residual) {
  TORCH_CHECK_TYPE(kernel_dtype(t.scalar_type()), op, ": ", name,
                   " must be a floating tensor (float16, bfloat16, float32 or float64), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == residual.device(), op, ": ", name, " is on device ", t.device(),
                    " but residual is on device ", residual.device());
}

// The checks both ops share: residual (*, n, C), fn (M, n C), scale (3,);
// returns M = n (n + 2).
int64_t check_common(const char* op, const at::Tensor& residual, const at::Tensor& fn, const at::Tensor& scale) {
  check_floating(op, "residual", residual, residual);
  TORCH_CHECK_VALUE(residual.dim() >= 2 && residual.size(-2) >= 1 && residual.size(-1) >= 1, op,
                    ": residual must have shape (*, n, C) with n >= 1 and C >= 1, got ", residual.sizes());
  const int64_t n = residual.size(-2), M = n * (n + 2);
  check_floating(op, "fn", fn, residual);
  check_shape(op, "fn", fn, {M, n * residual.size(-1)});
  check_floating(op, "scale", scale, residual);
  check_shape(op, "scale", scale, {3});
  return M;
}

void check_eps(const char* op, const char* name, double v) {
  TORCH_CHECK_VALUE(v >= 0.0 && std::isfinite(v), op, ": ", name, " must be a finite float >= 0, got ", v);
}

HcPre params(const at::Tensor& residual, int64_t M) {
  HcPre p;
  p.n = residual.size(-2);
  p.C = residual.size(-1);
  p.M = M;
  p.tokens = residual.numel() / (p.n * p.C);
  p.dtype = residual.scalar_type();
  p.acc = acc_type(p.dtype);
  return p;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> hc_pre_cpu(
    const at::Tensor& residual, const at::Tensor& fn, const at::Tensor& scale, const at::Tensor& base,
    double rms_eps, double pre_eps) {
  const char* op = "hc_pre";
  const int64_t M = check_common(op, residual, fn, scale);
  check_floating(op, "base", base, residual);
  check_shape(op, "base", base, {M});
  check_eps(op, "rms_eps", rms_eps);
  check_eps(op, "pre_eps", pre_eps);
  HcPre p = params(residual, M);
  const at::Tensor r = residual.contiguous();
  const at::Tensor f = fn.to(p.acc).contiguous(), s = scale.to(p.acc).contiguous(), b = base.to(p.acc).contiguous();
  const at::IntArrayRef lead = residual.sizes().slice(0, residual.dim() - 2);
  const at::TensorOptions acc = residual.options().dtype(p.acc);
  at::Tensor x = at::empty(with_last(lead, p.C), residual.options());
  at::Tensor mixes = at::empty(with_last(lead, M), acc), proj = at::empty(with_last(lead, M), acc);
  at::Tensor rstd = at::empty(lead, acc);
  p.rms_eps = rms_eps;
  p.pre_eps = pre_eps;
  p.residual = r.const_data_ptr();
  p.fn = f.const_data_ptr();
  p.scale = s.const_data_ptr();
  p.base = b.const_data_ptr();
  p.x = x.mutable_data_ptr();
  p.mixes = mixes.mutable_data_ptr();
  p.proj = proj.mutable_data_ptr();
  p.rstd = rstd.mutable_data_ptr();
  if (p.tokens > 0) kernels().forward(p);
  return {x, mixes, proj, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> hc_pre_backward_cpu(
    const at::Tensor& grad_x, const std::optional<at::Tensor>& grad_mixes, const at::Tensor& residual,
    const at::Tensor& fn, const at::Tensor& scale, const at::Tensor& mixes, const at::Tensor& proj,
    const at::Tensor& rstd, double pre_eps) {
  const char* op = "_hc_pre_backward";
  const int64_t M = check_common(op, residual, fn, scale);
  check_eps(op, "pre_eps", pre_eps);
  HcPre p = params(residual, M);
  const at::IntArrayRef lead = residual.sizes().slice(0, residual.dim() - 2);
  check_shape(op, "grad_x", grad_x, with_last(lead, p.C));
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"mixes", &mixes}, {"proj", &proj}}) {
    check_shape(op, name, *t, with_last(lead, M));
  }
  check_shape(op, "rstd", rstd, lead);
  const bool has_gm = grad_mixes.has_value() && grad_mixes->defined();
  if (has_gm) {
    check_floating(op, "grad_mixes", *grad_mixes, residual);
    check_shape(op, "grad_mixes", *grad_mixes, with_last(lead, M));
  }
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"grad_x", &grad_x}, {"mixes", &mixes},
                                {"proj", &proj}, {"rstd", &rstd}}) {
    check_floating(op, name, *t, residual);
  }

  const at::TensorOptions acc = residual.options().dtype(p.acc);
  const at::Tensor r = residual.contiguous(), g = grad_x.to(residual.scalar_type()).contiguous();
  const at::Tensor f = fn.to(p.acc).contiguous(), s = scale.to(p.acc).contiguous();
  const at::Tensor mx = mixes.to(p.acc).contiguous(), pj = proj.to(p.acc).contiguous(), rs = rstd.to(p.acc).contiguous();
  const at::Tensor gm = has_gm ? grad_mixes->to(p.acc).contiguous() : at::Tensor();
  at::Tensor grad_residual = at::empty(residual.sizes(), residual.options());
  at::Tensor grad_fn = at::empty({M, p.n * p.C}, acc);
  at::Tensor grad_mix = at::empty(with_last(lead, M), acc);
  at::Tensor grad_dots = at::empty({p.tokens, M}, acc);
  p.pre_eps = pre_eps;
  p.residual = r.const_data_ptr();
  p.fn = f.const_data_ptr();
  p.scale = s.const_data_ptr();
  p.mixes = const_cast<void*>(mx.const_data_ptr());
  p.proj = const_cast<void*>(pj.const_data_ptr());
  p.rstd = const_cast<void*>(rs.const_data_ptr());
  p.grad_x = g.const_data_ptr();
  p.grad_mixes = has_gm ? gm.const_data_ptr() : nullptr;
  p.grad_residual = grad_residual.mutable_data_ptr();
  p.grad_fn = grad_fn.mutable_data_ptr();
  p.grad_mix = grad_mix.mutable_data_ptr();
  p.grad_dots = grad_dots.mutable_data_ptr();
  if (p.tokens > 0) {
    kernels().backward(p);
  } else {
    grad_fn.zero_();
  }
  return {grad_residual, grad_fn.to(fn.scalar_type()), grad_mix};
}

// hc_post's checks: residual (*, n, C), layer_output (*, C) of its dtype,
// post (*, n), h (*, n, n); returns the parameters without pointers.
HcPost check_post(const char* op, const at::Tensor& layer_output, const at::Tensor& residual, const at::Tensor& post,
                  const at::Tensor& h) {
  check_floating(op, "residual", residual, residual);
  TORCH_CHECK_VALUE(residual.dim() >= 2 && residual.size(-2) >= 1, op,
                    ": residual must have shape (*, n, C) with n >= 1, got ", residual.sizes());
  HcPost p;
  p.n = residual.size(-2);
  p.C = residual.size(-1);
  p.dtype = residual.scalar_type();
  p.tokens = residual.numel() == 0 ? 0 : residual.numel() / (p.n * p.C);
  const at::IntArrayRef lead = residual.sizes().slice(0, residual.dim() - 2);
  check_floating(op, "layer_output", layer_output, residual);
  TORCH_CHECK_TYPE(layer_output.scalar_type() == p.dtype, op, ": layer_output has dtype ",
                   layer_output.scalar_type(), " but residual has dtype ", p.dtype);
  check_shape(op, "layer_output", layer_output, with_last(lead, p.C));
  check_floating(op, "post", post, residual);
  check_shape(op, "post", post, with_last(lead, p.n));
  check_floating(op, "h", h, residual);
  std::vector<int64_t> hs = with_last(lead, p.n);
  hs.push_back(p.n);
  check_shape(op, "h", h, hs);
  return p;
}

at::Tensor hc_post_cpu(const at::Tensor& layer_output, const at::Tensor& residual, const at::Tensor& post,
                       const at::Tensor& h) {
  HcPost p = check_post("hc_post", layer_output, residual, post, h);
  const at::ScalarType acc = acc_type(p.dtype);
  const at::Tensor f = layer_output.contiguous(), r = residual.contiguous();
  const at::Tensor pw = post.to(acc).contiguous(), hw = h.to(acc).contiguous();
  at::Tensor out = at::empty(residual.sizes(), residual.options());
  p.layer_output = f.const_data_ptr();
  p.residual = r.const_data_ptr();
  p.post = pw.const_data_ptr();
  p.h = hw.const_data_ptr();
  p.out = out.mutable_data_ptr();
  if (p.tokens > 0) kernels().post_forward(p);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> hc_post_backward_cpu(
    const at::Tensor& grad, const at::Tensor& layer_output, const at::Tensor& residual, const at::Tensor& post,
    const at::Tensor& h) {
  const char* op = "_hc_post_backward";
  HcPost p = check_post(op, layer_output, residual, post, h);
  check_floating(op, "grad", grad, residual);
  check_shape(op, "grad", grad, residual.sizes());
  const at::ScalarType acc = acc_type(p.dtype);
  const at::Tensor g = grad.to(p.dtype).contiguous();
  const at::Tensor f = layer_output.contiguous(), r = residual.contiguous();
  const at::Tensor pw = post.to(acc).contiguous(), hw = h.to(acc).contiguous();
  at::Tensor grad_f = at::empty(layer_output.sizes(), layer_output.options());
  at::Tensor grad_r = at::empty(residual.sizes(), residual.options());
  at::Tensor grad_post = at::empty(post.sizes(), post.options().dtype(acc));
  at::Tensor grad_h = at::empty(h.sizes(), h.options().dtype(acc));
  p.layer_output = f.const_data_ptr();
  p.residual = r.const_data_ptr();
  p.post = pw.const_data_ptr();
  p.h = hw.const_data_ptr();
  p.grad = g.const_data_ptr();
  p.grad_layer_output = grad_f.mutable_data_ptr();
  p.grad_residual = grad_r.mutable_data_ptr();
  p.grad_post = grad_post.mutable_data_ptr();
  p.grad_h = grad_h.mutable_data_ptr();
  if (p.tokens > 0) kernels().post_backward(p);
  return {grad_f, grad_r, grad_post.to(post.scalar_type()), grad_h.to(h.scalar_type())};
}

} // namespace

TORCH_LIBRARY_IMPL(simplex_param, CPU, m) {
  m.impl("hc_pre", &hc_pre_cpu);
  m.impl("_hc_pre_backward", &hc_pre_backward_cpu);
  m.impl("hc_post", &hc_post_cpu);
  m.impl("_hc_post_backward", &hc_post_backward_cpu);
}

} // namespace cpu
} // namespace simplex_param
