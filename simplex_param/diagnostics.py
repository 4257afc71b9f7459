r"""Seeing the weights: a summary of every simplex weight in a model, and
two regularisers on them, the entropy and FairDARTS' zero-one loss.

For weights :math:`p` on the simplex, the entropy is
:math:`H = -\sum_k p_k \log p_k` (with :math:`0 \log 0 = 0`), the effective
number of inputs is :math:`e^H` (K for uniform weights, 1 for a one-hot),
and the support is the number of nonzero weights.
"""
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .layers import ScalarMix, WeightedLayerSum
from .parametrization import Simplex
from .sinkhorn import Birkhoff

__all__ = ["WeightRecord", "WeightSummary", "summary", "entropy", "zero_one_loss"]


def entropy(weights) -> Tensor:
    r"""The mean entropy of simplex weights, differentiable: a regulariser.

    ``weights`` is a tensor of probability vectors along its last dimension,
    or a module: then the sum over the summary's weights (every
    Simplex-parametrized tensor, fusion layer, ScalarMix, WeightedLayerSum
    and MixedOp in it).
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


def zero_one_loss(weights) -> Tensor:
    r"""FairDARTS' zero-one loss, differentiable: pushes weights towards 0 or 1.

    .. math::
        L_{01} = -\frac{1}{N} \sum_{i=1}^{N} (w_i - \tfrac12)^2

    over the N entries of ``weights``. FairDARTS (Chu et al., 2020) applies it
    to sigmoid weights :math:`w = \sigma(\alpha)`, each in :math:`[0, 1]` on
    its own: pass ``torch.sigmoid(alpha)``. On simplex weights it applies to
    the weights themselves; since they sum to one, at most one can reach 1,
    and per vector of K weights
    :math:`L_{01} = -(\sum_k w_k^2 - 1 + K/4) / K`, so it pushes each vector
    towards a one-hot (a vertex of the simplex), as a negative entropy factor
    does. It is lowest, :math:`-1/4`, when every entry is 0 or 1.

    ``weights`` is a floating tensor, or a module: then the sum of the loss
    over the summary's weights (each tensor averaged over its own entries).
    Add ``w01 * sp.zero_one_loss(...)`` to the loss (FairDARTS uses
    ``w01 = 10``).

    Example::

        >>> sp.zero_one_loss(torch.tensor([0.75, 0.25]))   # -(0.25**2 + 0.25**2) / 2
        tensor(-0.0625)
        >>> sp.zero_one_loss(torch.tensor([1.0, 0.0]))     # the lowest value
        tensor(-0.2500)
    """
    if isinstance(weights, nn.Module):
        found = [w for _, _, _, w in _simplex_weights(weights)]
        if not found:
            raise ValueError("zero_one_loss: the module holds no simplex weights")
        return sum(_zero_one(w) for w in found)
    if not isinstance(weights, Tensor) or not weights.dtype.is_floating_point or weights.numel() == 0:
        raise TypeError("zero_one_loss: weights must be a non-empty floating tensor, or a module")
    return _zero_one(weights)


def _zero_one(w: Tensor) -> Tensor:
    return -(w - 0.5).square().mean()


def _mean_entropy(p: Tensor) -> Tensor:
    # 0 log 0 = 0, with a finite gradient there: the log sees 1 where p is 0.
    return -(p * torch.where(p > 0, p, torch.ones_like(p)).log()).sum(-1).mean()


@dataclass
class WeightRecord:
    """One row of :func:`summary`: a simplex weight tensor of the model."""

    name: str  # where it lives: "fuse.weight", "encoder.mix"
    kind: str  # the library's layer ("SimplexFusion", "ScalarMix", "MixedOp", ...) or "Simplex"
    map: str
    temperature: float
    weights: Tensor = field(repr=False)  # detached, float64 on the CPU, probability vectors along the last dim
    entropy: float  # mean over the vectors
    effective_k: float  # exp(entropy)
    support: float  # mean number of nonzero weights per vector
    # Birkhoff (doubly stochastic) tensors only: the largest |row sum - 1| and |column sum - 1|.
    row_error: Optional[float] = None
    col_error: Optional[float] = None

    def __eq__(self, other) -> bool:
        if not isinstance(other, WeightRecord):
            return NotImplemented
        return all(
            torch.equal(a, b) if isinstance(a, Tensor) else a == b
            for a, b in zip(_fields(self), _fields(other))
        ) and self.weights.dtype == other.weights.dtype

    def top(self, n: int = 4) -> str:
        """The largest weights of the first vector, as ``k:value``."""
        first = self.weights.reshape(-1, self.weights.shape[-1])[0]
        values, index = first.sort(descending=True)
        return " ".join(f"{int(k)}:{float(v):.3f}" for k, v in zip(index[:n], values[:n]))


def _fields(record: WeightRecord) -> tuple:
    return (record.name, record.kind, record.map, record.temperature, record.weights, record.entropy,
            record.effective_k, record.support, record.row_error, record.col_error)


class WeightSummary(list):
    """A list of :class:`WeightRecord`, printed as a table."""

    def __str__(self) -> str:
        head = f"{'name':<28}{'kind':<18}{'map':<11}{'T':>6}{'K':>5}{'entropy':>9}{'eff. K':>8}{'support':>9}  top weights"
        lines = [head]
        for r in self:
            lines.append(
                f"{r.name:<28}{r.kind:<18}{r.map:<11}{r.temperature:>6.3g}{r.weights.shape[-1]:>5}"
                f"{r.entropy:>9.3f}{r.effective_k:>8.2f}{r.support:>9.2f}  {r.top()}"
                + (f"  rows |sum-1|<={r.row_error:.1e} cols |sum-1|<={r.col_error:.1e}"
                   if r.row_error is not None else "")
            )
        return "\n".join(lines)


def _simplex_weights(model: nn.Module):
    """(name, owning module, its Simplex or None for ScalarMix, weights with a
    graph as vectors along the last dimension) of every simplex weight tensor."""
    for prefix, m in model.named_modules():
        path = f"{prefix}." if prefix else ""
        if isinstance(m, (ScalarMix, WeightedLayerSum)):
            yield f"{path}weight", m, None, m.weight
            continue
        if not parametrize.is_parametrized(m):
            continue
        for tensor_name, plist in m.parametrizations.items():
            simplex = [p for p in plist if isinstance(p, (Simplex, Birkhoff))]
            if not simplex:
                continue
            w = getattr(m, tensor_name)
            if isinstance(simplex[-1], Birkhoff):  # doubly stochastic: its rows are the vectors
                yield f"{path}{tensor_name}", m, simplex[-1], w
                continue
            dim = simplex[-1].dim
            w = w.reshape(-1) if dim is None else w.movedim(dim, -1)
            yield f"{path}{tensor_name}", m, simplex[-1], w


def sum_errors(w: Tensor) -> dict:
    """``row_error`` and ``col_error`` of doubly stochastic matrices `w`
    (float64): the largest ``|row sum - 1|`` and ``|column sum - 1|``."""
    return {"row_error": float((w.sum(-1) - 1).abs().max()), "col_error": float((w.sum(-2) - 1).abs().max())}


def summary(model: nn.Module) -> WeightSummary:
    r"""Every simplex weight in ``model``: Simplex-parametrized tensors, fusion
    layers, ScalarMix, WeightedLayerSum and MixedOp layers, one :class:`WeightRecord` each,
    with the name, the map, the temperature, the weights, the entropy, the
    effective K and the support size. Print it for a table.

    Birkhoff-parametrized (doubly stochastic) tensors are listed too, as their
    rows (map ``"sinkhorn"``), with ``row_error`` and ``col_error``: the largest
    deviation of a row sum and of a column sum from 1.

    Example::

        >>> model = nn.Sequential(sp.SimplexFusion(3))
        >>> print(sp.summary(model))  # doctest: +NORMALIZE_WHITESPACE
        name    kind    map    T    K    entropy    eff. K    support  top weights
        0.weight    SimplexFusion    softmax    1    3    1.099    3.00    3.00  0:0.333 1:0.333 2:0.333
    """
    records = WeightSummary()
    with torch.no_grad():
        for name, m, simplex, w in _simplex_weights(model):
            w = w.detach().double().cpu()
            # The library's layer that holds the weights (a soup, a fusion
            # layer, ...), or "Simplex" for a parametrized tensor of any other module.
            birkhoff = isinstance(simplex, Birkhoff)
            kind = next((c.__name__ for c in type(m).__mro__ if c.__module__.startswith("simplex_param.")),
                        "Birkhoff" if birkhoff else "Simplex")
            h = float(_mean_entropy(w))
            records.append(WeightRecord(
                name=name,
                kind=kind,
                map="sinkhorn" if birkhoff else simplex.map if simplex is not None else "softmax",
                temperature=1.0 if birkhoff or simplex is None else float(simplex.temperature),
                weights=w,
                entropy=h,
                effective_k=math.exp(h),
                support=float((w > 0).sum(-1).double().mean()),
                **(sum_errors(w) if birkhoff else {}),
            ))
    return records
