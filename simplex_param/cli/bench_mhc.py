r"""The hyper-connection cases of ``python -m simplex_param bench`` (mHC,
``docs/hyper_connections.md``), with n = 4 streams:

- ``sinkhorn``: :func:`~simplex_param.sinkhorn` of 32768 ``4 x 4`` logits, 20 iterations;
- ``mhc-pre``: :meth:`~simplex_param.HyperConnections.pre` of a ``(4096, 4, 2048)`` residual;
- ``mhc-post``: :meth:`~simplex_param.HyperConnections.post` of the same residual and a ``(4096, 2048)`` layer output.

Contenders:

- ``ours``: the library's function (``sinkhorn``'s default ``"recompute"``
  backward): for ``sinkhorn``, the fused op ``simplex_param::sinkhorn``
  where the compiled extension has a kernel for the device, else the
  composite below;
- ``composite`` (``sinkhorn`` only): the library's pure-PyTorch path of
  ``sinkhorn``, the fallback (``"recompute"``: its ``autograd.Function``);
- ``eager``: the reference written as TileLang's ``examples/deepseek_mhc``
  references are (``sinkhorn_normalize_ref``, ``mhc_pre_ref``, ``mhc_post_ref``);
- ``compile``: ``torch.compile`` of that reference.

In forward+backward the gradient of every floating input is taken (the
logits; the residual and ``fn``, ``scale``, ``base``; the layer output, the
residual, ``post`` and ``H``). The floor moves the bytes the big tensors must:
forward, the inputs read once and the output written once; backward, the
gradient read, the inputs read again, their gradients written.
"""
import importlib
import time

import torch

from simplex_param import HyperConnections, sinkhorn

from .timing import median_times, peak_extra_bytes, sync

MHC_SETS = ("sinkhorn", "mhc-pre", "mhc-post")
MHC_CONTENDERS = ("ours", "composite", "eager", "compile")
N_STREAMS = 4
SIZES = {"sinkhorn": dict(tokens=32768), "mhc-pre": dict(tokens=4096, C=2048), "mhc-post": dict(tokens=4096, C=2048)}
ITERS = 20
EPS = 1e-6


def _sinkhorn_ref(x, iters=ITERS, eps=EPS):
    x = x.softmax(-1) + eps
    x = x / (x.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        x = x / (x.sum(-1, keepdim=True) + eps)
        x = x / (x.sum(-2, keepdim=True) + eps)
    return x


def _sinkhorn_eager(x):
    return _sinkhorn_ref(x.float()).to(x.dtype)


def _sinkhorn_composite(x):
    """sp.sinkhorn's pure-PyTorch path (the fallback), "recompute" backward."""
    module = importlib.import_module("simplex_param.sinkhorn")
    xf = x.float()
    if not xf.requires_grad:
        return module._forward(xf, ITERS, EPS).to(x.dtype)
    return module._Recompute.apply(xf, ITERS, EPS).to(x.dtype)


def _pre_eager(residual, fn, scale, base, hc):
    n = residual.shape[-2]
    r = residual.flatten(-2).float()
    mixes = r @ fn.T * (r.square().sum(-1, keepdim=True) / fn.shape[-1] + hc.rms_eps).rsqrt()
    mixes = mixes * torch.cat([scale[0].expand(n), scale[1].expand(n), scale[2].expand(n * n)]) + base
    pre = mixes[..., :n].sigmoid().unsqueeze(-1) + hc.pre_eps
    post = mixes[..., n:2 * n].sigmoid() * hc.post_mult
    h = _sinkhorn_ref(mixes[..., 2 * n:].unflatten(-1, (n, n)), hc.sinkhorn_iters, hc.sinkhorn_eps)
    return (residual * pre).sum(-2).to(residual.dtype), post, h


def _post_eager(x, residual, post, h):
    return (x.float().unsqueeze(-2) * post.unsqueeze(-1) + h.mT @ residual.float()).to(residual.dtype)


def _make(name, dtype, device, need_grad, gen, sizes):
    """(function, args, list of leaves, grad of the output or None, moved elements, element size)."""
    n = N_STREAMS
    if name == "sinkhorn":
        t = sizes["tokens"]
        x = torch.randn(t, n, n, generator=gen).to(device, dtype).requires_grad_(need_grad)
        out_numel = x.numel()
        moved = 2 * x.numel() + (3 * x.numel() if need_grad else 0)
        fns = {"ours": lambda x: sinkhorn(x, iters=ITERS, eps=EPS), "composite": _sinkhorn_composite,
               "eager": _sinkhorn_eager}
        grad = torch.randn(t, n, n, generator=gen).to(device, dtype) if need_grad else None
        return fns, (x,), [x], grad, moved
    t, C = sizes["tokens"], sizes["C"]
    hc = HyperConnections(n, C, device=device)
    with torch.no_grad():
        hc.scale.copy_(torch.rand(3, generator=gen) + 0.5)
        hc.base.copy_(torch.randn(n * (n + 2), generator=gen))
    residual = torch.randn(t, n, C, generator=gen).to(device, dtype).requires_grad_(need_grad)
    if name == "mhc-pre":
        for p in hc.parameters():
            p.requires_grad_(need_grad)
        fns = {
            "ours": lambda r: (lambda x, ctx: (x, ctx.post, ctx.h))(*hc.pre(r)),
            "eager": lambda r: _pre_eager(r, hc.fn, hc.scale, hc.base, hc),
        }
        # forward: residual read, layer input written; backward: its grad read, residual read, grad written
        moved = (n * C + C) * t + ((C + 2 * n * C) * t if need_grad else 0)
        grad = [torch.randn(t, C, generator=gen).to(device, dtype),
                torch.randn(t, n, generator=gen).to(device), torch.randn(t, n, n, generator=gen).to(device)]
        return fns, (residual,), [residual, *hc.parameters()], grad if need_grad else None, moved
    with torch.no_grad():
        _, ctx = hc.pre(residual)
    post = ctx.post.clone().requires_grad_(need_grad)
    h = ctx.h.clone().requires_grad_(need_grad)
    x = torch.randn(t, C, generator=gen).to(device, dtype).requires_grad_(need_grad)
    fns = {
        "ours": lambda x, r, post, h: hc.post(x, r, type(ctx)(post, h)),
        "eager": _post_eager,
    }
    # forward: x and residual read, new residual written; backward: its grad read, x and residual read,
    # their grads written
    moved = (C + 2 * n * C) * t + ((2 * n * C + 2 * C + n * C) * t if need_grad else 0)
    grad = torch.randn(t, n, C, generator=gen).to(device, dtype) if need_grad else None
    return fns, (x, residual, post, h), [x, residual, post, h], grad, moved


def _step(fn, args, leaves, grad):
    if grad is None:
        return lambda: fn(*args)

    def step():
        out = fn(*args)
        outs = list(out) if isinstance(out, tuple) else [out]
        grads = grad if isinstance(grad, list) else [grad]
        return torch.autograd.grad(outs, leaves, grads)
    return step


def run_mhc(name, dtype, mode, contenders, repeats, device, target_s, log=None, sizes=None):
    """Times `contenders` and the floor on one mHC case; returns a result dict.
    `sizes` overrides the case's size (tokens, C)."""
    sizes = dict(SIZES[name], **(sizes or {}))
    gen = torch.Generator().manual_seed(0)
    need_grad = mode != "fwd"
    fns, args, leaves, grad, moved = _make(name, dtype, device, need_grad, gen, sizes)
    element = args[0].element_size()
    moved_bytes = moved * element
    src = torch.ones(max(moved_bytes // 2, 1), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    steps = {"floor": lambda: dst.copy_(src)}
    compile_s = None
    for c in contenders:
        if c == "compile":
            torch._dynamo.reset()
            step = _step(torch.compile(fns["eager"], dynamic=False), args, leaves, grad)
            t0 = time.perf_counter()
            step()
            sync(device)
            compile_s = time.perf_counter() - t0
        elif c in fns:
            step = _step(fns[c], args, leaves, grad)
        elif c in MHC_CONTENDERS:
            continue  # not a contender of this case (composite: sinkhorn only)
        else:
            raise ValueError(f"unknown contender {c!r}")
        steps[c] = step
    times = median_times(steps, repeats, device, target_s)
    del src, dst
    steps.pop("floor")
    result = {
        "case": name, "n": N_STREAMS, **sizes, "dtype": str(dtype).replace("torch.", ""), "mode": mode,
        "moved_bytes": moved_bytes, "floor_s": times["floor"], "contenders": {},
    }
    for c, step in steps.items():
        result["contenders"][c] = {
            "time_s": times[c],
            "ratio": times[c] / times["floor"],
            "peak_bytes": peak_extra_bytes(step, device),
        }
        if c == "compile":
            result["contenders"][c]["compile_s"] = compile_s
    if log:
        cols = "".join(f" {c:>9} {e['time_s'] * 1e3:>8.2f} ms {e['ratio']:>6.2f}x {e['peak_bytes'] / 2**20:>7.1f} MiB"
                       for c, e in result["contenders"].items())
        log(f"{name:<10}{sizes['tokens']:>7} {result['dtype']:<9}{mode:<8}{times['floor'] * 1e3:>8.2f} ms{cols}")
    return result


def header():
    return (f"\n{'mHC case':<10}{'tokens':>7} {'dtype':<9}{'mode':<8}{'floor':>11}"
            "   contender, time, ratio to floor, peak extra memory")
