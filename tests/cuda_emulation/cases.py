"""The cases of the CUDA kernels' check, and their oracle.

The same cases run on the emulation (HIP CPU runtime, `make cuda-emulate`)
and on a real GPU (`make gpu-check`); each is a call of the forward and one
of the backward of `weighted_sum`, `mix`, `grouped_weighted_sum` or
`sinkhorn`. Inputs come from a seeded CPU generator, so both machines see
the same bits. Sinkhorn's oracle and bounds are at SINKHORN_BOUNDS.

The oracle is the contraction's definition (csrc/contraction.h) in float64,
from the weights as the kernels see them (in the accumulation dtype): an
input of weight exactly 0 is not read, its gradient is exactly 0, and with
skip_zero_weights so is its weight's gradient. The tolerances are error
bounds of the kernels' order of arithmetic (docs/cuda.md):
  output:        K fused multiply-adds in k order: K u sum_k |w_k x_k|;
  input grads:   one product: u |w g|;
  weight grads:  a sum of depth at most D = 100 + row_len / 65536 (each
                 thread's run, then trees over the warp, the block and the
                 tiles): D u sum |g x|;
each plus the final rounding to the output dtype (its eps times the value,
and its smallest subnormal), u being the accumulation dtype's unit roundoff.
For mix (M outputs), each output is a contraction of the inputs, and each
input gradient one of the M output gradients (M fused multiply-adds:
M u sum_m |w g_m|).
"""
import itertools
from dataclasses import dataclass, field

import torch

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# 1; the backward's chunk (16) and one more; the forward's chunk (32) and one more.
KS = (1, 16, 17, 32, 33)
# One element; below a block (256 threads); not a multiple of any vector
# width; several backward tiles and several grid-stride turns.
LENGTHS = (1, 100, 1003, 20011)
# (weights require grad, which inputs require grad)
GRAD_PATTERNS = ((True, "all"), (True, "none"), (False, "alternate"), (True, "alternate"))


@dataclass
class Case:
    name: str
    grouped: bool
    weights: torch.Tensor            # (K,) or (*P, K); grouped: (G, K); mix: (M, K) or (*P, M, K)
    inputs: list                     # K tensors; grouped: G * K
    grads: list                      # the outputs' gradients (one, or one per group)
    weights_requires_grad: bool
    inputs_requires_grad: list
    skip_zero_weights: bool = False
    notes: dict = field(default_factory=dict)
    mix: bool = False

    def to(self, device):
        moved = dict(self.__dict__)
        moved["weights"] = _move(self.weights, device)
        moved["inputs"] = [_move(x, device) for x in self.inputs]
        moved["grads"] = [_move(g, device) for g in self.grads]
        return Case(**moved)


def _move(t, device):
    """`t` on `device` at the same offset into its buffer, so that its
    alignment, and with it the kernels' vector width, is the same there
    (Tensor.to would make an aligned copy)."""
    if t.device == torch.device(device):
        return t
    base = torch.empty(t.storage_offset() + t.numel(), dtype=t.dtype, device=device)
    return base[t.storage_offset():].view(t.shape).copy_(t)


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _values(gen, shape, dtype, offset=0):
    """Standard normal values of `shape` in `dtype`; with an offset, a view
    `offset` elements into a larger buffer (not 16-byte aligned)."""
    n = 1
    for s in shape:
        n *= s
    flat = torch.randn(n + offset, generator=gen, dtype=torch.float64).to(dtype)
    return flat[offset:].view(shape)


def _requires(pattern, count):
    if pattern == "all":
        return [True] * count
    if pattern == "none":
        return [False] * count
    return [k % 2 == 0 for k in range(count)]


def single_cases():
    for i, (dtype, K, L) in enumerate(itertools.product(DTYPES, KS, LENGTHS)):
        gen = torch.Generator().manual_seed(1000 + i)
        per_sample = i % 2 == 1
        zeros = (i // 2) % 2 == 1 and K > 1
        unaligned = i % 5 == 0
        w_rg, pattern = GRAD_PATTERNS[i % len(GRAD_PATTERNS)]
        shape = (3, L) if per_sample else (L,)
        w = torch.rand(shape[:-1] + (K,), generator=gen, dtype=torch.float64).to(acc_dtype(dtype))
        if zeros:  # every third weight 0; NaN in the inputs there, never read
            w[..., ::3] = 0
        xs = [_values(gen, shape, dtype, offset=1 if unaligned else 0) for _ in range(K)]
        for k in range(K):
            dead = (w[..., k] == 0).unsqueeze(-1).expand(shape)
            xs[k].masked_fill_(dead, float("nan"))  # in place: an unaligned view stays one
        grad = _values(gen, shape, dtype)
        yield Case(
            name=f"single/{str(dtype)[6:]}/K{K}/L{L}/{'per-sample' if per_sample else 'shared'}"
                 f"{'/zeros' if zeros else ''}{'/unaligned' if unaligned else ''}/w{int(w_rg)}-{pattern}"
                 f"/skip{int(zeros)}",
            grouped=False, weights=w, inputs=xs, grads=[grad], weights_requires_grad=w_rg,
            inputs_requires_grad=_requires(pattern, K),
            # skip with zeros: the weights' gradient there is 0 (NaN unread);
            # without zeros, skipping changes nothing and is checked as such.
            skip_zero_weights=zeros or i % 3 == 0,
        )


# (G, K, sizes of the groups' tensors cycled, dtypes cycled, frozen groups)
GROUPED = (
    (1, 1, (1003,), (torch.float32,), ()),
    (1, 3, (0,), (torch.float64,), ()),
    (2, 3, (20011, 7), (torch.float16, torch.float32), ()),
    (5, 2, ((4, 33), 0, 257, 8192, 8193), (torch.bfloat16,), (1,)),
    (7, 17, (100, 1, 3000), DTYPES, (0, 3)),
    (12, 4, (0, 64, 1000, (2, 3, 5)), (torch.float32, torch.float64), (2, 5, 6)),
    (50, 3, (1, 17, 256, 1025, 0), DTYPES, tuple(range(0, 50, 4))),
    (50, 1, (300,), (torch.float16,), ()),
)


def grouped_cases():
    for i, (G, K, sizes, dtypes, frozen) in enumerate(GROUPED):
        for w_rg in (True, False):
            gen = torch.Generator().manual_seed(5000 + 2 * i + w_rg)
            inputs, grads, rg = [], [], []
            for g in range(G):
                size = sizes[g % len(sizes)]
                shape = size if isinstance(size, tuple) else (size,)
                dtype = dtypes[g % len(dtypes)]
                unaligned = (g % 3 == 1)
                inputs += [_values(gen, shape, dtype, offset=1 if unaligned else 0) for _ in range(K)]
                grads.append(_values(gen, shape, dtype))
                rg += [g not in frozen] * K
            if not w_rg and not any(rg):
                continue
            weights = torch.rand(G, K, generator=gen, dtype=torch.float64).to(torch.float32)
            if G > 2:
                weights[1, 0] = 0  # a zero weight: the grouped backward reads its input
            yield Case(name=f"grouped/G{G}/K{K}/{'+'.join(str(d)[6:] for d in dtypes)}/w{int(w_rg)}",
                       grouped=True, weights=weights, inputs=inputs, grads=grads,
                       weights_requires_grad=w_rg, inputs_requires_grad=rg)


# mix: (weights shape, inputs shape, dtype): shared and per-row matrices,
# mHC's (tokens, n, n + 1), more outputs than a launch writes (8) and more
# inputs than it reads (32), unaligned lengths (no vectors) and backward
# tiles cut into pieces.
MIX = (
    ((3, 5), (20011,), torch.float32),
    ((64, 4, 5), (64, 256), torch.bfloat16),
    ((7, 2, 3), (7, 1003), torch.float16),
    ((2, 9, 33), (2, 640), torch.float32),
    ((5, 1, 4), (5, 100), torch.float64),
    ((3, 3, 2), (3, 9000), torch.float32),
)


def mix_cases():
    for i, (wshape, shape, dtype) in enumerate(MIX):
        gen = torch.Generator().manual_seed(7000 + i)
        w = torch.rand(wshape, generator=gen, dtype=torch.float64).to(acc_dtype(dtype))
        w[..., 0, -1] = 0  # a zero weight of output 0; its input is still read by the others
        K, M = wshape[-1], wshape[-2]
        xs = [_values(gen, shape, dtype, offset=i % 2) for _ in range(K)]
        out_shape = shape[:len(wshape) - 2] + (M,) + shape[len(wshape) - 2:]
        w_rg, pattern = GRAD_PATTERNS[i % len(GRAD_PATTERNS)]
        yield Case(name=f"mix/{str(dtype)[6:]}/M{M}/K{K}/{'x'.join(map(str, shape))}/w{int(w_rg)}-{pattern}",
                   grouped=False, mix=True, weights=w, inputs=xs, grads=[_values(gen, out_shape, dtype)],
                   weights_requires_grad=w_rg, inputs_requires_grad=_requires(pattern, K))


def mix_strided_cases():
    """mHC's post-mix as HyperConnections.post calls it: the layer output and
    the n streams of a residual (tokens, n, C) as slices, read in place
    (row skips), and an input expanded over the tokens (rows 0 apart)."""
    for i, (T, n, C, dtype, w_rg) in enumerate(((33, 4, 64, torch.float32, True), (8, 4, 1003, torch.bfloat16, False),
                                                (5, 2, 12, torch.float64, True))):
        gen = torch.Generator().manual_seed(7500 + i)
        residual = _values(gen, (T, n, C), dtype)
        x = _values(gen, (C,), dtype).expand(T, C) if i == 2 else _values(gen, (T, C), dtype)
        w = torch.rand(T, n, n + 1, generator=gen, dtype=torch.float64).to(acc_dtype(dtype))
        yield Case(name=f"mix-strided/{str(dtype)[6:]}/T{T}/n{n}/C{C}/w{int(w_rg)}", grouped=False, mix=True,
                   weights=w, inputs=[x, *residual.unbind(1)], grads=[_values(gen, (T, n, C), dtype)],
                   weights_requires_grad=w_rg, inputs_requires_grad=[True] * (n + 1))



@dataclass
class SinkhornCase:
    """A call of sinkhorn and one of _sinkhorn_backward on (*P, n, n) logits."""
    name: str
    logits: torch.Tensor
    grad: torch.Tensor
    iters: int
    eps: float

    def to(self, device):
        return SinkhornCase(self.name, _move(self.logits, device), _move(self.grad, device), self.iters, self.eps)


# n: 1, small ones, one past a power of two, the largest with a kernel (16),
# and one past it (17: the composite); matrices: one, and more than a block
# of 256 threads, which (with the emulation's 64 KiB tape) takes several
# backward launches; 1 and 20 iterations.
SINKHORN_SIZES = (1, 2, 3, 4, 5, 16, 17)
SINKHORN_COUNTS = (1, 300)
SINKHORN_ITERS = (1, 20)


def sinkhorn_cases():
    for i, (dtype, n, count, iters) in enumerate(
            itertools.product(DTYPES, SINKHORN_SIZES, SINKHORN_COUNTS, SINKHORN_ITERS)):
        gen = torch.Generator().manual_seed(9000 + i)
        shape = (count, n, n) if i % 3 else (2, count, n, n)  # a batch of two dimensions too
        logits = (2 * _values(gen, shape, torch.float64)).to(dtype)
        grad = _values(gen, shape, dtype)
        yield SinkhornCase(f"sinkhorn/{str(dtype)[6:]}/n{n}/B{count}/it{iters}", logits, grad, iters, 1e-6)
    gen = torch.Generator().manual_seed(9999)
    # Logits far apart (the row maximum must be subtracted), eps = 0, and a
    # non-contiguous view (the op makes it contiguous).
    big = torch.tensor([[1000.0, -1000.0, 0.0], [0.0, 1.0, 2.0], [5.0, 5.0, 5.0]]).expand(40, 3, 3).clone()
    yield SinkhornCase("sinkhorn/float32/far-apart/eps0", big, _values(gen, (40, 3, 3), torch.float32), 20, 0.0)
    x = _values(gen, (70, 4, 4), torch.float32).mT
    yield SinkhornCase("sinkhorn/float32/transposed", x, _values(gen, (70, 4, 4), torch.float32), 5, 1e-6)


def all_cases():
    return (list(single_cases()) + list(grouped_cases()) + list(mix_cases()) + list(mix_strided_cases())
            + list(sinkhorn_cases()))


def run(case, ops):
    """Forward and backward of `case` through `ops` (torch.ops.simplex_param
    or torch.ops.simplex_param_emulated): a dict of named output tensors."""
    if isinstance(case, SinkhornCase):
        out = ops.sinkhorn(case.logits, case.iters, case.eps)
        grad = ops._sinkhorn_backward(case.grad, case.logits, case.iters, case.eps)
        return {"out": out.detach().cpu(), "grad_logits": grad.detach().cpu()}
    if case.mix:
        outs = [ops.mix(case.weights, case.inputs)]
        grad_w, grad_x = ops._mix_backward(
            case.grads[0], case.weights, case.inputs if case.weights_requires_grad else [],
            case.weights_requires_grad, case.inputs_requires_grad)
        wanted = [k for k, r in enumerate(case.inputs_requires_grad) if r]
        grad_x = [grad_x[k] for k in wanted]
    elif case.grouped:
        outs = ops.grouped_weighted_sum(case.weights, case.inputs)
        grad_w, grad_x = ops._grouped_weighted_sum_backward(
            case.grads, case.weights, case.inputs, case.weights_requires_grad, case.inputs_requires_grad)
        # one gradient per input that requires grad, in order
        wanted = [k for k, r in enumerate(case.inputs_requires_grad) if r]
    else:
        outs = [ops.weighted_sum(case.weights, case.inputs)]
        grad_w, grad_x = ops._weighted_sum_backward(
            case.grads[0], case.weights, case.inputs if case.weights_requires_grad else [],
            case.weights_requires_grad, case.inputs_requires_grad, case.skip_zero_weights)
        wanted = [k for k, r in enumerate(case.inputs_requires_grad) if r]
        grad_x = [grad_x[k] for k in wanted]
    result = {f"out{j}": o for j, o in enumerate(outs)}
    if case.weights_requires_grad:
        result["grad_w"] = grad_w
    result.update({f"grad_x{k}": g for k, g in zip(wanted, grad_x)})
    return {k: v.detach().cpu() for k, v in result.items()}


def _eps(dtype):
    return torch.finfo(dtype).eps


def _tiny(dtype):
    return torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps


def _contraction(w, xs, grad, skip, dtype, row_len):
    """One contraction's oracle in float64: (out, grad_w, grad_x per k) each
    as (value, tolerance). w: rows x K (accumulation dtype), xs and grad of
    the inputs' shape; row r is the r-th slice along the weights' prefix."""
    acc = acc_dtype(dtype)
    u = _eps(acc) / 2
    rows, K = w.shape
    wd = w.double()
    x = torch.stack([t.double().reshape(rows, -1) for t in xs]) if xs else None  # K, rows, L
    g = grad.double().reshape(rows, -1)
    live = (wd != 0).T.unsqueeze(-1)  # K, rows, 1
    out = tol_out = None
    if x is not None:
        terms = torch.where(live, wd.T.unsqueeze(-1) * x, torch.zeros((), dtype=torch.float64))
        out = terms.sum(0)
        tol_out = K * u * terms.abs().sum(0) + _eps(dtype) * out.abs() + _tiny(dtype)
        prods = g.unsqueeze(0) * x
        gw = prods.sum(-1).T  # rows, K
        depth = 100 + row_len // 65536
        tol_gw = depth * u * prods.abs().sum(-1).T
        if skip:
            gw = torch.where(wd != 0, gw, torch.zeros((), dtype=torch.float64))
            tol_gw = torch.where(wd != 0, tol_gw, torch.zeros((), dtype=torch.float64))
    else:
        gw = tol_gw = None
    gx = torch.where(live, wd.T.unsqueeze(-1) * g.unsqueeze(0), torch.zeros((), dtype=torch.float64))  # K, rows, L
    tol_gx = u * gx.abs() + _eps(dtype) * gx.abs() + _tiny(dtype)
    return (out, tol_out), (gw, tol_gw), (gx, tol_gx)


def _mix_oracle(case):
    """mix: each output m the contraction of the inputs with the weights' row
    m, each input gradient k the contraction of the M output gradients with
    column k."""
    w, xs, g = case.weights, case.inputs, case.grads[0]
    dtype, shape = xs[0].dtype, xs[0].shape
    K, M, lead = w.shape[-1], w.shape[-2], w.dim() - 2
    rows = w.reshape(-1, M, K)
    gs = list(g.unbind(lead))
    outs, gws, tol_gws = [], [], []
    for m in range(M):
        (out, tol), (gw, tol_gw), _ = _contraction(rows[:, m], xs, gs[m], False, dtype, xs[0].numel() // rows.shape[0])
        outs.append((out.reshape(shape), tol.reshape(shape)))
        gws.append(gw)
        tol_gws.append(tol_gw)
    expected = {"out0": (torch.stack([o for o, _ in outs], lead), torch.stack([t for _, t in outs], lead))}
    if case.weights_requires_grad:
        expected["grad_w"] = (torch.stack(gws, 1).reshape(w.shape), torch.stack(tol_gws, 1).reshape(w.shape))
    for k, r in enumerate(case.inputs_requires_grad):
        if r:
            (gx, tol), _, _ = _contraction(rows[:, :, k], gs, gs[0], False, dtype, xs[0].numel() // rows.shape[0])
            expected[f"grad_x{k}"] = (gx.reshape(shape), tol.reshape(shape))
    return expected


def _sinkhorn(x, iters, eps):
    """mHC's Sinkhorn (simplex_param/sinkhorn.py's definition), written out."""
    x = x.softmax(-1) + eps
    x = x / (x.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        x = x / (x.sum(-1, keepdim=True) + eps)
        x = x / (x.sum(-2, keepdim=True) + eps)
    return x


# The Sinkhorn kernels' bounds, in the accumulation dtype: the issue's
# targets (the forward within 1e-6 in float32, 1e-12 in float64), which the
# CPU kernels, in the same order of operations, meet with a margin (1.5e-7
# measured); gradients within 2e-6 (1e-12) of the largest entry of the
# matrix's upstream gradient or of its own gradient, whichever is larger:
# the backward subtracts sums of the size of the upstream gradient, and a
# small matrix's gradient can be much smaller than that (n = 2: 1/200 of it,
# with errors of 5e-6 of its own largest entry). Each plus the rounding to
# the logits' dtype.
SINKHORN_BOUNDS = {torch.float32: (1e-6, 2e-6), torch.float64: (1e-12, 1e-12)}


def _sinkhorn_oracle(case):
    dtype = case.logits.dtype
    x = case.logits.double().requires_grad_()
    y = _sinkhorn(x, case.iters, case.eps)
    g = torch.autograd.grad(y, x, case.grad.double())[0]
    out_bound, grad_bound = SINKHORN_BOUNDS[acc_dtype(dtype)]
    y = y.detach()
    scale = torch.maximum(g.abs().amax((-2, -1), keepdim=True),
                          case.grad.double().abs().amax((-2, -1), keepdim=True))
    return {
        "out": (y, out_bound + _eps(dtype) * y.abs() + _tiny(dtype)),
        "grad_logits": (g, grad_bound * scale + _eps(dtype) * g.abs() + _tiny(dtype)),
    }


def oracle(case):
    """The expected outputs of `case` as {name: (value, tolerance)} in float64."""
    if isinstance(case, SinkhornCase):
        return _sinkhorn_oracle(case)
    if case.mix:
        return _mix_oracle(case)
    expected = {}
    if case.grouped:
        G, K = case.weights.shape
        gw_all, tol_all = torch.zeros(G, K, dtype=torch.float64), torch.zeros(G, K, dtype=torch.float64)
        wanted = [k for k, r in enumerate(case.inputs_requires_grad) if r]
        gx_of = {}
        for g in range(G):
            xs = case.inputs[g * K:(g + 1) * K]
            dtype, shape = xs[0].dtype, xs[0].shape
            w = case.weights[g].to(acc_dtype(dtype)).reshape(1, K)
            (out, tol), (gw, tol_gw), (gx, tol_gx) = _contraction(w, xs, case.grads[g], False, dtype, xs[0].numel())
            expected[f"out{g}"] = (out.reshape(shape), tol.reshape(shape))
            gw_all[g], tol_all[g] = gw[0], tol_gw[0]
            for k in range(K):
                gx_of[g * K + k] = (gx[k].reshape(shape), tol_gx[k].reshape(shape))
        if case.weights_requires_grad:  # returned in the weights' dtype
            expected["grad_w"] = (gw_all, tol_all + _eps(case.weights.dtype) * gw_all.abs())
        expected.update({f"grad_x{k}": gx_of[k] for k in wanted})
        return expected
    xs, dtype, shape = case.inputs, case.inputs[0].dtype, case.inputs[0].shape
    K = len(xs)
    w = case.weights.reshape(-1, K)
    (out, tol), (gw, tol_gw), (gx, tol_gx) = _contraction(
        w, xs, case.grads[0], case.skip_zero_weights, dtype, xs[0].numel() // w.shape[0])
    expected["out0"] = (out.reshape(shape), tol.reshape(shape))
    if case.weights_requires_grad:
        expected["grad_w"] = (gw.reshape(case.weights.shape), tol_gw.reshape(case.weights.shape))
    for k, r in enumerate(case.inputs_requires_grad):
        if r:
            expected[f"grad_x{k}"] = (gx[k].reshape(shape), tol_gx[k].reshape(shape))
    return expected


def mismatches(got, expected):
    """Names of the outputs of `got` outside the oracle's tolerance (NaN
    where NaN is expected), with the worst error of each; also missing or
    extra outputs and wrong shapes."""
    bad = []
    for name in sorted(set(got) | set(expected)):
        if name not in got or name not in expected:
            bad.append(f"{name}: {'missing' if name not in got else 'unexpected'}")
            continue
        value, tol = expected[name]
        g = got[name]
        if g.shape != value.shape:
            bad.append(f"{name}: shape {tuple(g.shape)}, expected {tuple(value.shape)}")
            continue
        gd = g.double()
        nan_expected = value.isnan()
        wrong_nan = (gd.isnan() != nan_expected)
        err = (gd - value).abs()
        over = torch.where(nan_expected, torch.zeros_like(err), err - tol) > 0
        over |= wrong_nan | (err.isnan() & ~nan_expected)
        if over.any():
            i = int(over.flatten().nonzero()[0])
            bad.append(f"{name}: {int(over.sum())} of {over.numel()} elements, first at {i}: "
                       f"got {gd.flatten()[i].item()!r}, expected {value.flatten()[i].item()!r} "
                       f"within {tol.flatten()[i].item():.3g}")
    return bad
