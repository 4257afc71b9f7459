// The pre-mix of manifold-constrained hyper-connections (mHC), fused: one
// op from the residual to the layer input (simplex_param/hyper_connections.py
// has the semantics). Per token, r = the n streams of width C flattened to
// D = n C values in the compute dtype (float32; float64 for float64):
//
//   rstd   = 1 / sqrt(sum(r^2) / D + rms_eps)
//   proj   = (fn @ r) * rstd                             M = n (n + 2) values
//   mixes  = proj * scale[group] + base                  group 0: m < n, 1: m < 2n, 2: the rest
//   x      = sum_j (sigmoid(mixes[j]) + pre_eps) * r_j    the layer input, C values
//
// hc_pre returns (x, mixes, proj, rstd); the last two are what the backward
// reads, as native_layer_norm returns its rstd. _hc_pre_backward takes the
// gradients of x and of the mixes and returns those of the residual, of fn
// and the mixes' whole gradient (theirs plus the pre entries' share from x),
// from which scale's and base's gradients are sums (hyper_connections.py).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace simplex_param {

struct HcPre {
  int64_t tokens = 0, n = 0, C = 0, M = 0;  // M = n (n + 2); a token is n C values
  at::ScalarType dtype;                     // of the residual, x and their gradients
  at::ScalarType acc;                       // the compute dtype, of everything else
  double rms_eps = 0.0, pre_eps = 0.0;
  const void* residual = nullptr;           // tokens x n C, contiguous
  const void* fn = nullptr;                 // M x n C
  const void* scale = nullptr;              // 3
  const void* base = nullptr;               // M
  // The forward writes these; the backward reads mixes, proj and rstd.
  void* x = nullptr;                        // tokens x C
  void* mixes = nullptr;                    // tokens x M
  void* proj = nullptr;                     // tokens x M
  void* rstd = nullptr;                     // tokens
  // Backward.
  const void* grad_x = nullptr;             // tokens x C
  const void* grad_mixes = nullptr;         // tokens x M, or null (zero)
  void* grad_residual = nullptr;            // tokens x n C
  void* grad_fn = nullptr;                  // M x n C
  void* grad_mix = nullptr;                 // tokens x M: the mixes' whole gradient
  void* grad_dots = nullptr;                // tokens x M scratch: the gradient of fn @ r
};

// mHC's post-mix, fused: out_i = post_i * layer_output + sum_j H[j, i] r_j
// per token, the sums in the compute dtype in that order (post first, then
// j = 0 .. n - 1). Its backward, per token:
//   grad_layer_output = sum_i post_i g_i       grad_post_i = <g_i, layer_output>
//   grad_r_j = sum_i H[j, i] g_i               grad_H[j, i] = <g_i, r_j>
struct HcPost {
  int64_t tokens = 0, n = 0, C = 0;
  at::ScalarType dtype;                     // of layer_output, residual, out and their gradients
  const void* layer_output = nullptr;       // tokens x C, contiguous
  const void* residual = nullptr;           // tokens x n x C
  const void* post = nullptr;               // tokens x n, compute dtype
  const void* h = nullptr;                  // tokens x n x n, compute dtype
  void* out = nullptr;                      // forward: tokens x n x C
  const void* grad = nullptr;               // backward: out's gradient
  void* grad_layer_output = nullptr;
  void* grad_residual = nullptr;
  void* grad_post = nullptr;
  void* grad_h = nullptr;
};

using HcKernel = void (*)(const HcPre&);
using HcPostKernel = void (*)(const HcPost&);

} // namespace simplex_param
