"""sp.HyperConnections, against an oracle written straight from
mHC's formulas (per token, r the n streams flattened, in float32):

    mixes = (r @ fn^T) * rsqrt(mean(r^2) + rms_eps) * scale + base
    pre = sigmoid(mixes[:n]) + pre_eps; post = sigmoid(mixes[n:2n]) * post_mult
    H = sinkhorn(mixes[2n:].view(n, n))
    layer_input = sum_j pre_j r_j;  out_i = post_i * F + sum_j H[j, i] r_j
"""
import pytest
import torch
from torch import nn

import simplex_param as sp

from test_sinkhorn import oracle as sinkhorn_oracle  # mHC's sinkhorn, from its definition


def pre_oracle(residual, fn, scale, base, n, rms_eps=1e-6, pre_eps=1e-6, sinkhorn_eps=1e-6, post_mult=2.0,
               iters=20):
    """Token by token, with explicit loops over the streams."""
    lead = residual.shape[:-2]
    res = residual.reshape(-1, n, residual.shape[-1])
    xs, posts, hs = [], [], []
    for t in range(res.shape[0]):
        r = res[t].reshape(-1).float()
        m = (fn @ r) * torch.rsqrt((r * r).mean() + rms_eps)
        s = torch.cat([scale[0].repeat(n), scale[1].repeat(n), scale[2].repeat(n * n)])
        m = m * s + base
        pre = torch.sigmoid(m[:n]) + pre_eps
        posts.append(torch.sigmoid(m[n:2 * n]) * post_mult)
        hs.append(sinkhorn_oracle(m[2 * n:].reshape(n, n), iters, sinkhorn_eps))
        x = sum(pre[j] * res[t, j].float() for j in range(n))
        xs.append(x.to(residual.dtype))
    return (torch.stack(xs).reshape(*lead, -1), torch.stack(posts).reshape(*lead, n),
            torch.stack(hs).reshape(*lead, n, n))


def post_oracle(layer_output, residual, post, h):
    n = residual.shape[-2]
    acc = torch.promote_types(residual.dtype, torch.float32)  # float32, float64 for float64
    outs = []
    for i in range(n):
        o = post[..., i, None] * layer_output.to(acc)
        for j in range(n):
            o = o + h[..., j, i, None] * residual[..., j, :].to(acc)
        outs.append(o)
    return torch.stack(outs, -2).to(residual.dtype)


def make(n=4, C=16, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    hc = sp.HyperConnections(n, C)
    with torch.no_grad():  # away from the initialisation, so every term matters
        hc.scale.copy_(torch.randn(3) * 0.5 + 1)
        hc.base.copy_(torch.randn(n * (n + 2)))
    residual = torch.randn(2, 3, n, C).to(dtype)
    return hc, residual


def test_defaults_are_deepseeks():
    hc = sp.HyperConnections(4, 8)
    assert (hc.rms_eps, hc.pre_eps, hc.sinkhorn_eps, hc.post_mult, hc.sinkhorn_iters) == (1e-6, 1e-6, 1e-6, 2.0, 20)
    assert hc.fn.shape == (24, 32) and hc.scale.shape == (3,) and hc.base.shape == (24,)
    assert all(p.dtype == torch.float32 for p in hc.parameters())


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_pre_and_post_match_the_formula(dtype, tol):
    hc, residual = make(dtype=dtype)
    x, ctx = hc.pre(residual)
    want_x, want_post, want_h = pre_oracle(residual, hc.fn, hc.scale, hc.base, 4)
    assert x.dtype == dtype and ctx.post.dtype == torch.float32 and ctx.h.dtype == torch.float32
    torch.testing.assert_close(ctx.post, want_post, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ctx.h, want_h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x, want_x, atol=tol, rtol=tol)
    f = torch.tanh(x.float()).to(dtype)
    out = hc.post(f, residual, ctx)
    assert out.dtype == dtype and out.shape == residual.shape
    torch.testing.assert_close(out, post_oracle(f, residual, want_post, want_h), atol=tol, rtol=tol)


def test_h_is_transposed_in_post():
    # A permutation-like H that is not symmetric: out_i = sum_j H[j, i] r_j.
    hc, residual = make(n=3, C=4)
    h = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]).expand(2, 3, 3, 3)
    ctx = sp.hyper_connections.HyperContext(torch.zeros(2, 3, 3), h)
    out = hc.post(torch.zeros(2, 3, 4), residual, ctx)
    # column i of H holds the single j with H[j, i] = 1: out_0 = r_2, out_1 = r_0, out_2 = r_1
    assert torch.equal(out, residual[..., [2, 0, 1], :])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_match_the_formula(dtype):
    hc, residual = make(dtype=dtype)
    residual.requires_grad_()
    f_w = torch.randn(16)

    def loss(pre_fn, post_fn, params, res):
        x, post, h = pre_fn(res, *params)
        out = post_fn(torch.tanh(x.float() * f_w).to(dtype), res, post, h)
        return (out.float() * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum()

    params = [hc.fn, hc.scale, hc.base]
    ours = loss(lambda r, *p: (lambda x, c: (x, c.post, c.h))(*hc.pre(r)),
                lambda f, r, post, h: hc.post(f, r, sp.hyper_connections.HyperContext(post, h)), params, residual)
    got = torch.autograd.grad(ours, [residual, *params])
    want_loss = loss(lambda r, *p: pre_oracle(r, *p, 4), post_oracle, params, residual)
    want = torch.autograd.grad(want_loss, [residual, *params])
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for g, w, name in zip(got, want, ["residual", "fn", "scale", "base"]):
        torch.testing.assert_close(g.float(), w.float(), atol=tol * max(1.0, float(w.abs().max())), rtol=tol,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backward", ["unroll", "recompute", "implicit"])
def test_sinkhorn_backward_option(backward):
    torch.manual_seed(0)
    hc = sp.HyperConnections(4, 8, sinkhorn_backward=backward)
    residual = torch.randn(5, 4, 8)
    x, ctx = hc.pre(residual)
    hc.post(x, residual, ctx).square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in hc.parameters())


def test_wrap_runs_pre_layer_post():
    hc, residual = make(n=4, C=16)
    layer = nn.Linear(16, 16)
    wrapped = hc.wrap(layer)
    x, ctx = hc.pre(residual)
    torch.testing.assert_close(wrapped(residual), hc.post(layer(x), residual, ctx))
    assert set(dict(wrapped.named_parameters())) == {"hc.fn", "hc.scale", "hc.base", "layer.weight", "layer.bias"}


def test_compile_fullgraph():
    hc, residual = make(n=4, C=16)
    layer = nn.Linear(16, 16)
    wrapped = hc.wrap(layer)
    compiled = torch.compile(wrapped, fullgraph=True)
    r1, r2 = residual.clone().requires_grad_(), residual.clone().requires_grad_()
    out = compiled(r1)
    torch.testing.assert_close(out, wrapped(r2), atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    got = [r1.grad] + [p.grad.clone() for p in wrapped.parameters()]
    wrapped.zero_grad()
    wrapped(r2).square().sum().backward()
    want = [r2.grad] + [p.grad for p in wrapped.parameters()]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def test_shape_errors():
    hc = sp.HyperConnections(4, 8)
    with pytest.raises(ValueError, match=r"residual must have shape \(\*, n, C\) = \(\*, 4, 8\)"):
        hc.pre(torch.randn(2, 3, 8))
    x, ctx = hc.pre(torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match="layer_output must have shape"):
        hc.post(torch.randn(2, 7), torch.randn(2, 4, 8), ctx)


@pytest.mark.parametrize("kwargs, match", [
    (dict(sinkhorn_iters=0), "sinkhorn_iters must be an int >= 1"),
    (dict(sinkhorn_eps=-1.0), "sinkhorn_eps must be a finite float >= 0"),
    (dict(rms_eps=float("nan")), "rms_eps must be a finite float >= 0"),
    (dict(sinkhorn_backward="adjoint"), "sinkhorn_backward must be one of"),
])
def test_constructor_errors_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sp.HyperConnections(4, 8, **kwargs)


# The fused pre-mix (torch.ops.simplex_param.hc_pre, CPU kernels): against
# the composite, which the fallback and other devices run, and against the
# formula in float64.
needs_kernel = pytest.mark.skipif(not sp.hyper_connections._HAS_KERNEL, reason="the compiled CPU kernel")


def fused(residual, hc):
    return torch.ops.simplex_param.hc_pre(residual, hc.fn, hc.scale, hc.base, hc.rms_eps, hc.pre_eps)


@needs_kernel
def test_pre_runs_the_fused_op_on_cpu():
    hc, residual = make()
    x, _ = hc.pre(residual.requires_grad_())
    assert "hc_pre" in x.grad_fn.name()


@needs_kernel
@pytest.mark.parametrize("n, C, tokens", [(1, 5, 3), (2, 16, 33), (4, 37, 21), (3, 256, 17), (5, 8, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_fused_op_matches_the_formula(n, C, tokens, dtype):
    """Column tails (n C not a multiple of the lanes), token blocks cut
    short, one stream: outputs and every gradient within the dtype's
    tolerance of the composite run in float64."""
    torch.manual_seed(n * 1000 + C)
    hc = sp.HyperConnections(n, C)
    with torch.no_grad():
        hc.scale.copy_(torch.rand(3) + 0.5)
        hc.base.copy_(torch.randn(n * (n + 2)))
    residual = torch.randn(tokens, n, C).to(dtype).requires_grad_()
    x, mixes, proj, rstd = fused(residual, hc)
    assert x.dtype == dtype and x.shape == (tokens, C)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert mixes.dtype == proj.dtype == rstd.dtype == acc and mixes.shape == (tokens, n * (n + 2))
    assert not proj.requires_grad and not rstd.requires_grad
    leaves = [residual.detach().double().requires_grad_(), *(p.detach().double().requires_grad_()
                                                            for p in hc.parameters())]
    want_x, want_mixes = sp.hyper_connections._pre_composite(*leaves, hc.rms_eps, hc.pre_eps)
    tol = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(mixes.double(), want_mixes, atol=tol * 10, rtol=tol * 10)
    torch.testing.assert_close(x.double(), want_x.to(dtype).double(), atol=tol * 4, rtol=tol * 4)
    gx, gm = torch.randn(x.shape).to(dtype), torch.randn(mixes.shape).to(acc)
    got = torch.autograd.grad([x, mixes], [residual, *hc.parameters()], [gx, gm])
    want = torch.autograd.grad([want_x, want_mixes], leaves, [gx.double(), gm.double()])
    for g, w, name in zip(got, want, ["residual", "fn", "scale", "base"]):
        t = tol if name == "residual" else max(tol, 2e-6)  # the parameters' gradients are float32
        torch.testing.assert_close(g.double(), w, atol=t * 10 * max(1.0, float(w.abs().max())), rtol=t * 10,
                                   msg=lambda m: f"{name}: {m}")


@needs_kernel
def test_fused_op_gradcheck_and_gradgradcheck():
    torch.manual_seed(1)
    n, C = 3, 5
    residual = torch.randn(4, n, C, dtype=torch.float64, requires_grad=True)
    fn = torch.randn(n * (n + 2), n * C, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(3, dtype=torch.float64, requires_grad=True)
    base = torch.randn(n * (n + 2), dtype=torch.float64, requires_grad=True)

    def f(*args):
        return torch.ops.simplex_param.hc_pre(*args, 1e-6, 1e-3)[:2]

    assert torch.autograd.gradcheck(f, (residual, fn, scale, base))
    assert torch.autograd.gradgradcheck(f, (residual, fn, scale, base))


@needs_kernel
def test_fused_op_opcheck():
    hc, residual = make(n=3, C=8)
    torch.library.opcheck(torch.ops.simplex_param.hc_pre.default,
                          (residual.requires_grad_(), hc.fn, hc.scale, hc.base, 1e-6, 1e-6))


@needs_kernel
def test_fused_op_same_bits_on_any_thread_count():
    hc, residual = make(n=4, C=300)
    residual = torch.randn(70, 4, 300).requires_grad_()
    g = torch.randn(70, 300)
    prev = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            x, mixes, _, _ = fused(residual, hc)
            runs.append((x, mixes, *torch.autograd.grad(x, [residual, *hc.parameters()], g)))
    finally:
        torch.set_num_threads(prev)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@needs_kernel
@pytest.mark.parametrize("args, exc, match", [
    (dict(fn=torch.zeros(24, 31)), ValueError, r"hc_pre: fn must have shape \[24, 32\]"),
    (dict(scale=torch.zeros(2)), ValueError, r"hc_pre: scale must have shape \[3\]"),
    (dict(base=torch.zeros(23)), ValueError, r"hc_pre: base must have shape \[24\]"),
    (dict(residual=torch.zeros(4, 0)), ValueError, r"hc_pre: residual must have shape \(\*, n, C\) with n >= 1"),
    (dict(residual=torch.zeros(2, 4, 8, dtype=torch.int32)), TypeError, "hc_pre: residual must be a floating"),
    (dict(rms_eps=-1.0), ValueError, "hc_pre: rms_eps must be a finite float >= 0"),
])
def test_fused_op_errors_name_the_argument(args, exc, match):
    call = dict(residual=torch.zeros(2, 4, 8), fn=torch.zeros(24, 32), scale=torch.zeros(3), base=torch.zeros(24),
                rms_eps=1e-6, pre_eps=1e-6)
    call.update(args)
    with pytest.raises(exc, match=match):
        torch.ops.simplex_param.hc_pre(*call.values())


@needs_kernel
def test_post_runs_the_fused_op_on_cpu():
    hc, residual = make()
    x, ctx = hc.pre(residual)
    out = hc.post(x.requires_grad_(), residual, ctx)
    assert "hc_post" in out.grad_fn.name()


def post_case(n, C, tokens, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return (torch.randn(tokens, C, generator=gen).to(dtype).requires_grad_(),
            torch.randn(tokens, n, C, generator=gen).to(dtype).requires_grad_(),
            torch.rand(tokens, n, generator=gen).to(acc).requires_grad_(),
            torch.rand(tokens, n, n, generator=gen).to(acc).requires_grad_())


@needs_kernel
@pytest.mark.parametrize("n, C, tokens", [(1, 5, 3), (2, 16, 33), (4, 37, 21), (9, 300, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_fused_post_matches_the_formula(n, C, tokens, dtype):
    """out_i = post_i F + sum_j H[j, i] r_j and its gradients (more than 8
    dot products per output gradient with n = 9; column tails), against the
    loop oracle in float64."""
    args = post_case(n, C, tokens, dtype)
    out = torch.ops.simplex_param.hc_post(*args)
    assert out.dtype == dtype and out.shape == args[1].shape
    leaves = [a.detach().double().requires_grad_() for a in args]
    want = post_oracle(*leaves)
    tol = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(out.double(), want.to(dtype).double(), atol=tol * 4, rtol=tol * 4)
    g = torch.randn(out.shape).to(dtype)
    got = torch.autograd.grad(out, args, g)
    wants = torch.autograd.grad(want, leaves, g.double())
    for a, b, name in zip(got, wants, ["layer_output", "residual", "post", "h"]):
        assert a.dtype == args[["layer_output", "residual", "post", "h"].index(name)].dtype
        torch.testing.assert_close(a.double(), b, atol=tol * 10 * max(1.0, float(b.abs().max())), rtol=tol * 10,
                                   msg=lambda m: f"{name}: {m}")


@needs_kernel
def test_fused_post_gradcheck_gradgradcheck_and_opcheck():
    args = post_case(3, 5, 4, torch.float64)
    assert torch.autograd.gradcheck(torch.ops.simplex_param.hc_post, args)
    assert torch.autograd.gradgradcheck(torch.ops.simplex_param.hc_post, args)
    torch.library.opcheck(torch.ops.simplex_param.hc_post.default, post_case(4, 8, 3, torch.float32))


@needs_kernel
def test_fused_post_same_bits_on_any_thread_count_and_as_mix():
    """Each output sums post_i F first, then H[j, i] r_j in order, as
    sp.mix does: the same bits as mix, forward, on 1 and 2 threads."""
    args = post_case(4, 300, 70, torch.float32)
    g = torch.randn(args[1].shape)
    prev = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = torch.ops.simplex_param.hc_post(*args)
            runs.append((out, *torch.autograd.grad(out, args, g)))
    finally:
        torch.set_num_threads(prev)
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    f, r, post, h = (a.detach() for a in args)
    assert torch.equal(runs[0][0], sp.mix(torch.cat([post.unsqueeze(-1), h.mT], -1), [f, *r.unbind(-2)]))


@needs_kernel
@pytest.mark.parametrize("change, exc, match", [
    (dict(layer_output=torch.zeros(2, 7)), ValueError, r"hc_post: layer_output must have shape \[2, 8\]"),
    (dict(layer_output=torch.zeros(2, 8, dtype=torch.float64)), TypeError, "hc_post: layer_output has dtype Double"),
    (dict(post=torch.zeros(2, 3)), ValueError, r"hc_post: post must have shape \[2, 4\]"),
    (dict(h=torch.zeros(2, 4, 3)), ValueError, r"hc_post: h must have shape \[2, 4, 4\]"),
    (dict(residual=torch.zeros(8)), ValueError, r"hc_post: residual must have shape \(\*, n, C\)"),
])
def test_fused_post_errors_name_the_argument(change, exc, match):
    call = dict(layer_output=torch.zeros(2, 8), residual=torch.zeros(2, 4, 8), post=torch.zeros(2, 4),
                h=torch.zeros(2, 4, 4))
    call.update(change)
    with pytest.raises(exc, match=match):
        torch.ops.simplex_param.hc_post(*call.values())


@needs_kernel
def test_backward_ops_errors_name_the_argument():
    r, fn, scale = torch.zeros(2, 4, 8), torch.zeros(24, 32), torch.zeros(3)
    mixes, proj, rstd = torch.zeros(2, 24), torch.zeros(2, 24), torch.zeros(2)
    bwd = torch.ops.simplex_param._hc_pre_backward
    with pytest.raises(ValueError, match=r"_hc_pre_backward: grad_x must have shape \[2, 8\]"):
        bwd(torch.zeros(2, 9), None, r, fn, scale, mixes, proj, rstd, 1e-6)
    with pytest.raises(ValueError, match=r"_hc_pre_backward: grad_mixes must have shape \[2, 24\]"):
        bwd(torch.zeros(2, 8), torch.zeros(2, 23), r, fn, scale, mixes, proj, rstd, 1e-6)
    with pytest.raises(TypeError, match="_hc_pre_backward: rstd must be a floating tensor"):
        bwd(torch.zeros(2, 8), None, r, fn, scale, mixes, proj, torch.zeros(2, dtype=torch.int64), 1e-6)
    with pytest.raises(ValueError, match=r"_hc_post_backward: grad must have shape \[2, 4, 8\]"):
        torch.ops.simplex_param._hc_post_backward(torch.zeros(2, 4, 7), torch.zeros(2, 8), r, torch.zeros(2, 4),
                                                  torch.zeros(2, 4, 4))
