r"""Pure-PyTorch twins of the compiled ops.

They have the signatures and semantics of the ops in ``csrc/``, are used when
the extension is not loaded, and are the oracle the tests compare the kernels
against. They are built from differentiable PyTorch ops, so autograd (to any
order, forward mode included), ``torch.func`` and ``torch.compile`` work
through them.

Shapes: ``weights: (K,)`` or ``(*P, K)`` with ``P`` a leading prefix of the
inputs' shape ``S``; ``inputs: K tensors of shape S``; result ``S``.
"""
import torch
from torch import Tensor


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


# The weight maps over the last dimension: twins of the registry in csrc/maps.cpp.
def _softmax(z: Tensor, temperature: float) -> Tensor:
    return torch.softmax(z if temperature == 1.0 else z / temperature, dim=-1)


def _identity(z: Tensor, temperature: float) -> Tensor:
    return z.clone() if temperature == 1.0 else z / temperature


def _sparsemax(z: Tensor, temperature: float) -> Tensor:
    """The Euclidean projection of z / T onto the simplex: max(x - tau, 0)."""
    x = z if temperature == 1.0 else z / temperature
    xs = x.sort(-1, descending=True).values
    k = torch.arange(1, x.shape[-1] + 1, dtype=x.dtype, device=x.device)
    cumsum = xs.cumsum(-1)
    size = (1 + k * xs > cumsum).sum(-1, keepdim=True).clamp_min(1)
    tau = (cumsum.gather(-1, size - 1) - 1) / size.to(x.dtype)
    return (x - tau).clamp_min(0)


def _entmax15(z: Tensor, temperature: float) -> Tensor:
    """1.5-entmax of z / T: max(x / 2 - tau, 0)^2 summing to one, by sorting."""
    x = (z if temperature == 1.0 else z / temperature) / 2
    x = x - x.max(-1, keepdim=True).values
    xs = x.sort(-1, descending=True).values
    rho = torch.arange(1, x.shape[-1] + 1, dtype=x.dtype, device=x.device)
    mean = xs.cumsum(-1) / rho
    mean_sq = (xs * xs).cumsum(-1) / rho
    tau = mean - ((1 - rho * (mean_sq - mean * mean)) / rho).clamp_min(0).sqrt()
    size = (tau <= xs).sum(-1, keepdim=True).clamp_min(1)
    return (x - tau.gather(-1, size - 1)).clamp_min(0) ** 2


MAPS = {"softmax": _softmax, "identity": _identity, "sparsemax": _sparsemax, "entmax15": _entmax15}


def simplex_weighted_sum(logits: Tensor, inputs: list[Tensor], map: str = "softmax", temperature: float = 1.0) -> Tensor:
    r"""``sum_k map(logits / temperature)[..., k] * inputs[k]``, the map taken
    in the accumulation dtype."""
    z = logits.to(acc_dtype(inputs[0].dtype))
    return weighted_sum(MAPS[map](z, temperature), inputs)


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
                                 temperature: float = 1.0) -> list[Tensor]:
    r"""The map of the ``(G, K)`` logits in :func:`grouped_acc_dtype`, then
    :func:`grouped_weighted_sum`."""
    return grouped_weighted_sum(MAPS[map](logits.to(grouped_acc_dtype(inputs)), temperature), inputs)
