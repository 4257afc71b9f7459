r"""Pure-PyTorch twins of the fused ops.

They have the signatures and semantics of the compiled ops in
:mod:`simplex_param.ops`, are used when the extension is not loaded, and are
the oracle the tests compare the kernels against. They are built from
differentiable PyTorch ops, so autograd (to any order) and ``torch.compile``
work through them.

Shapes: ``weights: (K,)``, ``inputs: K tensors of shape (...)``, result ``(...)``.
"""
import torch
from torch import Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for inputs of `dtype`: float64 stays, all else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def weighted_sum(weights: Tensor, inputs: list[Tensor]) -> Tensor:
    r"""``sum_k weights[k] * inputs[k]``, accumulated in float32 (float64 for float64 inputs)."""
    dtype = inputs[0].dtype
    acc = acc_dtype(dtype)
    w = weights.to(acc)
    out = w[0] * inputs[0].to(acc)
    for k in range(1, len(inputs)):
        out = out + w[k] * inputs[k].to(acc)
    return out.to(dtype)


def simplex_weights(logits: Tensor, temperature: float, dtype: torch.dtype) -> Tensor:
    """``softmax(logits / temperature)`` in the accumulation dtype of inputs of `dtype`."""
    return torch.softmax(logits.to(acc_dtype(dtype)) / temperature, dim=0)


def softmax_weighted_sum(logits: Tensor, inputs: list[Tensor], temperature: float = 1.0) -> Tensor:
    r"""``sum_k softmax(logits / temperature)[k] * inputs[k]``."""
    return weighted_sum(simplex_weights(logits, temperature, inputs[0].dtype), inputs)


def weighted_sum_backward(grad, weights, inputs, weights_requires_grad, inputs_requires_grad, softmax, temperature=1.0):
    """The backward of both ops from differentiable PyTorch ops (used for double backward).

    Returns ``(grad_weights or None, [grad_input_k or None])``; the gradients of
    inputs are ``w_k * grad``, that of the weights ``d_k = <grad, x_k>``, passed
    through the softmax Jacobian ``p * (d - <p, d>) / T`` for the softmax op.
    """
    dtype = grad.dtype
    acc = acc_dtype(dtype)
    w = simplex_weights(weights, temperature, dtype) if softmax else weights.to(acc)
    g = grad.to(acc)
    grad_inputs = [(w[k] * g).to(dtype) if need else None for k, need in enumerate(inputs_requires_grad)]
    grad_weights = None
    if weights_requires_grad:
        d = torch.stack([(g * x.to(acc)).sum() for x in inputs])
        if softmax:
            d = w * (d - (w * d).sum()) / temperature
        grad_weights = d.to(weights.dtype)
    return grad_weights, grad_inputs
