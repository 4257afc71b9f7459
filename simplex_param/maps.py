r"""The weight maps, the Python half of their registry (the C++ half is
``csrc/maps.cpp``): one :class:`Map` entry per map.

A map turns a row of pre-weights ``x`` (already divided by the temperature)
into weights ``w`` over the last dimension. Every map but ``"identity"`` puts
its rows on the probability simplex. The sparse ones (sparsemax, 1.5-entmax,
alpha-entmax) form one family with the Jacobian

.. math::
    \partial w / \partial x = \mathrm{diag}(s) - s s^\top / \textstyle\sum s,
    \qquad s = w^{2 - \alpha} \text{ on the support } \{w > 0\},\ 0 \text{ off it},

so one autograd function (:class:`_SparseMap`) gives all of them the
closed-form vector-Jacobian product, the same one as the compiled kernels,
in every mode: backward to any order, forward mode, and ``torch.func``
(vmap, grad, jvp). No path differentiates through a sort.

To add a map: one entry in :data:`MAPS` here, one in ``kMaps`` in
``csrc/maps.cpp``, an oracle in ``tests/test_maps.py`` and a row in
``docs/maps.md``. Everything else reads these registries.
"""
import dataclasses
import functools
import math
import numbers
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from . import checks

__all__ = ["Map", "MAPS", "SIMPLEX_MAPS", "apply", "inverse", "DEFAULT_ALPHA", "BISECT_ITERS"]

Alpha = Union[float, Tensor, None]

# alpha of map "entmax_bisect" when none is given, as in the entmax package.
DEFAULT_ALPHA = 1.5
# Bisection steps of "entmax_bisect": the threshold's bracket, at most 1 wide,
# halves each step, so 50 steps bring it below float64's resolution of the
# threshold, the entmax package's default.
BISECT_ITERS = 50


@dataclass(frozen=True)
class Map:
    """One weight map.

    ``forward(x, alpha)`` gives the weights over the last dimension of ``x``
    (no graph needed: autograd uses ``curvature``). ``curvature(w, alpha)`` is
    ``s`` of the module docstring, for the sparse family; ``None`` for a map
    whose own PyTorch ops are differentiated (the softmax, the identity).
    ``inverse(p, alpha)`` gives pre-weights that map back to probabilities
    ``p``, exact zeros included; ``None`` for a map not onto the simplex.
    ``has_alpha``: the map takes ``alpha`` (``>= 1``).
    """

    name: str
    forward: Callable[[Tensor, Alpha], Tensor]
    curvature: Optional[Callable[[Tensor, Alpha], Tensor]] = None
    inverse: Optional[Callable[[Tensor, Alpha], Tensor]] = None
    has_alpha: bool = False


# ---------------------------------------------------------------------------
# Forwards, over the last dimension, in the order of arithmetic of the entmax
# package (the row maximum subtracted first), so that the values are its own.
# ---------------------------------------------------------------------------

def _softmax(x: Tensor, alpha: Alpha = None) -> Tensor:
    return torch.softmax(x, dim=-1)


def _identity(x: Tensor, alpha: Alpha = None) -> Tensor:
    return x.clone()


def _ranks(x: Tensor) -> Tensor:
    return torch.arange(1, x.shape[-1] + 1, dtype=x.dtype, device=x.device)


def _sparsemax(x: Tensor, alpha: Alpha = None) -> Tensor:
    """max(x - tau, 0), tau from the sorted row (Martins & Astudillo, 2016)."""
    x = x - x.max(-1, keepdim=True).values
    xs = x.sort(-1, descending=True).values
    cumsum = xs.cumsum(-1) - 1
    size = (_ranks(x) * xs > cumsum).sum(-1, keepdim=True).clamp_min(1)
    tau = cumsum.gather(-1, size - 1) / size.to(x.dtype)
    return (x - tau).clamp_min(0)


def _entmax15(x: Tensor, alpha: Alpha = None) -> Tensor:
    """max(x / 2 - tau, 0) ** 2, tau exact from the sorted row (Peters et al., 2019)."""
    x = (x - x.max(-1, keepdim=True).values) / 2
    xs = x.sort(-1, descending=True).values
    rho = _ranks(x)
    mean = xs.cumsum(-1) / rho
    mean_sq = (xs**2).cumsum(-1) / rho
    delta = (1 - rho * (mean_sq - mean**2)) / rho
    tau = mean - delta.clamp_min(0).sqrt()
    size = (tau <= xs).sum(-1, keepdim=True).clamp_min(1)
    return (x - tau.gather(-1, size - 1)).clamp_min(0) ** 2


def _alpha_tensor(alpha: Alpha, x: Tensor) -> Tensor:
    return torch.as_tensor(DEFAULT_ALPHA if alpha is None else alpha, dtype=x.dtype, device=x.device)


def _entmax_bisect(x: Tensor, alpha: Alpha = None, n_iter: int = BISECT_ITERS, normalize: bool = True) -> Tensor:
    """alpha-entmax: max((alpha - 1) x - tau, 0) ** (1 / (alpha - 1)) summing
    to one, tau by bisection, in float64; the softmax where alpha is 1.
    ``normalize=False`` leaves the last step's weights undivided by their sum
    (they sum to one within the last bracket), as the entmax package's
    ``ensure_sum_one=False``; the softmax rows are normalised all the same.

    The bracket is exact: with the row maximum at 0, tau = -1 leaves a mass
    of at least 1 and tau = -(1/K) ** (alpha - 1) at most 1. The result is
    normalised (by default), so the rows sum to one to rounding. The threshold is found
    in float64 whatever the dtype: alpha = 10 or logits of 1000 randn stay
    finite and sum to one in float32. A float alpha takes the arithmetic of
    the compiled map (csrc/maps.cpp), a tensor alpha its elementwise twin."""
    z = x.to(torch.float64)
    # The softmax, the limit at alpha = 1, stands for the map within sqrt(eps)
    # of it, where the power 1 / (alpha - 1) loses more than the limit's O(alpha - 1).
    near_one = torch.finfo(torch.float64).eps ** 0.5
    if isinstance(alpha, Tensor):
        am1 = alpha.to(torch.float64) - 1
        soft = am1.abs() < near_one
        am1 = torch.where(soft, 1.0, am1)
        width = 1 - (1.0 / x.shape[-1]) ** am1
    else:
        am1 = (DEFAULT_ALPHA if alpha is None else alpha) - 1
        if abs(am1) < near_one:
            return torch.softmax(z, -1).to(x.dtype)
        width = 1 - (1.0 / x.shape[-1]) ** am1
    X = z * am1
    X = X - X.max(-1, keepdim=True).values
    lo = torch.full_like(X[..., :1], -1.0)
    width = torch.zeros_like(lo) + width  # hi - lo
    p = (X - lo).clamp_min(0) ** (1 / am1)
    for _ in range(n_iter):
        width = width / 2
        mid = lo + width
        p = (X - mid).clamp_min(0) ** (1 / am1)
        lo = torch.where(p.sum(-1, keepdim=True) >= 1, mid, lo)
    if normalize:
        p = p / p.sum(-1, keepdim=True)
    if isinstance(alpha, Tensor):
        p = torch.where(soft, torch.softmax(z, -1), p)
    return p.to(x.dtype)


# ---------------------------------------------------------------------------
# The family's curvature s (see the module docstring) and its inverses.
# ---------------------------------------------------------------------------

def _support(w: Tensor) -> Tensor:
    return (w > 0).to(w.dtype)


def _support_pow(w: Tensor, e) -> Tensor:
    """w ** e on the support w > 0, 0 off it."""
    if torch.is_grad_enabled():
        # A graph of the gradient (double backward): the power is taken on
        # the support only, so that its derivative stays finite at the zeros.
        on = w > 0
        return torch.where(on, torch.where(on, w, 1) ** e, 0)
    if isinstance(e, float) and e > 0:  # 0 ** e is 0: no mask needed
        return w.sqrt() if e == 0.5 else w**e
    return torch.where(w > 0, w**e, 0)


def _entmax15_curvature(w: Tensor, alpha: Alpha = None) -> Tensor:
    return _support_pow(w, 0.5)


def _bisect_curvature(w: Tensor, alpha: Alpha = None) -> Tensor:
    return _support_pow(w, 2 - (DEFAULT_ALPHA if alpha is None else alpha))


def _log_inverse(p: Tensor, alpha: Alpha = None) -> Tensor:
    """Centred logs: the softmax gives p back; zeros come back as tiny weights."""
    info = torch.finfo(p.dtype)
    z = p.clamp_min(max(info.tiny, info.eps**2)).log()
    return z - z.mean(-1, keepdim=True)


def _family_inverse(p: Tensor, alpha: Alpha) -> Tensor:
    """p ** (alpha - 1) / (alpha - 1) on the support (the threshold is then 0),
    -1 off it, below the threshold, so that zeros come back exactly zero."""
    a = _alpha_tensor(alpha, p)
    soft = a == 1
    am1 = torch.where(soft, 1.0, a - 1)
    on = p > 0
    z = torch.where(on, torch.where(on, p, 1) ** am1 / am1, -1.0)
    return torch.where(soft, _log_inverse(p), z)


MAPS = {
    m.name: m
    for m in (
        Map("softmax", _softmax, inverse=_log_inverse),
        Map("identity", _identity),
        Map("sparsemax", _sparsemax, lambda w, a=None: _support(w), lambda p, a=None: _family_inverse(p, 2.0)),
        Map("entmax15", _entmax15, _entmax15_curvature, lambda p, a=None: _family_inverse(p, 1.5)),
        Map("entmax_bisect", _entmax_bisect, _bisect_curvature, _family_inverse, has_alpha=True),
    )
}
# The maps whose rows lie on the simplex.
SIMPLEX_MAPS = tuple(name for name, m in MAPS.items() if m.inverse is not None)


# ---------------------------------------------------------------------------
# The sparse family's autograd: the closed form everywhere.
# ---------------------------------------------------------------------------

def _vjp(s: Tensor, g: Tensor) -> Tensor:
    """(diag(s) - s s^T / sum(s)) g, over the last dimension."""
    sg = s * g
    return sg - s * (sg.sum(-1, keepdim=True) / s.sum(-1, keepdim=True))


def _dw_dalpha(w: Tensor, a: Tensor) -> Tensor:
    """d w / d alpha (the entmax package's closed form; its limit at alpha = 1)."""
    on = w > 0
    log_w = torch.where(on, torch.where(on, w, 1).log(), 0)
    shannon = w * log_w
    am1 = a - 1
    # Below |alpha - 1| = eps ** (1/3) the closed form loses more to
    # cancellation (eps / (alpha - 1) ** 2) than the limit's O(alpha - 1).
    near_one = am1.abs() < torch.finfo(w.dtype).eps ** (1 / 3)
    am1 = torch.where(near_one, 1.0, am1)
    s = _bisect_curvature(w, a)
    skewed = s / s.sum(-1, keepdim=True)
    general = (w - skewed) / am1**2 - (shannon - skewed * shannon.sum(-1, keepdim=True)) / am1
    # At alpha -> 1 the two terms' 1/(alpha - 1) parts cancel, leaving
    # w (sum_j w_j log^2 w_j - log^2 w) / 2, with an error O(alpha - 1).
    limit = w * ((w * log_w**2).sum(-1, keepdim=True) - log_w**2) / 2
    return torch.where(near_one, limit, general)


def _sum_to(t: Tensor, shape) -> Tensor:
    """`t` summed over the dimensions broadcast from `shape`."""
    return t.sum_to_size(shape) if tuple(t.shape) != tuple(shape) else t


class _SparseMap(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, alpha, entry: Map) -> Tensor:
        return entry.forward(x, alpha)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, alpha, entry = inputs
        ctx.entry = entry
        ctx.alpha = alpha if not isinstance(alpha, Tensor) else None
        ctx.save_for_backward(output, alpha if isinstance(alpha, Tensor) else None)
        ctx.save_for_forward(output, alpha if isinstance(alpha, Tensor) else None)

    @staticmethod
    def backward(ctx, g):
        w, alpha_t = ctx.saved_tensors
        alpha = ctx.alpha if alpha_t is None else alpha_t
        dx = _vjp(ctx.entry.curvature(w, alpha), g) if ctx.needs_input_grad[0] else None
        da = None
        if alpha_t is not None and ctx.needs_input_grad[1]:
            da = _sum_to((g * _dw_dalpha(w, alpha_t)).sum(-1, keepdim=True), alpha_t.shape)
        return dx, da, None


class _SparseMapJvp(_SparseMap):
    """With forward mode (jvp), which torch.compile cannot trace: under
    torch.func transforms and forward-mode AD."""

    @staticmethod
    def jvp(ctx, x_t, alpha_t, _):
        # The Jacobian is symmetric: its product with a tangent is the vjp's.
        w, alpha = ctx.saved_tensors
        a = ctx.alpha if alpha is None else alpha
        out = _vjp(ctx.entry.curvature(w, a), x_t) if x_t is not None else torch.zeros_like(w)
        if alpha_t is not None:
            out = out + _dw_dalpha(w, alpha) * alpha_t
        return out


class _SparseMapEager(torch.autograd.Function):
    """_SparseMap in the older form (forward takes ctx), which costs about
    20 us less per call on the host: for plain eager autograd."""

    @staticmethod
    def forward(ctx, x: Tensor, alpha, entry: Map) -> Tensor:
        w = entry.forward(x, alpha)
        ctx.entry = entry
        ctx.alpha = alpha if not isinstance(alpha, Tensor) else None
        ctx.save_for_backward(w, alpha if isinstance(alpha, Tensor) else None)
        return w

    backward = staticmethod(_SparseMap.backward)


def _sparse_map_function():
    """The form of the sparse maps' autograd function this call needs."""
    if torch.compiler.is_compiling():
        return _SparseMap
    if torch._C._are_functorch_transforms_active() or fwAD._current_level >= 0:
        return _SparseMapJvp
    return _SparseMapEager


def _can_read(t: Tensor) -> bool:
    """Whether reading `t`'s values costs no device synchronisation and breaks
    no trace: a plain CPU tensor, outside torch.compile and torch.func. A
    CUDA alpha is not checked (a value below 1 gives NaN weights there)."""
    return (t.device.type == "cpu" and not torch.compiler.is_compiling()
            and not torch._C._are_functorch_transforms_active())


def get(name) -> Map:
    """The entry of map `name`; a clear error for any other value."""
    return MAPS[checks.check_map(name, MAPS)]


def _alpha_along(alpha: Tensor, x: Tensor, dim: int) -> Tensor:
    """A tensor `alpha` given x's number of dimensions (leading ones), after
    checking that it broadcasts to x with size 1 along `dim`."""
    x.size(dim)  # PyTorch's IndexError for a dim out of range
    shape = list(x.shape)
    shape[dim] = 1
    if alpha.dim() > x.dim() or any(a not in (1, s) for a, s in zip(alpha.shape[::-1], shape[::-1])):
        raise ValueError(
            f"alpha must be broadcastable to x with size 1 along dim, got shape {list(alpha.shape)} "
            f"for x of shape {list(x.shape)} and dim {dim}")
    return alpha.reshape([1] * (x.dim() - alpha.dim()) + list(alpha.shape))


def _with_options(entry: Map, n_iter, ensure_sum_one) -> Map:
    """`entry` with the bisection's options bound into its forward."""
    if entry.forward is not _entmax_bisect:
        raise ValueError(f"n_iter and ensure_sum_one are options of map 'entmax_bisect' only, not of '{entry.name}'")
    n_iter = BISECT_ITERS if n_iter is None else n_iter
    if isinstance(n_iter, bool) or not isinstance(n_iter, numbers.Integral):
        raise TypeError(f"n_iter must be an int >= 0, got {type(n_iter).__name__}")
    if n_iter < 0:
        raise ValueError(f"n_iter must be an int >= 0, got {n_iter}")
    if not isinstance(ensure_sum_one, bool):
        raise TypeError(f"ensure_sum_one must be a bool, got {type(ensure_sum_one).__name__}")
    forward = functools.partial(_entmax_bisect, n_iter=int(n_iter), normalize=ensure_sum_one)
    return dataclasses.replace(entry, forward=forward)


def apply(name: str, x: Tensor, alpha: Alpha = None, dim: int = -1, *,
          n_iter: Optional[int] = None, ensure_sum_one: bool = True) -> Tensor:
    """The weights of map `name` along `dim` of `x` (already divided by the
    temperature), with their closed-form gradients. A tensor `alpha` is
    broadcast against `x` with size 1 along `dim`, and gets a gradient.
    Options of map "entmax_bisect" only: `n_iter` bisection steps (default
    :data:`BISECT_ITERS`), and ``ensure_sum_one=False`` for the last step's
    weights undivided by their sum."""
    entry = get(name)
    alpha = checks.check_alpha(alpha, name, entry.has_alpha)
    if n_iter is not None or ensure_sum_one is not True:
        entry = _with_options(entry, n_iter, ensure_sum_one)
    if name == "softmax":  # along dim directly: torch's own kernel and autograd node
        return torch.softmax(x, dim)
    if isinstance(alpha, Tensor):
        if _can_read(alpha):
            bad = ~((alpha >= 1) & (alpha < math.inf))  # NaN too
            if bool(bad.any()):
                raise checks.error("alpha_value", value=float(alpha.detach()[bad].flatten()[0]))
        if alpha.dim() > 0:
            alpha = _alpha_along(alpha, x, dim)
    moved = dim not in (-1, x.dim() - 1)
    if moved:
        x = x.movedim(dim, -1)
        if isinstance(alpha, Tensor) and alpha.dim() > 0:
            alpha = alpha.movedim(dim, -1)
    if entry.curvature is None:
        w = entry.forward(x, alpha)
    else:
        w = _sparse_map_function().apply(x, alpha, entry)
    return w.movedim(-1, dim) if moved else w


def inverse(name: str, p: Tensor, alpha: Alpha = None) -> Tensor:
    """Pre-weights ``z`` with ``apply(name, z, alpha) == p`` for rows ``p``
    on the simplex (last dimension), exact zeros included."""
    entry = get(name)
    if entry.inverse is None:
        raise ValueError(f"map '{name}' does not map onto the simplex, so it has no inverse from probabilities")
    return entry.inverse(p, alpha)
