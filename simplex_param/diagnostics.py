r"""Seeing the weights: a summary of every simplex weight in a model, and
their entropy as a regulariser.

For weights :math:`p` on the simplex, the entropy is
:math:`H = -\sum_k p_k \log p_k` (with :math:`0 \log 0 = 0`), the effective
number of inputs is :math:`e^H` (K for uniform weights, 1 for a one-hot),
and the support is the number of nonzero weights.
"""
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .layers import ScalarMix, SimplexFusion
from .parametrization import Simplex
from .search import MixedOp

__all__ = ["WeightRecord", "WeightSummary", "summary", "entropy"]


def entropy(weights) -> Tensor:
    r"""The mean entropy of simplex weights, differentiable: a regulariser.

    ``weights`` is a tensor of probability vectors along its last dimension,
    or a module: then the sum over the summary's weights (every
    Simplex-parametrized tensor, fusion layer, ScalarMix and MixedOp in it).
    Add ``beta * sp.entropy(model)`` to the loss to flatten the weights
    (``beta > 0``) or sharpen them (``beta < 0``).

    Example::

        >>> sp.entropy(torch.full((4,), 0.25))  # log 4
        tensor(1.3863)
    """
    if isinstance(weights, nn.Module):
        found = [w for _, _, _, w in _simplex_weights(weights)]
        if not found:
            raise ValueError("entropy: the module holds no simplex weights")
        return sum(_mean_entropy(w) for w in found)
    if not isinstance(weights, Tensor) or not weights.dtype.is_floating_point or weights.dim() == 0:
        raise TypeError("entropy: weights must be a floating tensor of at least one dimension, or a module")
    return _mean_entropy(weights)


def _mean_entropy(p: Tensor) -> Tensor:
    # 0 log 0 = 0, with a finite gradient there: the log sees 1 where p is 0.
    return -(p * torch.where(p > 0, p, torch.ones_like(p)).log()).sum(-1).mean()


@dataclass
class WeightRecord:
    """One row of :func:`summary`: a simplex weight tensor of the model."""

    name: str  # where it lives: "fuse.weight", "encoder.mix"
    kind: str  # "SimplexFusion", "ScalarMix", "MixedOp" or "Simplex"
    map: str
    temperature: float
    weights: Tensor = field(repr=False)  # detached, probability vectors along the last dim
    entropy: float  # mean over the vectors
    effective_k: float  # exp(entropy)
    support: float  # mean number of nonzero weights per vector

    def top(self, n: int = 4) -> str:
        """The largest weights of the first vector, as ``k:value``."""
        first = self.weights.reshape(-1, self.weights.shape[-1])[0]
        values, index = first.sort(descending=True)
        return " ".join(f"{int(k)}:{float(v):.3f}" for k, v in zip(index[:n], values[:n]))


class WeightSummary(list):
    """A list of :class:`WeightRecord`, printed as a table."""

    def __str__(self) -> str:
        head = f"{'name':<28}{'kind':<15}{'map':<11}{'T':>6}{'K':>5}{'entropy':>9}{'eff. K':>8}{'support':>9}  top weights"
        lines = [head]
        for r in self:
            lines.append(
                f"{r.name:<28}{r.kind:<15}{r.map:<11}{r.temperature:>6.3g}{r.weights.shape[-1]:>5}"
                f"{r.entropy:>9.3f}{r.effective_k:>8.2f}{r.support:>9.2f}  {r.top()}"
            )
        return "\n".join(lines)


def _simplex_weights(model: nn.Module):
    """(name, owning module, its Simplex or None for ScalarMix, weights with a
    graph as vectors along the last dimension) of every simplex weight tensor."""
    for prefix, m in model.named_modules():
        path = f"{prefix}." if prefix else ""
        if isinstance(m, ScalarMix):
            yield f"{path}weight", m, None, m.weight
            continue
        if not parametrize.is_parametrized(m):
            continue
        for tensor_name, plist in m.parametrizations.items():
            simplex = [p for p in plist if isinstance(p, Simplex)]
            if not simplex:
                continue
            w = getattr(m, tensor_name)
            dim = simplex[-1].dim
            w = w.reshape(-1) if dim is None else w.movedim(dim, -1)
            yield f"{path}{tensor_name}", m, simplex[-1], w


def summary(model: nn.Module) -> WeightSummary:
    r"""Every simplex weight in ``model``: Simplex-parametrized tensors, fusion
    layers, ScalarMix and MixedOp layers, one :class:`WeightRecord` each,
    with the name, the map, the temperature, the weights, the entropy, the
    effective K and the support size. Print it for a table.

    Example::

        >>> model = nn.Sequential(sp.SimplexFusion(3))
        >>> print(sp.summary(model))  # doctest: +NORMALIZE_WHITESPACE
        name    kind    map    T    K    entropy    eff. K    support  top weights
        0.weight    SimplexFusion    softmax    1    3    1.099    3.00    3.00  0:0.333 1:0.333 2:0.333
    """
    records = WeightSummary()
    with torch.no_grad():
        for name, m, simplex, w in _simplex_weights(model):
            w = w.detach().double()
            kind = type(m).__name__.removeprefix("Parametrized")
            if not isinstance(m, (SimplexFusion, MixedOp, ScalarMix)):
                kind = "Simplex"
            h = float(_mean_entropy(w))
            records.append(WeightRecord(
                name=name,
                kind=kind,
                map=simplex.map if simplex is not None else "softmax",
                temperature=float(simplex.temperature) if simplex is not None else 1.0,
                weights=w,
                entropy=h,
                effective_k=math.exp(h),
                support=float((w > 0).sum(-1).double().mean()),
            ))
    return records
