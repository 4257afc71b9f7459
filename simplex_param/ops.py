r"""The fused weighted-sum operators: public functions, argument checks, and
the ``torch.library`` fake and autograd registrations of the compiled ops.

Which implementation runs is chosen here, per call, by the device of the
inputs: the compiled kernel when the extension is loaded and has a kernel for
that device, else the pure-PyTorch reference (:mod:`simplex_param.reference`).
"""
import math
from collections.abc import Sequence

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from . import _ext, reference

__all__ = ["softmax_weighted_sum", "weighted_sum"]

_OPS = ("softmax_weighted_sum", "weighted_sum", "_softmax_weighted_sum_backward", "_weighted_sum_backward")


# --------------------------------------------------------------------------
# Argument checks. The messages are word for word those of csrc/validation.cpp.
# --------------------------------------------------------------------------

def _check_container(inputs) -> None:
    """`inputs` must be a sequence, or a tensor with a first dimension K."""
    if isinstance(inputs, Tensor):
        if inputs.dim() == 0:
            raise ValueError("inputs given as a single tensor must have a first dimension K, got a 0-D tensor")
    elif not isinstance(inputs, Sequence) or isinstance(inputs, (str, bytes)):
        raise TypeError(f"inputs must be a list or tuple of tensors, or one tensor, got {type(inputs).__name__}")


def _as_list(inputs) -> list:
    """`inputs` as a list of tensors; a single tensor is split (as views) along dim 0."""
    _check_container(inputs)
    if isinstance(inputs, Tensor):
        return list(inputs.unbind(0))
    for i, x in enumerate(inputs):
        if not isinstance(x, Tensor):
            raise TypeError(f"inputs[{i}] must be a Tensor, got {type(x).__name__}")
    return list(inputs)


def _check_tensor(t, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")


def _check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    temperature = float(temperature)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    return temperature


def _check_args(weights: Tensor, inputs: list, name: str) -> None:
    K = len(inputs)
    if K < 1:
        raise ValueError("inputs must contain at least one tensor")
    if weights.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor, got a tensor of {weights.dim()} dimensions")
    if not weights.dtype.is_floating_point:
        raise TypeError(f"{name} must have a floating dtype, got {weights.dtype}")
    if weights.shape[0] != K:
        raise ValueError(f"{name} has {weights.shape[0]} entries but inputs has {K} tensors")
    x0 = inputs[0]
    if not x0.dtype.is_floating_point:
        raise TypeError(f"inputs[0] must have a floating dtype, got {x0.dtype}")
    for k in range(1, K):
        x = inputs[k]
        if x.dtype != x0.dtype:
            raise TypeError(f"inputs[{k}] has dtype {x.dtype} but inputs[0] has dtype {x0.dtype}")
        if x.shape != x0.shape:
            raise ValueError(f"inputs[{k}] has shape {list(x.shape)} but inputs[0] has shape {list(x0.shape)}")
        if x.device != x0.device:
            raise ValueError(f"inputs[{k}] is on device {x.device} but inputs[0] is on device {x0.device}")
    if weights.device != x0.device:
        raise ValueError(f"{name} is on device {weights.device} but inputs are on device {x0.device}")


# --------------------------------------------------------------------------
# Public functions.
# --------------------------------------------------------------------------

def _has_kernel(device_type: str) -> bool:
    return _KERNEL_DEVICES.get(device_type, False)


def _use_compiled(weights: Tensor, inputs: list) -> bool:
    """Whether the compiled op can run this call. It has no batching rule and
    no forward-mode derivative, so under a torch.func transform (vmap, grad,
    jvp) or with a forward-mode tangent the reference, built from PyTorch
    ops, runs instead."""
    if not (inputs and _has_kernel(inputs[0].device.type)):
        return False
    if torch._C._are_functorch_transforms_active():
        return False
    return fwAD._current_level < 0 or all(fwAD.unpack_dual(t).tangent is None for t in (weights, *inputs))


def softmax_weighted_sum(logits: Tensor, inputs, *, temperature: float = 1.0) -> Tensor:
    r"""Fused ``sum_k softmax(logits / temperature)[k] * inputs[k]``.

    .. math::
        \mathrm{out} = \sum_{k=1}^{K} p_k x_k, \qquad
        p = \mathrm{softmax}(\ell / T)

    Args:
        logits (Tensor): pre-softmax weights, shape ``(K,)``, any floating dtype.
        inputs (list of Tensor or Tensor): K tensors of one shape, dtype and
            device, or one tensor of shape ``(K, ...)``. Never stacked or copied.
        temperature (float, optional): softmax temperature, positive and finite.
            Default: ``1.0``.

    Returns:
        Tensor of the shape and dtype of one input. float16 and bfloat16 inputs
        accumulate in float32. The gradient of ``logits`` has the logits' dtype.

    Non-finite logits propagate as in :func:`torch.softmax`: ``-inf`` gives a
    zero weight, all ``-inf`` or any ``+inf``/NaN gives NaN. They are not
    checked, since that would synchronise with the device.

    Example::

        >>> logits = torch.zeros(3, requires_grad=True)
        >>> xs = [torch.full((2,), float(k)) for k in range(3)]
        >>> sp.softmax_weighted_sum(logits, xs)
        tensor([1., 1.], grad_fn=<...>)
    """
    inputs = _as_list(inputs)
    _check_tensor(logits, "logits")
    temperature = _check_temperature(temperature)
    if _use_compiled(logits, inputs):
        return torch.ops.simplex_param.softmax_weighted_sum(logits, inputs, temperature)
    _check_args(logits, inputs, "logits")
    return reference.softmax_weighted_sum(logits, inputs, temperature)


def weighted_sum(weights: Tensor, inputs) -> Tensor:
    r"""Fused ``sum_k weights[k] * inputs[k]``, the weights used as given.

    Args:
        weights (Tensor): shape ``(K,)``, any floating dtype and any real values.
        inputs (list of Tensor or Tensor): as in :func:`softmax_weighted_sum`.

    Returns:
        Tensor of the shape and dtype of one input.

    Example::

        >>> sp.weighted_sum(torch.tensor([0.25, 0.75]), torch.tensor([[4.0], [8.0]]))
        tensor([7.])
    """
    inputs = _as_list(inputs)
    _check_tensor(weights, "weights")
    if _use_compiled(weights, inputs):
        return torch.ops.simplex_param.weighted_sum(weights, inputs)
    _check_args(weights, inputs, "weights")
    return reference.weighted_sum(weights, inputs)


# --------------------------------------------------------------------------
# torch.library registrations (only when the compiled ops exist).
# --------------------------------------------------------------------------

def _is_non_overlapping_and_dense(t: Tensor) -> bool:
    """c10's test: the dims of size >= 2, ordered by stride, are laid out contiguously."""
    expected = 1
    for size, stride in sorted(((n, s) for n, s in zip(t.shape, t.stride()) if n >= 2), key=lambda d: d[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _dense_empty_like(tensors: list) -> Tensor:
    """An empty tensor in the layout the kernels give their outputs (csrc: dense_operands)."""
    t0 = tensors[0]
    shared = _is_non_overlapping_and_dense(t0) and all(
        t.stride() == t0.stride() for t in tensors[1:]
    )
    if shared:
        return torch.empty_like(t0)
    return t0.new_empty(t0.shape)


def _fake_forward(weights, inputs, temperature, name):
    _check_args(weights, inputs, name)
    _check_temperature(temperature)
    return _dense_empty_like(inputs)


def _fake_backward(grad, weights, inputs, weights_requires_grad, inputs_requires_grad):
    layout = [grad] + (list(inputs) if weights_requires_grad else [])
    grad_weights = weights.new_empty(weights.shape[0] if weights_requires_grad else 0)
    grad_inputs = [_dense_empty_like(layout) if need else grad.new_empty(0) for need in inputs_requires_grad]
    return grad_weights, grad_inputs


def _setup_context(ctx, inputs, output, softmax):
    weights, xs = inputs[0], inputs[1]
    ctx.temperature = inputs[2] if softmax else 1.0
    ctx.weights_requires_grad = weights.requires_grad
    ctx.inputs_requires_grad = [x.requires_grad for x in xs]
    # The inputs are needed only for the gradient of the weights.
    ctx.save_for_backward(weights, *(xs if weights.requires_grad else ()))


def _backward(ctx, grad, softmax):
    weights, *xs = ctx.saved_tensors
    need_w, need_x = ctx.weights_requires_grad, ctx.inputs_requires_grad
    if torch.is_grad_enabled():
        # create_graph=True: compose the backward from differentiable ops,
        # so that double backward (gradgradcheck, DARTS) is exact.
        grad_w, grad_x = reference.weighted_sum_backward(
            grad, weights, xs, need_w, need_x, softmax, ctx.temperature
        )
    else:
        if softmax:
            grad_w, grad_x = torch.ops.simplex_param._softmax_weighted_sum_backward(
                grad, weights, xs, ctx.temperature, need_w, need_x
            )
        else:
            grad_w, grad_x = torch.ops.simplex_param._weighted_sum_backward(grad, weights, xs, need_w, need_x)
        grad_w = grad_w if need_w else None
        grad_x = [g if need else None for g, need in zip(grad_x, need_x)]
    # One entry per argument the op was called with (a defaulted temperature
    # may be absent).
    return (grad_w, grad_x, None)[: len(ctx.needs_input_grad)]


def _register():
    lib = "simplex_param::"
    torch.library.register_fake(lib + "softmax_weighted_sum")(
        lambda logits, inputs, temperature=1.0: _fake_forward(logits, inputs, temperature, "logits")
    )
    torch.library.register_fake(lib + "weighted_sum")(
        lambda weights, inputs: _fake_forward(weights, inputs, 1.0, "weights")
    )
    torch.library.register_fake(lib + "_softmax_weighted_sum_backward")(
        lambda grad, logits, inputs, temperature, need_l, need_x: _fake_backward(grad, logits, inputs, need_l, need_x)
    )
    torch.library.register_fake(lib + "_weighted_sum_backward")(_fake_backward)
    torch.library.register_autograd(
        lib + "softmax_weighted_sum",
        lambda ctx, grad: _backward(ctx, grad, softmax=True),
        setup_context=lambda ctx, inputs, output: _setup_context(ctx, inputs, output, softmax=True),
    )
    torch.library.register_autograd(
        lib + "weighted_sum",
        lambda ctx, grad: _backward(ctx, grad, softmax=False),
        setup_context=lambda ctx, inputs, output: _setup_context(ctx, inputs, output, softmax=False),
    )


def _kernel_devices() -> dict:
    """Device types with a compiled kernel for every op, read from the dispatcher."""
    if not _ext.extension_loaded():
        return {}
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return {
        device: all(has(f"simplex_param::{op}", key) for op in _OPS)
        for device, key in (("cpu", "CPU"), ("cuda", "CUDA"), ("meta", "Meta"))
    }


if _ext.extension_loaded():
    _register()
_KERNEL_DEVICES = _kernel_devices()
