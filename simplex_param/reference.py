r"""Pure-PyTorch twins of the compiled ops.

They have the signatures and semantics of the ops in ``csrc/``, are used when
the extension is not loaded, and are the oracle the tests compare the kernels
against. They are built from differentiable PyTorch ops, so autograd (to any
order, forward mode included), ``torch.func`` and ``torch.compile`` work
through them.

Shapes: ``weights: (K,)`` or ``(*P, K)`` with ``P`` a leading prefix of the
inputs' shape ``S``; ``inputs: K tensors of shape S``; result ``S``. For
:func:`mix`, ``weights: (M, K)`` or ``(*P, M, K)`` and the result
``(*P, M, *rest)`` for ``S = (*P, *rest)``.
"""
import torch
from torch import Tensor

from . import maps


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for inputs of `dtype`: float64 stays, all else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def weighted_sum(weights: Tensor, inputs: list[Tensor]) -> Tensor:
    r"""``sum_k weights[..., k] * inputs[k]``, the weights broadcast over the
    inputs' trailing dimensions, accumulated in float32 (float64 for float64 inputs)."""
    dtype = inputs[0].dtype
    acc = acc_dtype(dtype)
    w = weights.to(acc)
    row_shape = w.shape[:-1] + (1,) * (inputs[0].dim() - (w.dim() - 1))
    out = w[..., 0].reshape(row_shape) * inputs[0].to(acc)
    for k in range(1, len(inputs)):
        out = out + w[..., k].reshape(row_shape) * inputs[k].to(acc)
    return out.to(dtype)


def mix(weights: Tensor, inputs: list[Tensor]) -> Tensor:
    r"""``out[*p, m, *t] = sum_k weights[*p, m, k] * inputs[k][*p, *t]``: the M
    weighted sums of the same K inputs, stacked after the rows' dimensions P,
    accumulated as :func:`weighted_sum`. Each input is read once (one
    multiply-add per input for all M outputs)."""
    dtype = inputs[0].dtype
    acc = acc_dtype(dtype)
    lead, rest = weights.dim() - 2, inputs[0].dim() - (weights.dim() - 2)
    w = weights.to(acc)
    w = w.reshape(*w.shape, *([1] * rest))  # (*P, M, K, 1, ...)
    kdim = -1 - rest
    out = w.select(kdim, 0) * inputs[0].to(acc).unsqueeze(lead)  # (*P, M, 1, ...) * (*P, 1, *rest)
    for k in range(1, len(inputs)):
        out = out + w.select(kdim, k) * inputs[k].to(acc).unsqueeze(lead)
    return out.to(dtype)


def _map(name: str, z: Tensor, temperature: float, alpha) -> Tensor:
    return maps.apply(name, z if temperature == 1.0 else z / temperature, alpha)


def simplex_weighted_sum(logits: Tensor, inputs: list[Tensor], map: str = "softmax", temperature: float = 1.0,
                         alpha=None) -> Tensor:
    r"""``sum_k map(logits / temperature)[..., k] * inputs[k]``, the map
    (:mod:`simplex_param.maps`) taken in the accumulation dtype."""
    return weighted_sum(_map(map, logits.to(acc_dtype(inputs[0].dtype)), temperature, alpha), inputs)


def softmax_weighted_sum(logits: Tensor, inputs: list[Tensor], temperature: float = 1.0) -> Tensor:
    r"""``sum_k softmax(logits / temperature)[..., k] * inputs[k]``."""
    return simplex_weighted_sum(logits, inputs, "softmax", temperature)


def grouped_weighted_sum(weights: Tensor, inputs: list[Tensor]) -> list[Tensor]:
    r"""One :func:`weighted_sum` per group: ``weights`` is ``(G, K)`` and
    ``inputs[g * K + k]`` is input k of group g."""
    G, K = weights.shape
    return [weighted_sum(weights[g], inputs[g * K:(g + 1) * K]) for g in range(G)]


def grouped_acc_dtype(inputs: list[Tensor]) -> torch.dtype:
    """The dtype a grouped op takes its map in: float64 when a group is float64, else float32."""
    return torch.float64 if any(x.dtype == torch.float64 for x in inputs) else torch.float32


def grouped_simplex_weighted_sum(logits: Tensor, inputs: list[Tensor], map: str = "softmax",
                                 temperature: float = 1.0, alpha=None) -> list[Tensor]:
    r"""The map of the ``(G, K)`` logits in :func:`grouped_acc_dtype`, then
    :func:`grouped_weighted_sum`."""
    return grouped_weighted_sum(_map(map, logits.to(grouped_acc_dtype(inputs)), temperature, alpha), inputs)
