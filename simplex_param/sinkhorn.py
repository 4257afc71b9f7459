r"""Doubly stochastic matrices: the Sinkhorn normalisation and the ``Birkhoff``
parametrization.

:func:`sinkhorn` is the normalisation of DeepSeek's mHC (TileLang's
``examples/deepseek_mhc``, ``sinkhorn_normalize_ref``), over the last two
dimensions of ``(*P, n, n)`` logits::

    x = softmax(x, -1) + eps              # the row maximum subtracted first
    x = x / (x.sum(-2) + eps)             # columns
    repeat (iters - 1) times:
        x = x / (x.sum(-1) + eps)         # rows
        x = x / (x.sum(-2) + eps)         # columns

(the sums keep their dimension). Three backward modes, see
``docs/hyper_connections.md``:

* ``"unroll"``: autograd through the iterations, which saves every iterate;
* ``"recompute"``: saves the logits only, and runs the same forward again
  under autograd in the backward: the gradients are bitwise those of
  ``"unroll"``, the memory kept between forward and backward does not grow
  with ``iters``;
* ``"implicit"``: saves the logits and the output, and differentiates the
  fixed point (the exact Sinkhorn projection of ``A = softmax(x) + eps``) by
  the implicit function theorem, with one ``n x n`` linear solve per matrix;
  its error against ``"unroll"`` is that of the forward's convergence.

Where the compiled extension has a kernel for the logits' device (CPU, CUDA in a CUDA build; see
:func:`_use_kernel`), ``"unroll"`` and ``"recompute"`` are one fused op,
``torch.ops.simplex_param.sinkhorn``, with its own C++ autograd: it saves the
logits only, and its backward op ``_sinkhorn_backward`` recomputes the
iterates of each matrix and back-propagates through them, so the two modes
give bitwise the same gradients there too (and ``"unroll"`` saves no
iterate). The forward of ``"implicit"`` is the same op. Elsewhere (no
extension, another device, ``torch.func`` transforms, forward-mode AD, tensor
subclasses), the composite of PyTorch ops below runs.
"""
import math
import numbers

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from . import _ext

__all__ = ["sinkhorn", "Birkhoff", "BACKWARDS"]

BACKWARDS = ("unroll", "recompute", "implicit")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _forward(x: Tensor, iters: int, eps: float) -> Tensor:
    """The normalisation, in x's dtype, made of differentiable PyTorch ops."""
    x = torch.softmax(x, -1) + eps
    x = x / (x.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        x = x / (x.sum(-1, keepdim=True) + eps)
        x = x / (x.sum(-2, keepdim=True) + eps)
    return x


def _recompute_grad(x: Tensor, g: Tensor, iters: int, eps: float) -> Tensor:
    """The vector-Jacobian product of :func:`_forward` at `x`, by running it
    again under autograd. With a graph of the backward (double backward), the
    saved `x` itself is the input, so the result is differentiable in it."""
    if torch.is_grad_enabled() and x.requires_grad:  # create_graph=True
        y = _forward(x, iters, eps)
        return torch.autograd.grad(y, x, g, create_graph=True)[0]
    with torch.enable_grad():
        xd = x.detach().requires_grad_()
        y = _forward(xd, iters, eps)
        return torch.autograd.grad(y, xd, g)[0]


class _Recompute(torch.autograd.Function):
    """Saves the logits only; the backward recomputes the forward."""

    @staticmethod
    def forward(ctx, x: Tensor, iters: int, eps: float) -> Tensor:
        ctx.iters, ctx.eps = iters, eps
        ctx.save_for_backward(x)
        return _forward(x, iters, eps)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _recompute_grad(x, g, ctx.iters, ctx.eps), None, None


def _implicit_vjp(x: Tensor, p: Tensor, g: Tensor, eps: float) -> Tensor:
    r"""The gradient of the logits through the fixed point.

    At the fixed point ``P = diag(e^f) A diag(e^h)`` with unit row and column
    sums, ``A = softmax(x) + eps``. Perturbing ``L = log A`` by ``dL``:
    ``dP = P * (dL + df 1^T + 1 dh^T)``, and the sums stay 1, so
    ``[I P; P^T I] [df; dh] = -[rowsum(P * dL); colsum(P * dL)]``. The adjoint
    ``(a, b)`` solves the same (symmetric) system with the right-hand side
    ``(rowsum(Q), colsum(Q))``, ``Q = G * P``, giving
    ``dLoss/dL = P * (G - a 1^T - 1 b^T)``. Eliminating ``a = rowsum(Q) - P b``
    leaves ``(I - P^T P) b = colsum(Q) - P^T rowsum(Q)``, singular along
    ``1`` (the gauge ``(a + t, b - t)``), which ``+ 1 1^T / n`` removes:
    the right-hand side sums to zero, so the solution has ``1^T b = 0`` and
    solves the singular system too. Then through ``A = softmax(x) + eps``:
    ``dLoss/dA = dLoss/dL / A`` and the softmax's vector-Jacobian product.
    """
    n = p.shape[-1]
    q = g * p
    qr = q.sum(-1)  # (*P, n)
    qc = q.sum(-2)
    pt = p.mT
    eye = torch.eye(n, dtype=p.dtype, device=p.device)
    m = eye - pt @ p + 1.0 / n
    rhs = qc - (pt @ qr.unsqueeze(-1)).squeeze(-1)
    b = torch.linalg.solve(m, rhs.unsqueeze(-1))  # (*P, n, 1)
    a = qr.unsqueeze(-1) - p @ b  # (*P, n, 1)
    g_log = p * (g - a - b.mT)
    s = torch.softmax(x, -1)
    g_a = g_log / (s + eps)
    return s * (g_a - (s * g_a).sum(-1, keepdim=True))


def _implicit_jvp(x: Tensor, p: Tensor, t: Tensor, eps: float) -> Tensor:
    """The tangent of the fixed point for a tangent `t` of the logits: the
    same system as :func:`_implicit_vjp`, forwards: ``dL = dA / A`` with ``dA``
    the softmax's tangent, ``[df; dh]`` from ``(I - P^T P) dh = P^T r - c``,
    ``df = -r - P dh`` (``r``, ``c`` the row and column sums of ``P * dL``),
    and ``dP = P * (dL + df 1^T + 1 dh^T)``."""
    n = p.shape[-1]
    s = torch.softmax(x, -1)
    dl = s * (t - (s * t).sum(-1, keepdim=True)) / (s + eps)
    q = p * dl
    r, c = q.sum(-1), q.sum(-2)
    pt = p.mT
    eye = torch.eye(n, dtype=p.dtype, device=p.device)
    dh = torch.linalg.solve(eye - pt @ p + 1.0 / n, ((pt @ r.unsqueeze(-1)).squeeze(-1) - c).unsqueeze(-1))
    df = -r.unsqueeze(-1) - p @ dh
    return p * (dl + df + dh.mT)


class _Implicit(torch.autograd.Function):
    """Saves the logits and the output; the backward solves the adjoint system."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, iters: int, eps: float) -> Tensor:
        if _use_kernel(x):
            return torch.ops.simplex_param.sinkhorn.default(x, iters, eps)
        return _forward(x, iters, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, _, eps = inputs
        ctx.eps = eps
        ctx.save_for_backward(x, output)
        ctx.save_for_forward(x, output)

    @staticmethod
    def backward(ctx, g):
        x, p = ctx.saved_tensors
        return _implicit_vjp(x, p, g, ctx.eps), None, None


class _ImplicitJvp(_Implicit):
    """With forward mode (jvp), which torch.compile cannot trace: under
    torch.func transforms and forward-mode AD (as maps.py does)."""

    @staticmethod
    def jvp(ctx, x_t, *_):
        x, p = ctx.saved_tensors
        return _implicit_jvp(x, p, x_t, ctx.eps)


def _check(logits, iters, eps, backward) -> None:
    if not isinstance(logits, Tensor):
        raise TypeError(f"sinkhorn: logits must be a Tensor, got {type(logits).__name__}")
    if not logits.dtype.is_floating_point:
        raise TypeError(f"sinkhorn: logits must be a floating tensor, got {logits.dtype}")
    if logits.dim() < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(
            f"sinkhorn: logits must have square last two dimensions (*P, n, n), got shape {list(logits.shape)}")
    if isinstance(iters, bool) or not isinstance(iters, numbers.Integral):
        raise TypeError(f"sinkhorn: iters must be an int >= 1, got {type(iters).__name__}")
    if iters < 1:
        raise ValueError(f"sinkhorn: iters must be an int >= 1, got {iters}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"sinkhorn: eps must be a float >= 0, got {type(eps).__name__}")
    if not 0.0 <= eps < math.inf:
        raise ValueError(f"sinkhorn: eps must be a finite float >= 0, got {eps}")
    if backward not in BACKWARDS:
        raise ValueError(f"sinkhorn: backward must be one of {', '.join(map(repr, BACKWARDS))}, got {backward!r}")


def _check_grad(grad, logits) -> None:
    """The gradient given to _sinkhorn_backward against the logits."""
    if not isinstance(grad, Tensor) or grad.dtype != logits.dtype:
        got = grad.dtype if isinstance(grad, Tensor) else type(grad).__name__
        raise TypeError(f"_sinkhorn_backward: grad has dtype {got} but logits has dtype {logits.dtype}")
    if grad.shape != logits.shape:
        raise ValueError(f"_sinkhorn_backward: grad has shape {list(grad.shape)} but logits has shape "
                         f"{list(logits.shape)}")
    if grad.device != logits.device:
        raise ValueError(f"_sinkhorn_backward: grad is on device {grad.device} but logits is on device "
                         f"{logits.device}")


def _transforms_active() -> bool:
    return torch._C._are_functorch_transforms_active() or fwAD._current_level >= 0


def _kernel_devices() -> frozenset:
    """Device types with a compiled Sinkhorn kernel, read from the dispatcher."""
    if not _ext.extension_loaded():
        return frozenset()
    has = torch._C._dispatch_has_computed_kernel_for_dispatch_key
    return frozenset(device for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
                     if has("simplex_param::sinkhorn", key) and has("simplex_param::_sinkhorn_backward", key))


_KERNEL_DEVICES = _kernel_devices()


def _use_kernel(x: Tensor) -> bool:
    """Whether the fused op runs on `x`: the extension has a kernel for its
    device, and neither a torch.func transform, forward-mode AD (the op has
    no batching rule and no forward derivative) nor a tensor subclass (a
    DTensor has no sharding rule for it, and its __torch_function__ is the
    disabled one, which _has_torch_function does not see) needs the
    composite."""
    if x.device.type not in _KERNEL_DEVICES or _transforms_active() or type(x) not in (Tensor, nn.Parameter):
        return False
    return torch.compiler.is_compiling() or not torch._C._has_torch_function((x,))


def sinkhorn(logits: Tensor, *, iters: int = 20, eps: float = 1e-6, backward: str = "recompute") -> Tensor:
    r"""Doubly stochastic matrices from ``(*P, n, n)`` logits: mHC's Sinkhorn normalisation.

    ``softmax`` over each row (plus ``eps``), then ``iters`` column
    normalisations and ``iters - 1`` row normalisations between them, each
    dividing by the sum plus ``eps`` (see the module docstring). The last step
    normalises columns, so the columns sum to one (to ``eps``) and the rows to
    within the convergence error. float16 and bfloat16 logits are computed in
    float32, float64 in float64; the result has the logits' dtype.

    Args:
        logits (Tensor): ``(*P, n, n)``, any floating dtype.
        iters (int): the number of column normalisations, ``>= 1`` (mHC's
            ``sinkhorn_repeat``). Default: 20.
        eps (float): added to the softmax and to every sum, ``>= 0``. Default: ``1e-6``.
        backward (str): ``"recompute"`` (the default: saves the logits only,
            recomputes the forward in the backward, gradients bitwise those of
            ``"unroll"``), ``"unroll"`` (autograd through every iteration,
            which saves them all), or ``"implicit"`` (the implicit function
            theorem at the fixed point: one ``n x n`` solve per matrix,
            approximate to the forward's convergence).

    Under ``torch.func`` transforms and forward-mode AD, ``"recompute"`` runs
    as ``"unroll"`` (the same values and gradients); ``"implicit"``'s
    forward-mode derivative is the fixed point's too.

    Example::

        >>> h = sp.sinkhorn(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
        >>> h.sum(-2), h.sum(-1)  # doctest: +ELLIPSIS
        (tensor([1.0000, 1.0000]), tensor([1.0000, 1.0000]))
    """
    _check(logits, iters, eps, backward)
    iters, eps = int(iters), float(eps)
    if backward != "implicit" and _use_kernel(logits):
        # The op computes in float32 (float64) and returns the logits' dtype.
        return torch.ops.simplex_param.sinkhorn.default(logits, iters, eps)
    x = logits.to(_compute_dtype(logits.dtype))
    if backward == "unroll" or not torch.is_grad_enabled() or not x.requires_grad:
        y = _forward(x, iters, eps)
    elif backward == "recompute":
        if _transforms_active():
            y = _forward(x, iters, eps)
        elif torch.compiler.is_compiling():
            # Dynamo breaks the graph at autograd.grad inside a Function's
            # backward (torch._dynamo.config.trace_autograd_ops is False by
            # default), so fullgraph=True would fail: the same recomputation
            # as activation checkpointing instead.
            y = torch.utils.checkpoint.checkpoint(_forward, x, iters, eps, use_reentrant=False)
        else:
            y = _Recompute.apply(x, iters, eps)
    else:
        y = (_ImplicitJvp if _transforms_active() else _Implicit).apply(x, iters, eps)
    return y.to(logits.dtype)


_SUM_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


class Birkhoff(nn.Module):
    r"""Parametrization of a ``(..., n, n)`` tensor as doubly stochastic
    matrices: ``W = sinkhorn(Z, iters=iters, eps=eps)`` over the last two
    dimensions, with unconstrained logits ``Z`` stored by
    :func:`torch.nn.utils.parametrize.register_parametrization`.

    ``right_inverse`` (called on registration and on ``module.name = value``):

    * a ``value`` with positive entries whose rows and columns sum to one
      (within ``1e-6`` for float64, ``1e-4`` for float32, ``1e-2`` for
      float16, ``3e-2`` for bfloat16) is taken as the matrix: the logits
      start at ``log(value)`` and are corrected (``Z += log value - log W``,
      a few times) until ``W`` is within ``1e-5`` of it, or as close as the
      dtype allows;
    * any other finite ``value`` (a fresh ``randn`` included) is taken as the
      logits themselves;
    * NaN or inf raises ``ValueError``.

    Args:
        iters (int): Sinkhorn iterations, ``>= 1``. Default: 20.
        eps (float): Sinkhorn's eps, ``>= 0``. Default: ``1e-6``.
        backward (str): the backward mode of :func:`sinkhorn`. Default: ``"recompute"``.

    Example::

        >>> m = nn.Linear(3, 3, bias=False)
        >>> _ = parametrize.register_parametrization(m, "weight", sp.Birkhoff())
        >>> w = m.weight
        >>> bool(torch.allclose(w.sum(0), torch.ones(3), atol=1e-5)), bool(torch.allclose(w.sum(1), torch.ones(3), atol=1e-4))
        (True, True)
    """

    def __init__(self, iters: int = 20, eps: float = 1e-6, *, backward: str = "recompute"):
        super().__init__()
        _check(torch.zeros(1, 1), iters, eps, backward)
        self.iters, self.eps, self.backward = int(iters), float(eps), backward

    def forward(self, Z: Tensor) -> Tensor:
        return sinkhorn(Z, iters=self.iters, eps=self.eps, backward=self.backward)

    def extra_repr(self) -> str:
        return f"iters={self.iters}, eps={self.eps}, backward={self.backward!r}"

    def _is_doubly_stochastic(self, Y: Tensor, dtype: torch.dtype) -> bool:
        if Y.numel() == 0 or not bool((Y > 0).all()):
            return False
        tol = _SUM_TOLERANCE.get(dtype, 1e-2)
        return bool(((Y.sum(-1) - 1).abs() <= tol).all()) and bool(((Y.sum(-2) - 1).abs() <= tol).all())

    @torch.no_grad()
    def right_inverse(self, Y: Tensor) -> Tensor:
        if not isinstance(Y, Tensor) or not Y.dtype.is_floating_point:
            raise TypeError("Birkhoff.right_inverse: the parametrized tensor must be a floating tensor")
        if Y.dim() < 2 or Y.shape[-1] != Y.shape[-2]:
            raise ValueError(
                f"Birkhoff: the parametrized tensor must have square last two dimensions (..., n, n), "
                f"got shape {list(Y.shape)}")
        if Y.device.type == "meta":
            return Y.clone()
        Yc = Y.to(_compute_dtype(Y.dtype))
        if not bool(torch.isfinite(Yc).all()):
            raise ValueError("Birkhoff.right_inverse: the value contains NaN or inf; expected a doubly "
                             "stochastic matrix or finite logits")
        if not self._is_doubly_stochastic(Yc, Y.dtype):
            return Y.clone()
        target = Yc.log()
        Z = target - target.mean(-1, keepdim=True)
        for _ in range(20):
            W = _forward(Z, self.iters, self.eps)
            if float((W - Yc).abs().max()) <= 1e-6:
                break
            Z = Z + (target - W.log())
            Z = Z - Z.mean(-1, keepdim=True)
        return Z.to(Y.dtype)
