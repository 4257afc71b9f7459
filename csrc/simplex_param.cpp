// Operator schemas of the simplex_param library.
//
//   weighted_sum            the contraction, out = sum_k w[..., k] * x_k:
//                           kernels per backend (cpu/, cuda/), autograd in
//                           autograd.cpp
//   simplex_weighted_sum    a weight map over the last dimension of the
//                           logits (the registry in maps.cpp) composed with
//                           the contraction (simplex_ops.cpp); autograd in
//                           autograd.cpp
//   softmax_weighted_sum    simplex_weighted_sum with the softmax map
//   mix                     M contractions of the same K inputs, out_m =
//                           sum_k w[..., m, k] * x_k: weighted_sum's kernels
//                           with M outputs; autograd in autograd.cpp
//   grouped_weighted_sum    G contractions in one call, group g with its own
//                           weight row and its own shape and dtype
//   grouped_simplex_weighted_sum  a map of (G, K) logits, then the above
//   sinkhorn                mHC's Sinkhorn normalisation of (*P, n, n) logits:
//                           kernels per backend (cpu/sinkhorn_cpu.cpp, ...),
//                           shared code in sinkhorn.cpp, autograd in
//                           sinkhorn_autograd.cpp
//   hc_pre, hc_post         mHC's fused pre-mix and post-mix: CPU kernels
//                           (cpu/hc_cpu.cpp), autograd in
//                           simplex_param/hyper_connections.py
// Fake kernels for torch.compile are registered from Python
// (simplex_param/ops.py); the module `simplex_param._C` is python_module.cpp.
#include <torch/library.h>

TORCH_LIBRARY(simplex_param, m) {
  // weights: (K,) shared by every element, or (*P, K) with P a leading
  // prefix of the inputs' shape.
  m.def("weighted_sum(Tensor weights, Tensor[] inputs) -> Tensor");
  // `inputs` may be empty when the weights need no gradient. One entry of
  // `inputs_requires_grad` per input; gradients not asked for are empty.
  // With `skip_zero_weights`, the weights' gradient is 0 where a weight is
  // 0, without reading that input: for the maps whose vector-Jacobian
  // product ignores it there (SimplexMap::ignores_zero_weights).
  m.def(
      "_weighted_sum_backward(Tensor grad, Tensor weights, Tensor[] inputs, "
      "bool weights_requires_grad, bool[] inputs_requires_grad, bool skip_zero_weights=False) "
      "-> (Tensor, Tensor[])");
  // sum_k map(logits / temperature)[..., k] * x_k, for a map of maps.cpp;
  // alpha is the map's parameter, for a map that has one (entmax_bisect).
  m.def(
      "simplex_weighted_sum(Tensor logits, Tensor[] inputs, str map=\"softmax\", "
      "float temperature=1.0, float? alpha=None) -> Tensor");
  m.def("softmax_weighted_sum(Tensor logits, Tensor[] inputs, float temperature=1.0) -> Tensor");
  // weights: (M, K), or (*P, M, K) with P a leading prefix of the inputs'
  // shape (*P, *rest); the output is (*P, M, *rest).
  m.def("mix(Tensor weights, Tensor[] inputs) -> Tensor");
  // grad: (*P, M, *rest). As _weighted_sum_backward otherwise.
  m.def(
      "_mix_backward(Tensor grad, Tensor weights, Tensor[] inputs, "
      "bool weights_requires_grad, bool[] inputs_requires_grad) -> (Tensor, Tensor[])");
  // weights (G, K); inputs flattened group by group, inputs[g * K + k] being
  // input k of group g. One output per group.
  m.def("grouped_weighted_sum(Tensor weights, Tensor[] inputs) -> Tensor[]");
  // `inputs` may be empty when the weights need no gradient; one entry of
  // `inputs_requires_grad` per input, and one gradient returned per True
  // entry, in order (a frozen input costs nothing, not even an empty tensor).
  m.def(
      "_grouped_weighted_sum_backward(Tensor[] grads, Tensor weights, Tensor[] inputs, "
      "bool weights_requires_grad, bool[] inputs_requires_grad) -> (Tensor, Tensor[])");
  m.def(
      "grouped_simplex_weighted_sum(Tensor logits, Tensor[] inputs, str map=\"softmax\", "
      "float temperature=1.0, float? alpha=None) -> Tensor[]");
  // simplex_param/sinkhorn.py's semantics; the result is contiguous, in the
  // logits' dtype. The backward recomputes the iterates from the logits.
  m.def("sinkhorn(Tensor logits, int iters, float eps) -> Tensor");
  m.def("_sinkhorn_backward(Tensor grad, Tensor logits, int iters, float eps) -> Tensor");
  // mHC's pre-mix, fused (hyper_connections.h): (layer input, mixes, proj,
  // rstd). CPU kernels only; other devices run the composite.
  m.def(
      "hc_pre(Tensor residual, Tensor fn, Tensor scale, Tensor base, float rms_eps, float pre_eps) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // (grad of the residual, grad of fn, the mixes' whole gradient).
  m.def(
      "_hc_pre_backward(Tensor grad_x, Tensor? grad_mixes, Tensor residual, Tensor fn, Tensor scale, "
      "Tensor mixes, Tensor proj, Tensor rstd, float pre_eps) -> (Tensor, Tensor, Tensor)");
  // mHC's post-mix, fused: layer_output (*, C) in the residual's dtype,
  // residual (*, n, C), post (*, n), h (*, n, n); the new residual. CPU only.
  m.def("hc_post(Tensor layer_output, Tensor residual, Tensor post, Tensor h) -> Tensor");
  // (grad of layer_output, of the residual, of post, of h).
  m.def(
      "_hc_post_backward(Tensor grad, Tensor layer_output, Tensor residual, Tensor post, Tensor h) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}
