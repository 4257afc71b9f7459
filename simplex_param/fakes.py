r"""Fake kernels of the compiled ops, for ``torch.compile`` and meta tensors:
the output's shape, dtype and strides without computing it, after the same
argument checks as the op. :func:`register` is called by :mod:`simplex_param.ops`
when the extension is loaded.

The strides follow the layout rule of ``csrc/layout.cpp``, written here in
Python: the output is laid out as the inputs walk.
"""
import torch
from torch import Tensor

from . import checks, maps, sinkhorn


def _walk_strides(tensors: list, row_dims: int, shape=None) -> tuple:
    """The layout rule of csrc/layout.cpp: the strides of the first tensor that
    is non-overlapping and dense with its first `row_dims` dimensions
    outermost and in order, else the contiguous strides (of `shape`, or of
    the tensors')."""
    for t in tensors:
        if _walkable(t, row_dims):
            return t.stride()
    strides, expected = [], 1
    for size in reversed(shape if shape is not None else tensors[-1].shape):
        strides.append(expected)
        expected *= max(size, 1)
    return tuple(reversed(strides))


def _walkable(t: Tensor, row_dims: int) -> bool:
    # c10's non-overlapping-and-dense test: the dims of size >= 2, ordered by
    # stride, are laid out contiguously.
    expected = 1
    for size, stride in sorted(((n, s) for n, s in zip(t.shape, t.stride()) if n >= 2), key=lambda d: d[1]):
        if stride != expected:
            return False
        expected *= size
    expected = 1
    for i in reversed(range(t.dim())):
        if i < row_dims and t.shape[i] > 1 and t.stride(i) != expected:
            return False
        expected *= t.shape[i]
    return True


def _fake_weighted_sum(weights, inputs):
    checks.check_args(weights, inputs, "weights")
    x0 = inputs[0]
    return x0.new_empty_strided(x0.shape, _walk_strides(inputs, weights.dim() - 1))


def _fake_weighted_sum_backward(grad, weights, inputs, weights_requires_grad, inputs_requires_grad,
                                skip_zero_weights=False):
    checks.check_backward_args(grad, weights, inputs, weights_requires_grad, inputs_requires_grad)
    strides = _walk_strides([grad, *(inputs if weights_requires_grad else ())], weights.dim() - 1)
    grad_weights = weights.new_empty(weights.shape if weights_requires_grad else (0,))
    grad_inputs = [grad.new_empty_strided(grad.shape, strides) if need else grad.new_empty(0)
                   for need in inputs_requires_grad]
    return grad_weights, grad_inputs


def _stacked_strides(shape, strides, row_dims: int, M: int) -> tuple:
    """mix's output layout (contraction.h): the inputs' strides with M
    inserted after the rows, each output one row's length apart."""
    rows = 1
    for n in shape[:row_dims]:
        rows *= n
    numel = 1
    for n in shape:
        numel *= n
    row_len = numel // rows if rows else 0
    return tuple(s * M for s in strides[:row_dims]) + (row_len,) + tuple(strides[row_dims:])


def _fake_mix(weights, inputs):
    checks.check_mix_args(weights, inputs, "weights")
    x0, row_dims, M = inputs[0], weights.dim() - 2, weights.shape[-2]
    shape = (*x0.shape[:row_dims], M, *x0.shape[row_dims:])
    return x0.new_empty_strided(shape, _stacked_strides(x0.shape, _walk_strides(inputs, row_dims), row_dims, M))


def _fake_mix_backward(grad, weights, inputs, weights_requires_grad, inputs_requires_grad):
    checks.check_mix_backward_args(grad, weights, inputs, weights_requires_grad, inputs_requires_grad)
    row_dims = weights.dim() - 2
    shape = (*grad.shape[:row_dims], *grad.shape[row_dims + 1:])
    strides = _walk_strides(inputs, row_dims) if weights_requires_grad else _walk_strides([], 0, shape)
    grad_inputs = [grad.new_empty_strided(shape, strides) if need else grad.new_empty(0)
                   for need in inputs_requires_grad]
    return weights.new_empty(weights.shape if weights_requires_grad else (0,)), grad_inputs


def _fake_simplex_weighted_sum(logits, inputs, map="softmax", temperature=1.0, alpha=None):
    checks.check_args(logits, inputs, "logits")
    checks.check_map(map, maps.MAPS)
    checks.check_temperature(temperature)
    checks.check_alpha(alpha, map, maps.MAPS[map].has_alpha)
    x0 = inputs[0]
    return x0.new_empty_strided(x0.shape, _walk_strides(inputs, logits.dim() - 1))


def _fake_grouped_weighted_sum(weights, inputs):
    checks.check_grouped_args(weights, inputs, "weights")
    K = weights.shape[1]
    groups = [inputs[g * K:(g + 1) * K] for g in range(weights.shape[0])]
    return [group[0].new_empty_strided(group[0].shape, _walk_strides(group, 0)) for group in groups]


def _fake_grouped_weighted_sum_backward(grads, weights, inputs, weights_requires_grad, inputs_requires_grad):
    checks.check_grouped_backward_args(grads, weights, inputs, weights_requires_grad, inputs_requires_grad)
    K = weights.shape[1]
    grad_inputs = []
    for g, grad in enumerate(grads):
        strides = _walk_strides([grad, *(inputs[g * K:(g + 1) * K] if weights_requires_grad else ())], 0)
        grad_inputs += [grad.new_empty_strided(grad.shape, strides)
                        for need in inputs_requires_grad[g * K:(g + 1) * K] if need]
    return weights.new_empty(weights.shape if weights_requires_grad else (0,)), grad_inputs


def _fake_sinkhorn(logits, iters, eps):
    sinkhorn._check(logits, iters, eps, "unroll")
    return logits.new_empty(logits.shape)


def _fake_sinkhorn_backward(grad, logits, iters, eps):
    sinkhorn._check(logits, iters, eps, "unroll")
    sinkhorn._check_grad(grad, logits)
    return logits.new_empty(logits.shape)


def register() -> None:
    """Register the fake kernels of the ops that have none in C++."""
    lib = "simplex_param::"
    torch.library.register_fake(lib + "grouped_weighted_sum")(_fake_grouped_weighted_sum)
    torch.library.register_fake(lib + "_grouped_weighted_sum_backward")(_fake_grouped_weighted_sum_backward)
    torch.library.register_fake(lib + "weighted_sum")(_fake_weighted_sum)
    torch.library.register_fake(lib + "_weighted_sum_backward")(_fake_weighted_sum_backward)
    torch.library.register_fake(lib + "simplex_weighted_sum")(_fake_simplex_weighted_sum)
    torch.library.register_fake(lib + "mix")(_fake_mix)
    torch.library.register_fake(lib + "_mix_backward")(_fake_mix_backward)
    torch.library.register_fake(lib + "sinkhorn")(_fake_sinkhorn)
    torch.library.register_fake(lib + "_sinkhorn_backward")(_fake_sinkhorn_backward)
