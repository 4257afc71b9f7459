r"""Manifold-constrained hyper-connections (mHC, DeepSeek, arXiv 2512.24880).

``n`` residual streams of width ``C`` per token, ``residual: (*, n, C)``. Per
token, with ``r`` the streams flattened to ``n * C`` values in float32::

    mixes = (r @ fn^T) * rsqrt(mean(r^2) + rms_eps) * scale + base      # n (n + 2) values
    pre   = sigmoid(mixes[:n]) + pre_eps                                 # (n,)
    post  = sigmoid(mixes[n:2n]) * post_mult                             # (n,)
    H     = sinkhorn(mixes[2n:].view(n, n), iters, sinkhorn_eps)         # (n, n), doubly stochastic
    layer_input = sum_j pre_j r_j
    out_i = post_i * layer_output + sum_j H[j, i] r_j                    # out = post F + H^T r

where ``scale[0]`` scales the ``pre`` entries, ``scale[1]`` the ``post``
entries and ``scale[2]`` the ``n * n`` stream-mix entries. The semantics and
defaults are those of TileLang's ``examples/deepseek_mhc`` (``mhc_pre_ref``,
``mhc_post_ref``); see ``docs/hyper_connections.md``.
"""
import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from . import _ext
from .ops import mix, weighted_sum
from .reference import acc_dtype
from .sinkhorn import BACKWARDS, _transforms_active, sinkhorn

__all__ = ["HyperConnections", "HyperContext", "HyperConnected"]


class HyperContext(NamedTuple):
    """What :meth:`HyperConnections.pre` hands to :meth:`HyperConnections.post`."""

    post: Tensor  # (*, n), float32 (float64 for float64 residuals)
    h: Tensor  # (*, n, n), doubly stochastic, same dtype


class HyperConnections(nn.Module):
    r"""mHC around one layer: ``x, ctx = hc.pre(residual)``, then
    ``residual = hc.post(layer(x), residual, ctx)``; or ``hc.wrap(layer)``.

    Args:
        n (int): the number of residual streams (mHC's ``hc_mult``; 4 in DeepSeek's models).
        dim (int): the width ``C`` of one stream (the layer's hidden size).
        sinkhorn_iters (int): Sinkhorn iterations (``sinkhorn_repeat``). Default: 20.
        rms_eps (float): added to ``mean(r^2)``. Default: ``1e-6``.
        pre_eps (float): added to the pre-mix weights. Default: ``1e-6``.
        sinkhorn_eps (float): Sinkhorn's eps. Default: ``1e-6``.
        post_mult (float): the post-mix weights' range ``(0, post_mult)``. Default: 2.0.
        sinkhorn_backward (str): :func:`simplex_param.sinkhorn`'s backward. Default: ``"recompute"``.

    Parameters (float32): ``fn`` ``(n (n + 2), n dim)``, ``scale`` ``(3,)``,
    ``base`` ``(n (n + 2),)``. Their initialisation is this library's choice
    (see :meth:`reset_parameters`), not taken from a reference.

    Residuals of any floating dtype (bfloat16 as in DeepSeek's models): the
    mixes are computed in float32 (float64 for float64 residuals), the layer
    input and the new residual are returned in the residual's dtype.

    Example::

        >>> hc = sp.HyperConnections(4, 8)
        >>> residual = torch.randn(2, 3, 4, 8)  # (batch, tokens, n, C)
        >>> x, ctx = hc.pre(residual)
        >>> x.shape
        torch.Size([2, 3, 8])
        >>> hc.post(torch.tanh(x), residual, ctx).shape
        torch.Size([2, 3, 4, 8])
    """

    def __init__(self, n: int, dim: int, *, sinkhorn_iters: int = 20, rms_eps: float = 1e-6,
                 pre_eps: float = 1e-6, sinkhorn_eps: float = 1e-6, post_mult: float = 2.0,
                 sinkhorn_backward: str = "recompute", device=None):
        super().__init__()
        for name, v in (("n", n), ("dim", dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"HyperConnections: {name} must be an int >= 1, got {v!r}")
        if sinkhorn_backward not in BACKWARDS:
            raise ValueError(f"HyperConnections: sinkhorn_backward must be one of "
                             f"{', '.join(map(repr, BACKWARDS))}, got {sinkhorn_backward!r}")
        if isinstance(sinkhorn_iters, bool) or not isinstance(sinkhorn_iters, int) or sinkhorn_iters < 1:
            raise ValueError(f"HyperConnections: sinkhorn_iters must be an int >= 1, got {sinkhorn_iters!r}")
        for name, v in (("rms_eps", rms_eps), ("pre_eps", pre_eps), ("sinkhorn_eps", sinkhorn_eps),
                        ("post_mult", post_mult)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) < math.inf:
                raise ValueError(f"HyperConnections: {name} must be a finite float >= 0, got {v!r}")
        self.n, self.dim = n, dim
        self.sinkhorn_iters = int(sinkhorn_iters)
        self.rms_eps, self.pre_eps = float(rms_eps), float(pre_eps)
        self.sinkhorn_eps, self.post_mult = float(sinkhorn_eps), float(post_mult)
        self.sinkhorn_backward = sinkhorn_backward
        m = n * (n + 2)
        self.fn = nn.Parameter(torch.empty(m, n * dim, device=device, dtype=torch.float32))
        self.scale = nn.Parameter(torch.empty(3, device=device, dtype=torch.float32))
        self.base = nn.Parameter(torch.empty(m, device=device, dtype=torch.float32))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        r"""``fn ~ N(0, 1 / (n dim))`` (so ``r_hat @ fn^T`` has about unit
        variance), ``scale = 0.01`` (the dynamic part starts small), ``base``:
        ``logit(1 / n)`` on the pre entries (the layer input starts near the
        mean of the streams), 0 on the post entries (``post = post_mult / 2``)
        and on the stream mix (``H`` near uniform)."""
        n = self.n
        nn.init.normal_(self.fn, std=1.0 / math.sqrt(n * self.dim))
        self.scale.fill_(0.01)
        self.base.zero_()
        if n > 1:
            self.base[:n] = math.log(1.0 / (n - 1))  # logit(1/n)
        else:
            self.base[:n] = 4.0

    def extra_repr(self) -> str:
        return (f"n={self.n}, dim={self.dim}, sinkhorn_iters={self.sinkhorn_iters}, rms_eps={self.rms_eps}, "
                f"pre_eps={self.pre_eps}, sinkhorn_eps={self.sinkhorn_eps}, post_mult={self.post_mult}")

    def _check_residual(self, residual: Tensor, what: str = "residual") -> None:
        if not isinstance(residual, Tensor) or not residual.dtype.is_floating_point:
            raise TypeError(f"HyperConnections: {what} must be a floating tensor")
        if residual.dim() < 2 or tuple(residual.shape[-2:]) != (self.n, self.dim):
            raise ValueError(f"HyperConnections: {what} must have shape (*, n, C) = (*, {self.n}, {self.dim}), "
                             f"got {list(residual.shape)}")

    def mixes(self, residual: Tensor) -> tuple:
        """``(pre, post, H)`` of every token, in float32 (float64 for float64 residuals)."""
        self._check_residual(residual)
        mixes = _mixes(residual, self.fn, self.scale, self.base, self.rms_eps)
        return torch.sigmoid(mixes[..., :self.n]) + self.pre_eps, *self._post_and_h(mixes)

    def _post_and_h(self, mixes: Tensor) -> tuple:
        n = self.n
        post = torch.sigmoid(mixes[..., n:2 * n]) * self.post_mult
        h = sinkhorn(mixes[..., 2 * n:].unflatten(-1, (n, n)), iters=self.sinkhorn_iters,
                     eps=self.sinkhorn_eps, backward=self.sinkhorn_backward)
        return post, h

    def pre(self, residual: Tensor):
        """``(layer_input, ctx)``: ``layer_input = sum_j pre_j residual[..., j, :]``
        of shape ``(*, C)`` in the residual's dtype; ``ctx`` for :meth:`post`.

        On CPU with the compiled extension, the mixes and the layer input are
        one op (``torch.ops.simplex_param.hc_pre``) that reads the residual
        from memory once, and once more in its backward; elsewhere, the
        composite of :meth:`mixes` and :func:`~simplex_param.weighted_sum`."""
        self._check_residual(residual)
        args = (residual, self.fn, self.scale, self.base)
        if _use_kernel(*args):
            x, mixes, _, _ = torch.ops.simplex_param.hc_pre.default(*args, self.rms_eps, self.pre_eps)
            return x, HyperContext(*self._post_and_h(mixes))
        pre, post, h = self.mixes(residual)
        x = weighted_sum(pre, residual.unbind(-2))
        return x, HyperContext(post, h)

    def post(self, layer_output: Tensor, residual: Tensor, ctx: HyperContext) -> Tensor:
        """The new residual ``(*, n, C)``: ``out_i = post_i * layer_output + sum_j H[j, i] residual_j``,
        accumulated in float32, in the residual's dtype (a layer output of
        another dtype is cast to it first).

        On CPU with the compiled extension, one op
        (``torch.ops.simplex_param.hc_post``) whose backward writes the
        residual's gradient whole; elsewhere, :func:`~simplex_param.mix` of
        the layer output and the streams."""
        self._check_residual(residual)
        if not isinstance(layer_output, Tensor) or layer_output.shape != residual.shape[:-2] + residual.shape[-1:]:
            raise ValueError(f"HyperConnections.post: layer_output must have shape (*, C) = "
                             f"{list(residual.shape[:-2] + residual.shape[-1:])}, got "
                             f"{list(layer_output.shape) if isinstance(layer_output, Tensor) else layer_output!r}")
        post, h = ctx
        layer_output = layer_output.to(residual.dtype)
        if _use_kernel(layer_output, residual, post, h):
            return torch.ops.simplex_param.hc_post.default(layer_output, residual, post, h)
        weights = torch.cat([post.unsqueeze(-1), h.mT], -1)  # row i: [post_i, H[0, i], ..., H[n-1, i]]
        return mix(weights, [layer_output, *residual.unbind(-2)])

    def wrap(self, layer: nn.Module) -> "HyperConnected":
        """A module running ``pre``, ``layer`` and ``post``: ``wrapped(residual, *args, **kwargs)``
        returns the new residual (extra arguments go to ``layer``)."""
        return HyperConnected(self, layer)


class HyperConnected(nn.Module):
    """``layer`` between ``hc.pre`` and ``hc.post`` (made by :meth:`HyperConnections.wrap`)."""

    def __init__(self, hc: HyperConnections, layer: nn.Module):
        super().__init__()
        self.hc, self.layer = hc, layer

    def forward(self, residual: Tensor, *args, **kwargs) -> Tensor:
        x, ctx = self.hc.pre(residual)
        return self.hc.post(self.layer(x, *args, **kwargs), residual, ctx)


def _mixes(residual: Tensor, fn: Tensor, scale: Tensor, base: Tensor, rms_eps: float) -> Tensor:
    """The ``n (n + 2)`` mixes of every token, composed of ATen ops."""
    n = residual.shape[-2]
    acc = acc_dtype(residual.dtype)
    r = residual.flatten(-2).to(acc)
    rms = torch.rsqrt(r.square().mean(-1, keepdim=True) + rms_eps)
    scale = scale.to(acc)
    scale = torch.cat([scale[0].expand(n), scale[1].expand(n), scale[2].expand(n * n)])
    return (r @ fn.to(acc).T) * rms * scale + base.to(acc)


def _pre_composite(residual, fn, scale, base, rms_eps, pre_eps):
    """``hc_pre``'s (layer input, mixes), composed of differentiable ATen ops."""
    n = residual.shape[-2]
    mixes = _mixes(residual, fn, scale, base, rms_eps)
    pre = torch.sigmoid(mixes[..., :n]) + pre_eps
    x = (residual.to(mixes.dtype) * pre.unsqueeze(-1)).sum(-2).to(residual.dtype)
    return x, mixes


def _post_composite(layer_output, residual, post, h):
    """``hc_post``, composed of differentiable ATen ops."""
    acc = acc_dtype(residual.dtype)
    out = layer_output.to(acc).unsqueeze(-2) * post.to(acc).unsqueeze(-1) + h.to(acc).mT @ residual.to(acc)
    return out.to(residual.dtype)


_OPS = ("hc_pre", "_hc_pre_backward", "hc_post", "_hc_post_backward")


def _has_cpu_kernel() -> bool:
    if not _ext.extension_loaded():
        return False
    has = torch._C._dispatch_has_computed_kernel_for_dispatch_key
    return all(has(f"simplex_param::{op}", "CPU") for op in _OPS)


_HAS_KERNEL = _has_cpu_kernel()


def _use_kernel(*tensors: Tensor) -> bool:
    """Whether the fused ops (hc_pre, hc_post) run: the extension's CPU kernels are there,
    every tensor is a plain CPU tensor (not a DTensor or another subclass),
    and no torch.func transform or forward-mode AD needs the composite."""
    if not _HAS_KERNEL or _transforms_active():
        return False
    if any(t.device.type != "cpu" or type(t) not in (Tensor, nn.Parameter) for t in tensors):
        return False
    return torch.compiler.is_compiling() or not torch._C._has_torch_function(tensors)


def _setup_context(ctx, inputs, output):
    residual, fn, scale, base, rms_eps, pre_eps = inputs
    _, mixes, proj, rstd = output
    ctx.save_for_backward(residual, fn, scale, base, mixes, proj, rstd)
    ctx.eps = (rms_eps, pre_eps)
    ctx.mark_non_differentiable(proj, rstd)


def _backward(ctx, grad_x, grad_mixes, _grad_proj, _grad_rstd):
    residual, fn, scale, base, mixes, proj, rstd = ctx.saved_tensors
    rms_eps, pre_eps = ctx.eps
    want = ctx.needs_input_grad[:4]
    if torch.is_grad_enabled():
        def composite(*args):
            return _pre_composite(*args, rms_eps, pre_eps)
        return (*_double_backward(composite, (residual, fn, scale, base), want, (grad_x, grad_mixes)), None, None)
    if grad_x is None:
        grad_x = residual.new_zeros(residual.shape[:-2] + residual.shape[-1:])
    grad_r, grad_fn, grad_mix = torch.ops.simplex_param._hc_pre_backward.default(
        grad_x, grad_mixes, residual, fn, scale, mixes, proj, rstd, pre_eps)
    n, M = residual.shape[-2], mixes.shape[-1]
    by_mix = (grad_mix * proj).reshape(-1, M).sum(0)
    grad_scale = torch.stack([by_mix[:n].sum(), by_mix[n:2 * n].sum(), by_mix[2 * n:].sum()]).to(scale.dtype)
    grad_base = grad_mix.reshape(-1, M).sum(0).to(base.dtype)
    return grad_r, grad_fn, grad_scale, grad_base, None, None


def _double_backward(composite, inputs, needs, outs_grads):
    """The gradients of `composite(*inputs)` with a graph (create_graph=True,
    for double backward): the composite rebuilt from the saved inputs."""
    leaves = [t for t, w in zip(inputs, needs) if w]
    outs = composite(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    outs, grads = zip(*((o, g) for o, g in zip(outs, outs_grads) if g is not None))
    got = iter(torch.autograd.grad(outs, leaves, grads, create_graph=True, allow_unused=True))
    return tuple(next(got) if w else None for w in needs)


def _setup_post(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward_post(ctx, grad):
    layer_output, residual, post, h = ctx.saved_tensors
    if torch.is_grad_enabled():
        return _double_backward(_post_composite, (layer_output, residual, post, h), ctx.needs_input_grad, (grad,))
    return torch.ops.simplex_param._hc_post_backward.default(grad, layer_output, residual, post, h)


def _fake_hc_post(layer_output, residual, post, h):
    return residual.new_empty(residual.shape)


def _fake_hc_post_backward(grad, layer_output, residual, post, h):
    return (layer_output.new_empty(layer_output.shape), residual.new_empty(residual.shape),
            post.new_empty(post.shape), h.new_empty(h.shape))


def _fake_hc_pre(residual, fn, scale, base, rms_eps, pre_eps):
    acc = acc_dtype(residual.dtype)
    n, C = residual.shape[-2:]
    lead = residual.shape[:-2]
    M = n * (n + 2)
    return (residual.new_empty(lead + (C,)), residual.new_empty(lead + (M,), dtype=acc),
            residual.new_empty(lead + (M,), dtype=acc), residual.new_empty(lead, dtype=acc))


def _fake_hc_pre_backward(grad_x, grad_mixes, residual, fn, scale, mixes, proj, rstd, pre_eps):
    return (residual.new_empty(residual.shape), fn.new_empty(fn.shape),
            mixes.new_empty(mixes.shape, dtype=acc_dtype(residual.dtype)))


if _HAS_KERNEL:
    torch.library.register_fake("simplex_param::hc_pre")(_fake_hc_pre)
    torch.library.register_fake("simplex_param::_hc_pre_backward")(_fake_hc_pre_backward)
    torch.library.register_autograd("simplex_param::hc_pre", _backward, setup_context=_setup_context)
    torch.library.register_fake("simplex_param::hc_post")(_fake_hc_post)
    torch.library.register_fake("simplex_param::_hc_post_backward")(_fake_hc_post_backward)
    torch.library.register_autograd("simplex_param::hc_post", _backward_post, setup_context=_setup_post)
