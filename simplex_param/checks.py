"""Argument checks of the fallback and of the fake kernels.

The exception types and texts come from ``errors.def``, the table the
compiled ops use too (``csrc/checks.cpp``), so both paths raise the same
errors; tests/test_ops.py holds them to it.
"""
import math
import numbers
import os
import re

import torch
from torch import Tensor


# The dtypes the kernels take; weights may have any floating dtype.
KERNEL_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


def _read_table() -> dict:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "errors.def")
    with open(path, encoding="utf-8") as f:
        entries = re.findall(r'^SP_ERROR\((\w+), (\w+), "(.*)"\)$', f.read(), re.MULTILINE)
    kinds = {"ValueError": ValueError, "TypeError": TypeError}
    return {name: (kinds[kind], text) for name, kind, text in entries}


ERRORS = _read_table()


def error(entry: str, /, **fields) -> Exception:
    """The exception of table entry `entry`, with its fields filled in."""
    kind, text = ERRORS[entry]
    return kind(text.format(**fields))


def _check_prefix(weights: Tensor, name: str, other_shape, other: str, matrix_dims: int = 1) -> None:
    prefix = tuple(weights.shape[:weights.dim() - matrix_dims])
    if tuple(other_shape[: len(prefix)]) != prefix or len(prefix) > len(other_shape):
        raise error("weights_prefix", name=name, shape=list(weights.shape), other_shape=list(other_shape), other=other)


def _check_weights(weights: Tensor, name: str) -> None:
    if weights.dim() == 0:
        raise error("weights_0d", name=name)
    if not weights.dtype.is_floating_point:
        raise error("weights_dtype", name=name, dtype=weights.dtype)


def check_inputs(inputs: list, inputs_name: str = "inputs") -> None:
    """At least one tensor, all of one kernel dtype, shape and device; named
    ``inputs_name[k]`` in errors."""
    if len(inputs) < 1:
        raise error("no_inputs")
    x0 = inputs[0]
    if x0.dtype not in KERNEL_DTYPES:
        raise error("input_dtype", inputs=inputs_name, dtype=x0.dtype)
    for k in range(1, len(inputs)):
        x = inputs[k]
        if x.dtype != x0.dtype:
            raise error("input_dtype_mismatch", inputs=inputs_name, k=k, dtype=x.dtype, dtype0=x0.dtype)
        if x.shape != x0.shape:
            raise error("input_shape_mismatch", inputs=inputs_name, k=k, shape=list(x.shape), shape0=list(x0.shape))
        if x.device != x0.device:
            raise error("input_device_mismatch", inputs=inputs_name, k=k, device=x.device, device0=x0.device)


def check_args(weights: Tensor, inputs: list, name: str) -> None:
    """`weights` (``(K,)`` or ``(*P, K)``, called `name`) against K inputs of one shape, dtype and device."""
    if len(inputs) < 1:
        raise error("no_inputs")
    _check_weights(weights, name)
    if weights.shape[-1] != len(inputs):
        raise error("weights_k", name=name, n=weights.shape[-1], inputs="inputs", K=len(inputs))
    check_inputs(inputs, "inputs")
    x0 = inputs[0]
    _check_prefix(weights, name, x0.shape, "inputs[0]")
    if weights.device != x0.device:
        raise error("weights_device", name=name, device=weights.device, other="inputs[0]", other_device=x0.device)


def check_mix_args(weights: Tensor, inputs: list, name: str) -> None:
    """mix's `weights` (``(M, K)`` or ``(*P, M, K)``, called `name`) against K inputs."""
    if weights.dim() < 2:
        raise error("mix_weights", name=name, shape=list(weights.shape))
    _check_weights(weights, name)
    if weights.shape[-1] != len(inputs):
        raise error("weights_k", name=name, n=weights.shape[-1], inputs="inputs", K=len(inputs))
    check_inputs(inputs, "inputs")
    x0 = inputs[0]
    _check_prefix(weights, name, x0.shape, "inputs[0]", 2)
    if weights.device != x0.device:
        raise error("weights_device", name=name, device=weights.device, other="inputs[0]", other_device=x0.device)


def check_mix_backward_args(grad, weights, inputs, weights_requires_grad, inputs_requires_grad) -> None:
    """The arguments of ``_mix_backward``: grad ``(*P, M, *rest)``."""
    if weights.dim() < 2:
        raise error("mix_weights", name="weights", shape=list(weights.shape))
    _check_weights(weights, "weights")
    K, P = weights.shape[-1], weights.dim() - 2
    if len(inputs_requires_grad) != K:
        raise error("requires_grad_count", n=len(inputs_requires_grad), K=K)
    if grad.dtype not in KERNEL_DTYPES:
        raise error("grad_dtype", grad="grad", dtype=grad.dtype)
    _check_prefix(weights, "weights", grad.shape, "grad", 1)
    if weights.device != grad.device:
        raise error("weights_device", name="weights", device=weights.device, other="grad", other_device=grad.device)
    if weights_requires_grad:
        check_mix_args(weights, inputs, "weights")
        expected = list(inputs[0].shape)
        expected.insert(P, weights.shape[-2])
        if list(grad.shape) != expected:
            raise error("mix_grad_shape", grad="grad", shape=list(grad.shape), expected=expected)
        if grad.dtype != inputs[0].dtype:
            raise error("grad_dtype_mismatch", grad="grad", dtype=grad.dtype, inputs="inputs", dtype0=inputs[0].dtype)


def check_grouped_weights(weights: Tensor, name: str) -> None:
    """`weights` of a grouped op: ``(G, K)``, floating."""
    if weights.dim() != 2:
        raise error("grouped_weights", name=name, shape=list(weights.shape))
    _check_weights(weights, name)


def check_grouped_args(weights: Tensor, inputs: list, name: str) -> None:
    """A grouped op's `weights` ``(G, K)`` against its G * K flat inputs,
    ``inputs[g * K + k]`` being ``groups[g][k]``: within a group, one shape,
    dtype and device, that of the weights."""
    check_grouped_weights(weights, name)
    G, K = weights.shape
    if len(inputs) != G * K:
        raise error("grouped_count", n=len(inputs), name=name, shape=list(weights.shape), GK=G * K)
    if G > 0 and K == 0:
        raise error("no_inputs")
    for g in range(G):
        group = inputs[g * K:(g + 1) * K]
        check_inputs(group, f"groups[{g}]")
        if weights.device != group[0].device:
            raise error("weights_device", name=name, device=weights.device, other=f"groups[{g}][0]",
                        other_device=group[0].device)


def check_float_temperature(temperature) -> float:
    """A positive finite Python number (numpy scalars included), as a float."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    temperature = float(temperature)
    if not (math.isfinite(temperature) and temperature > 0):
        raise error("temperature", value=repr(temperature))
    return temperature


def check_temperature(temperature):
    """A Python number (checked, returned as a float) or a 0-D floating tensor
    (returned as is: its value is not read, which would synchronise a GPU)."""
    if isinstance(temperature, Tensor):
        if temperature.dim() != 0 or not temperature.dtype.is_floating_point:
            raise TypeError(
                "temperature given as a tensor must be a 0-D floating tensor, "
                f"got a {temperature.dim()}-D tensor of dtype {temperature.dtype}"
            )
        return temperature
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a float or a 0-D tensor, got {type(temperature).__name__}")
    return check_float_temperature(temperature)


def _check_grad(grad, inputs, grad_name: str, inputs_name: str) -> None:
    x0 = inputs[0]
    if grad.shape != x0.shape:
        raise error("grad_shape_mismatch", grad=grad_name, shape=list(grad.shape), inputs=inputs_name,
                    shape0=list(x0.shape))
    if grad.dtype != x0.dtype:
        raise error("grad_dtype_mismatch", grad=grad_name, dtype=grad.dtype, inputs=inputs_name, dtype0=x0.dtype)


def check_backward_args(grad, weights, inputs, weights_requires_grad, inputs_requires_grad) -> None:
    """The arguments of ``_weighted_sum_backward``."""
    _check_weights(weights, "weights")
    K = weights.shape[-1]
    if len(inputs_requires_grad) != K:
        raise error("requires_grad_count", n=len(inputs_requires_grad), K=K)
    if grad.dtype not in KERNEL_DTYPES:
        raise error("grad_dtype", grad="grad", dtype=grad.dtype)
    _check_prefix(weights, "weights", grad.shape, "grad")
    if weights.device != grad.device:
        raise error("weights_device", name="weights", device=weights.device, other="grad", other_device=grad.device)
    if weights_requires_grad:
        check_args(weights, inputs, "weights")
        _check_grad(grad, inputs, "grad", "inputs")


def check_grouped_backward_args(grads, weights, inputs, weights_requires_grad, inputs_requires_grad) -> None:
    """The arguments of ``_grouped_weighted_sum_backward``."""
    check_grouped_weights(weights, "weights")
    G, K = weights.shape
    if len(grads) != G:
        raise error("grouped_grads", n=len(grads), G=G)
    if len(inputs_requires_grad) != G * K:
        raise error("grouped_requires_grad_count", n=len(inputs_requires_grad), shape=list(weights.shape), GK=G * K)
    for g, grad in enumerate(grads):
        if grad.dtype not in KERNEL_DTYPES:
            raise error("grad_dtype", grad=f"grads[{g}]", dtype=grad.dtype)
        if weights.device != grad.device:
            raise error("weights_device", name="weights", device=weights.device, other=f"grads[{g}]",
                        other_device=grad.device)
    if weights_requires_grad:
        check_grouped_args(weights, inputs, "weights")
        for g, grad in enumerate(grads):
            _check_grad(grad, inputs[g * K:(g + 1) * K], f"grads[{g}]", f"groups[{g}]")


def check_alpha(alpha, map: str, has_alpha: bool):
    """`alpha` of a call of map `map`: None; else only for a map with the
    parameter, a number >= 1 (returned as a float) or a floating tensor
    (returned as is; its values are the map's to check)."""
    if alpha is None:
        return None
    if not has_alpha:
        raise error("alpha_map", map=map)
    if isinstance(alpha, Tensor):
        if not alpha.dtype.is_floating_point:
            raise TypeError(f"alpha must be a float or a floating tensor, got a tensor of {alpha.dtype}")
        return alpha
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha must be a float or a floating tensor, got {type(alpha).__name__}")
    if not (math.isfinite(alpha) and alpha >= 1):
        raise error("alpha_value", value=float(alpha))
    return float(alpha)


def check_map(name, known) -> str:
    """`name` must be a str naming one of the maps `known`."""
    if not isinstance(name, str):
        raise TypeError(f"map must be a str, got {type(name).__name__}")
    if name not in known:
        raise error("unknown_map", maps=", ".join(repr(m) for m in known), map=name)
    return name
