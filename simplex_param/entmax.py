r"""The ``entmax`` package's API (deep-spin/entmax 1.3), as a drop-in over the
map registry of :mod:`simplex_param.maps`.

Functions ``sparsemax``, ``entmax15``, ``entmax_bisect``; modules
``Sparsemax``, ``Entmax15``, ``EntmaxBisect``; the Fenchel-Young losses
``sparsemax_loss``, ``entmax15_loss``, ``entmax_bisect_loss`` and their
modules, with entmax's signatures and attribute names. Every map is the
registry's own (sparsemax and entmax15 give entmax's values bit for bit), so
the gradients are the closed forms of :mod:`~simplex_param.maps`, and:

- ``alpha = 1`` is the softmax, not a uniform row; the threshold of
  ``entmax_bisect`` is found in float64, so large ``alpha`` or large logits
  stay finite in float32;
- ``alpha`` below 1 raises (in entmax a learned alpha reaching 1 turns NaN,
  and one below 1 goes on unchecked): a float at once; a
  tensor on the CPU when called; a CUDA tensor through ``torch._assert_async``,
  which does not synchronise, so a value below 1 stops the program at a later
  synchronisation with a device-side assertion (as an out-of-range target of
  ``F.cross_entropy`` does); values are not checked on other devices;
- ``k`` is a speed hint of entmax's partial sort: checked, then unused (the
  results are the same);
- the losses ignore a target equal to ``ignore_index``, negative ones such as
  the default -100 included, as ``torch.nn.CrossEntropyLoss`` does; their
  gradient is the closed form ``p* - onehot(target)`` (no sort is
  differentiated), and ``entmax_bisect_loss`` gives ``alpha`` its gradient,
  ``d H_alpha(p*) / d alpha`` by the envelope theorem (entmax gives none).
"""
import math
import numbers

import torch
from torch import Tensor, nn

from . import checks, maps

__all__ = [
    "sparsemax", "entmax15", "entmax_bisect", "Sparsemax", "Entmax15", "EntmaxBisect",
    "sparsemax_loss", "entmax15_loss", "entmax_bisect_loss", "SparsemaxLoss", "Entmax15Loss", "EntmaxBisectLoss",
]


# ---------------------------------------------------------------------------
# Checks, naming the argument.
# ---------------------------------------------------------------------------

def _check_X(X, dim) -> None:
    if not isinstance(X, Tensor):
        raise TypeError(f"X must be a torch.Tensor, got {type(X).__name__}")
    if not X.dtype.is_floating_point:
        raise TypeError(f"X must be a floating tensor, got a tensor of {X.dtype}")
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if X.dim() == 0:
        raise ValueError("X must have at least one dimension, got a 0-d tensor")
    if X.size(dim) == 0:  # PyTorch's IndexError for a dim out of range
        raise ValueError(f"X must have a nonzero size along dim {dim}, got shape {list(X.shape)}")


def _check_k(k) -> None:
    if k is None:
        return
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be None or a positive int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be None or a positive int, got {k}")


def _check_values(bad: Tensor, values: Tensor, message: str) -> None:
    """ValueError(message) where any of `bad` (a mask of `values`): read on
    the CPU; on CUDA an asynchronous device assertion (no synchronisation)."""
    with torch.no_grad():
        if bad.device.type == "cpu":
            if bool(bad.any()):
                raise ValueError(f"{message}, got {values[bad][0].item()}")
        elif bad.device.type == "cuda":
            torch._assert_async(~bad.any(), message)


def _check_alpha(alpha):
    """A float >= 1 or a floating tensor; the values of a CPU tensor are
    checked by maps.apply, those of a CUDA tensor by an asynchronous device
    assertion here (no synchronisation; see the module docstring)."""
    alpha = checks.check_alpha(alpha, "entmax_bisect", True)
    if isinstance(alpha, Tensor) and alpha.device.type == "cuda":
        with torch.no_grad():
            _check_values(~((alpha >= 1) & (alpha < math.inf)), alpha, "alpha must be a finite number >= 1")
    return alpha


# ---------------------------------------------------------------------------
# The maps.
# ---------------------------------------------------------------------------

def sparsemax(X: Tensor, dim: int = -1, k=None) -> Tensor:
    """sparsemax along `dim`: the Euclidean projection onto the simplex,
    ``max(X - tau, 0)`` (Martins & Astudillo, 2016). `k` (None or a positive
    int) is entmax's partial-sort hint: accepted, same results."""
    _check_X(X, dim)
    _check_k(k)
    return maps.apply("sparsemax", X, dim=dim)


def entmax15(X: Tensor, dim: int = -1, k=None) -> Tensor:
    """1.5-entmax along `dim`: ``max(X / 2 - tau, 0) ** 2`` summing to one
    (Peters, Niculae & Martins, 2019). `k` as in :func:`sparsemax`."""
    _check_X(X, dim)
    _check_k(k)
    return maps.apply("entmax15", X, dim=dim)


def entmax_bisect(X: Tensor, alpha=1.5, dim: int = -1, n_iter: int = 50, ensure_sum_one: bool = True) -> Tensor:
    """alpha-entmax along `dim`, the threshold by `n_iter` bisection steps in
    float64. `alpha`: a float >= 1 or a tensor of them broadcastable to `X`
    with size 1 along `dim`, differentiable (the exact gradient); 1 is the
    softmax, 1.5 entmax15, 2 sparsemax. ``ensure_sum_one=False``: the last
    step's weights, not divided by their sum (they sum to one within the
    last bracket), as in entmax."""
    _check_X(X, dim)
    alpha = _check_alpha(alpha)
    return maps.apply("entmax_bisect", X, alpha, dim, n_iter=n_iter, ensure_sum_one=ensure_sum_one)


class _SortedMap(nn.Module):
    """A map of the sorted row along `dim` as a module; `k` as in entmax."""

    function = None

    def __init__(self, dim: int = -1, k=None):
        super().__init__()
        _check_k(k)
        self.dim = dim
        self.k = k

    def forward(self, X: Tensor) -> Tensor:
        return type(self).function(X, dim=self.dim, k=self.k)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, k={self.k}"


class Sparsemax(_SortedMap):
    """:func:`sparsemax` along `dim` as a module."""

    function = staticmethod(sparsemax)


class Entmax15(_SortedMap):
    """:func:`entmax15` along `dim` as a module."""

    function = staticmethod(entmax15)


class EntmaxBisect(nn.Module):
    """:func:`entmax_bisect` as a module. An ``nn.Parameter`` `alpha` is
    registered as the module's parameter (learned alpha); keep it >= 1, for
    instance as ``1 + softplus(a)`` in a module of your own."""

    def __init__(self, alpha=1.5, dim: int = -1, n_iter: int = 50):
        super().__init__()
        if not isinstance(alpha, Tensor):
            _check_alpha(alpha)
        self.alpha = alpha
        self.dim = dim
        self.n_iter = n_iter

    def forward(self, X: Tensor) -> Tensor:
        return entmax_bisect(X, alpha=self.alpha, dim=self.dim, n_iter=self.n_iter)

    def extra_repr(self) -> str:
        alpha = self.alpha if not isinstance(self.alpha, Tensor) else f"tensor of shape {list(self.alpha.shape)}"
        return f"alpha={alpha}, dim={self.dim}, n_iter={self.n_iter}"


# ---------------------------------------------------------------------------
# Fenchel-Young losses: L(X, y) = H_alpha(p*) + <p* - onehot(y), X>, p* the
# map of X, H_alpha the Tsallis entropy (1 - sum p^alpha) / (alpha (alpha - 1)),
# Shannon's at alpha = 1. Gradients: p* - onehot(y) in X and, by the envelope
# theorem, d H_alpha(p) / d alpha at p = p* in alpha.
# ---------------------------------------------------------------------------

def _log_on_support(p: Tensor) -> Tensor:
    on = p > 0
    return torch.where(on, torch.where(on, p, 1).log(), 0)


def _tsallis(p: Tensor, a: Tensor) -> Tensor:
    """H_alpha(p) over the last dimension, with sum p^alpha - 1 summed as
    p expm1((alpha - 1) log p): no cancellation near alpha = 1."""
    log_p = _log_on_support(p)
    am1 = a - 1
    one = am1 == 0
    am1 = torch.where(one, 1, am1)
    tsallis = -(p * torch.expm1(am1 * log_p)).sum(-1, keepdim=True) / (a * am1)
    shannon = -(p * log_p).sum(-1, keepdim=True)
    return torch.where(one, shannon, tsallis).squeeze(-1)


def _tsallis_dalpha(p: Tensor, a: Tensor) -> Tensor:
    """d H_alpha(p) / d alpha over the last dimension at fixed p; below
    |alpha - 1| = eps ** (1/3) its limit at 1, sum p log p - sum p log^2 p / 2
    (error O(alpha - 1), less than the closed form's cancellation there)."""
    log_p = _log_on_support(p)
    am1 = a - 1
    near_one = am1.abs() < torch.finfo(p.dtype).eps ** (1 / 3)
    am1 = torch.where(near_one, 1, am1)
    scaled = am1 * log_p
    d = a * am1
    mass = (p * torch.expm1(scaled)).sum(-1, keepdim=True)  # sum p^alpha - 1
    moment = (p * torch.exp(scaled) * log_p).sum(-1, keepdim=True)  # sum p^alpha log p
    general = -moment / d + mass * (2 * a - 1) / d**2
    limit = (p * log_p).sum(-1, keepdim=True) - (p * log_p**2).sum(-1, keepdim=True) / 2
    return torch.where(near_one, limit, general).squeeze(-1)


def _map(name: str, X: Tensor, alpha, n_iter) -> Tensor:
    if name == "entmax_bisect":
        return maps.apply(name, X, alpha, n_iter=n_iter)
    return maps.apply(name, X)


class _FenchelYoungLoss(torch.autograd.Function):
    """Per-row loss of X (n, d) at class indices target (n,) in range."""

    @staticmethod
    def forward(ctx, X, alpha, target, name, n_iter):
        p = _map(name, X, alpha, n_iter)
        a = torch.as_tensor(alpha, dtype=X.dtype, device=X.device)
        index = target.unsqueeze(-1)
        # p = 0 where X may be -inf (a masked class): those terms are 0.
        loss = _tsallis(p, a) + (p * torch.where(p > 0, X, 0)).sum(-1) - X.gather(-1, index).squeeze(-1)
        ctx.name, ctx.n_iter = name, n_iter
        ctx.alpha = None if isinstance(alpha, Tensor) else alpha
        ctx.save_for_backward(X, p, alpha if isinstance(alpha, Tensor) else None, index)
        return loss

    @staticmethod
    def backward(ctx, g):
        X, p, alpha_t, index = ctx.saved_tensors
        alpha = ctx.alpha if alpha_t is None else alpha_t
        if torch.is_grad_enabled():
            # A graph of the gradient (double backward): p* again, as a
            # function of X and alpha, with the map's own closed forms.
            p = _map(ctx.name, X, alpha, ctx.n_iter)
        g = g.unsqueeze(-1)
        dX = da = None
        if ctx.needs_input_grad[0]:
            dX = g * (p - torch.zeros_like(p).scatter_(-1, index, 1))
        if ctx.needs_input_grad[1]:
            da = (g * _tsallis_dalpha(p, alpha_t.to(p.dtype)).unsqueeze(-1)).sum_to_size(alpha_t.shape)
            da = da.to(alpha_t.dtype)
        return dX, da, None, None, None


def _check_target(X: Tensor, target, ignore_index=None):
    """`target` (n,) for X (n, d): indices in [0, d), or ignore_index. Returns
    the indices (ignored rows pointing at class 0) and the rows kept."""
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor of class indices, got {type(target).__name__}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target must be an integer tensor of class indices, got a tensor of {target.dtype}")
    if target.shape != X.shape[:1]:
        raise ValueError(f"target must have shape (n,) = {list(X.shape[:1])} for X of shape {list(X.shape)}, "
                         f"got {list(target.shape)}")
    keep = None
    if ignore_index is not None:
        keep = target != ignore_index
        target = torch.where(keep, target, 0)
    d = X.shape[1]
    besides = "" if ignore_index is None else f" or ignore_index = {ignore_index}"
    _check_values((target < 0) | (target >= d), target, f"target must hold class indices in [0, {d}){besides}")
    return target.long(), keep


def _loss(name: str, X: Tensor, target, alpha, n_iter=None, ignore_index=None) -> Tensor:
    """The per-row Fenchel-Young loss of map `name`; 0 on ignored rows."""
    _check_X(X, -1)
    if X.dim() != 2:
        raise ValueError(f"X must be a 2-D tensor of scores (n, d), got shape {list(X.shape)}")
    target, keep = _check_target(X, target, ignore_index)
    loss = _FenchelYoungLoss.apply(X, alpha, target, name, n_iter)
    return loss if keep is None else torch.where(keep, loss, 0)


def sparsemax_loss(X: Tensor, target: Tensor, k=None) -> Tensor:
    """The sparsemax loss of each row of X (n, d) at class indices target
    (n,): ``(1 - |p*|^2) / 2 + <p* - onehot(target), X>``, p* = sparsemax(X).
    Gradient ``p* - onehot(target)``. `k`: a hint, as in :func:`sparsemax`."""
    _check_k(k)
    return _loss("sparsemax", X, target, 2.0)


def entmax15_loss(X: Tensor, target: Tensor, k=None) -> Tensor:
    """The 1.5-entmax loss of each row, as :func:`sparsemax_loss` with
    p* = entmax15(X) and the entropy ``(1 - sum p*^1.5) / 0.75``."""
    _check_k(k)
    return _loss("entmax15", X, target, 1.5)


def entmax_bisect_loss(X: Tensor, target: Tensor, alpha=1.5, n_iter: int = 50) -> Tensor:
    """The alpha-entmax loss of each row, p* = entmax_bisect(X, alpha,
    n_iter=n_iter), the Tsallis entropy ``(1 - sum p*^alpha) / (alpha (alpha
    - 1))`` (Shannon's at alpha = 1: the cross-entropy). `alpha`: a float >= 1
    or a tensor broadcastable to (n, 1), with the exact gradient."""
    alpha = _check_alpha(alpha)
    return _loss("entmax_bisect", X, target, alpha, n_iter)


REDUCTIONS = ("elementwise_mean", "mean", "sum", "none")


class _FenchelYoungLossModule(nn.Module):
    """Per-row losses of ``self.loss(X, target)``, reduced: ``"sum"``,
    ``"elementwise_mean"`` (or ``"mean"``: over the rows not ignored; NaN if
    all are, as ``torch.nn.CrossEntropyLoss``), or ``"none"``."""

    def __init__(self, ignore_index=-100, reduction="elementwise_mean"):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")
        if isinstance(ignore_index, Tensor) and ignore_index.dim() == 0 and not ignore_index.dtype.is_floating_point:
            ignore_index = int(ignore_index)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        self.ignore_index = int(ignore_index)
        self.reduction = reduction

    def forward(self, X: Tensor, target: Tensor) -> Tensor:
        loss = self.loss(X, target)
        if self.reduction == "sum":
            return loss.sum()
        if self.reduction in ("elementwise_mean", "mean"):
            return loss.sum() / (target != self.ignore_index).sum()
        return loss

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, reduction={self.reduction!r}"


class SparsemaxLoss(_FenchelYoungLossModule):
    """:func:`sparsemax_loss` as a module, with `ignore_index` and `reduction`."""

    def __init__(self, k=None, ignore_index=-100, reduction="elementwise_mean"):
        super().__init__(ignore_index, reduction)
        _check_k(k)
        self.k = k

    def loss(self, X: Tensor, target: Tensor) -> Tensor:
        return _loss("sparsemax", X, target, 2.0, ignore_index=self.ignore_index)


class Entmax15Loss(_FenchelYoungLossModule):
    """:func:`entmax15_loss` as a module, with `ignore_index` and `reduction`."""

    def __init__(self, k=100, ignore_index=-100, reduction="elementwise_mean"):
        super().__init__(ignore_index, reduction)
        _check_k(k)
        self.k = k

    def loss(self, X: Tensor, target: Tensor) -> Tensor:
        return _loss("entmax15", X, target, 1.5, ignore_index=self.ignore_index)


class EntmaxBisectLoss(_FenchelYoungLossModule):
    """:func:`entmax_bisect_loss` as a module, with `ignore_index` and
    `reduction`; an ``nn.Parameter`` `alpha` is registered (learned alpha)."""

    def __init__(self, alpha=1.5, n_iter=50, ignore_index=-100, reduction="elementwise_mean"):
        super().__init__(ignore_index, reduction)
        if not isinstance(alpha, Tensor):
            _check_alpha(alpha)
        self.alpha = alpha
        self.n_iter = n_iter

    def loss(self, X: Tensor, target: Tensor) -> Tensor:
        alpha = _check_alpha(self.alpha)
        return _loss("entmax_bisect", X, target, alpha, self.n_iter, ignore_index=self.ignore_index)
