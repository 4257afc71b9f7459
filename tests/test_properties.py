"""Property-based tests: the fused ops against the reference evaluated in
float64, over drawn K, shapes, layouts, dtypes, temperatures and logits.

The comparison is the one docs/numerics.md states: each value may differ from
the float64 result by ``atol + rtol * (|exact| + scale)``, with (rtol, atol)
from conftest.TOLERANCES and ``scale`` the sum of absolute values of the terms
that make it, plus the effect of rounding ``logits / T`` in the accumulation
dtype, which for huge ``|logits / T|`` moves the weights by a bounded factor.
Bounded and deterministic: a fixed number of examples, derandomized.
"""
import math
import os
import re

import pytest
import torch

pytest.importorskip("hypothesis", reason="the property tests need hypothesis (requirements-dev.txt)")
from hypothesis import HealthCheck, given, settings, strategies as st

import simplex_param as sp
from simplex_param import reference

from conftest import DTYPES, TOLERANCES

SETTINGS = settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
LAYOUTS = ["contiguous", "transposed", "sliced", "expanded", "channels_last"]


def make_input(shape, dtype, layout, gen):
    """A tensor of `shape` and `dtype` in `layout` (where the shape allows it),
    values drawn from `gen`. Returns (leaf, view): gradients flow to `view`."""
    n = len(shape)
    if layout == "transposed" and n >= 2:
        base = torch.randn((*shape[:-2], shape[-1], shape[-2]), generator=gen, dtype=torch.float64)
        make = lambda b: b.transpose(-1, -2)  # noqa: E731
    elif layout == "sliced" and n >= 1:
        base = torch.randn((*shape[:-1], 2 * shape[-1] + 1), generator=gen, dtype=torch.float64)
        make = lambda b: b[..., 1::2]  # noqa: E731
    elif layout == "expanded" and n >= 1:
        base = torch.randn((1, *shape[1:]), generator=gen, dtype=torch.float64)
        make = lambda b: b.expand(*shape)  # noqa: E731
    elif layout == "channels_last" and n == 4:
        base = torch.randn(tuple(shape), generator=gen, dtype=torch.float64)
        make = lambda b: b.contiguous(memory_format=torch.channels_last)  # noqa: E731
    else:
        base = torch.randn(tuple(shape), generator=gen, dtype=torch.float64)
        make = lambda b: b  # noqa: E731
    leaf = base.to(dtype).requires_grad_()
    view = make(leaf)
    assert view.shape == tuple(shape)
    return leaf, view


def weight_perturbation(z, eps):
    """Bound on |p'_k - p_k| where p = softmax(z) and p' the softmax of z with
    each finite entry off by at most ``eps * 4 * |z_j|`` (rounding of logits,
    temperature and quotient in the accumulation dtype): the extreme cases
    raise z_k and lower every other entry, or the reverse."""
    e = torch.where(torch.isfinite(z), 4 * eps * z.abs(), torch.zeros_like(z))
    p = torch.softmax(z, 0)
    K = z.numel()
    hi = torch.empty_like(z)
    lo = torch.empty_like(z)
    eye = torch.eye(K, dtype=torch.bool)
    for k in range(K):
        up = torch.where(eye[k], z + e, z - e)
        down = torch.where(eye[k], z - e, z + e)
        hi[k] = torch.softmax(up, 0)[k]
        lo[k] = torch.softmax(down, 0)[k]
    return torch.maximum(hi - p, p - lo).nan_to_num(0.0)


def check_close(name, got, want, bound):
    """|got - want| <= bound elementwise, NaN exactly where expected. Values
    beyond half the range of got's dtype need only overflow the right way."""
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    fmax = torch.finfo(got.dtype).max
    got = got.double()
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan), f"{name}: NaN pattern differs"
    huge = want.abs() > fmax / 2
    assert (got[huge].sign() == want[huge].sign()).all() and (got[huge].abs() > fmax / 4).all(), name
    keep = ~nan & ~huge
    err = (got - want).abs()[keep]
    bound = bound.expand(want.shape)[keep]
    bad = ~(err <= bound)
    assert not bad.any(), (
        f"{name}: {int(bad.sum())} values off; worst error {err[bad].max().item():.3g} "
        f"against a bound of {bound[bad][err[bad].argmax()].item():.3g}"
    )


@st.composite
def cases(draw, softmax):
    K = draw(st.integers(1, 64))
    ndim = draw(st.integers(0, 4))
    shape = draw(st.lists(st.integers(0, 4), min_size=ndim, max_size=ndim))
    dtype = draw(st.sampled_from(DTYPES))
    wdtype = draw(st.sampled_from(DTYPES))
    same_layout = draw(st.booleans())
    layouts = [draw(st.sampled_from(LAYOUTS))] * K if same_layout else [
        draw(st.sampled_from(LAYOUTS)) for _ in range(K)
    ]
    if softmax:
        kinds = st.sampled_from(["normal", "normal", "large", "neg_inf"])
        temperature = 10.0 ** draw(st.floats(-3, 3))
    else:
        kinds = st.sampled_from(["normal", "large"])
        temperature = 1.0
    values = []
    for _ in range(K):
        kind = draw(kinds)
        if kind == "normal":
            values.append(draw(st.floats(-10, 10)))
        elif kind == "large":
            values.append(draw(st.sampled_from([1e4, -1e4, 5e3, -3e3, 1e3])))
        else:
            values.append(-math.inf)
    # Shared (K,) weights, or one row per element of a leading prefix of the
    # shape: each row a permutation of the drawn values plus a small shift.
    rows = draw(st.integers(0, len(shape)))
    seed = draw(st.integers(0, 2**31 - 1))
    weights = torch.tensor(values, dtype=torch.float64)
    if rows:
        gen = torch.Generator().manual_seed(seed + 1)
        prefix = shape[:rows]
        count = math.prod(prefix)
        perms = torch.stack([torch.randperm(K, generator=gen) for _ in range(count)]) if count else \
            torch.zeros(0, K, dtype=torch.long)
        shift = torch.rand(count, K, generator=gen, dtype=torch.float64) - 0.5
        weights = (weights[perms] + shift).reshape(*prefix, K)
    return {
        "K": K,
        "shape": shape,
        "dtype": dtype,
        "weights": weights.to(wdtype),
        "layouts": layouts,
        "temperature": temperature,
        "stacked": draw(st.booleans()),
        "weights_grad": draw(st.booleans()),
        "inputs_grad": [draw(st.booleans()) for _ in range(K)],
        "seed": seed,
    }


def row_perturbation(z, eps):
    """weight_perturbation applied to every row of z (..., K)."""
    flat = z.reshape(-1, z.shape[-1])
    return torch.stack([weight_perturbation(r, eps) for r in flat]).reshape(z.shape) if flat.shape[0] else \
        torch.zeros_like(z)


def run_case(case, softmax):
    gen = torch.Generator().manual_seed(case["seed"])
    dtype, K, T = case["dtype"], case["K"], case["temperature"]
    if case["stacked"]:
        # One (K, ...) tensor, itself in the first drawn layout.
        _, arg = make_input([K, *case["shape"]], dtype, case["layouts"][0], gen)
        xs = list(arg.unbind(0))
        need_x = [True] * K
    else:
        pairs = [make_input(case["shape"], dtype, layout, gen) for layout in case["layouts"]]
        need_x = case["inputs_grad"]
        for (leaf, _), need in zip(pairs, need_x):
            leaf.requires_grad_(need)
        xs = [view if need else view.detach() for (_, view), need in zip(pairs, need_x)]
        arg = xs
    weights = case["weights"].clone().requires_grad_(case["weights_grad"])

    out = sp.softmax_weighted_sum(weights, arg, temperature=T) if softmax else sp.weighted_sum(weights, arg)
    assert out.dtype == dtype and out.shape == xs[0].shape

    # The exact answer: the reference in float64 on the same values.
    x64 = [x.detach().double().requires_grad_() for x in xs]
    w64 = weights.detach().double().requires_grad_()
    want = reference.softmax_weighted_sum(w64, x64, T) if softmax else reference.weighted_sum(w64, x64)

    rtol, atol = (max(t) for t in zip(TOLERANCES[dtype], TOLERANCES[weights.dtype]))
    eps = torch.finfo(reference.acc_dtype(dtype)).eps
    x_abs = torch.stack([x.detach().abs() for x in x64])
    if softmax:
        z = w64.detach() / T
        p = torch.softmax(z, -1)
        dp = row_perturbation(z, eps)
    else:
        p = w64.detach()
        dp = eps * p.abs()  # the cast of the weights to the accumulation dtype
    # Weights as (K, *rows, 1, ...): broadcastable against the (K, *shape) inputs.
    rows = p.dim() - 1
    trailing = len(case["shape"]) - rows
    pv = p.movedim(-1, 0).reshape(K, *p.shape[:-1], *[1] * trailing)
    dpv = dp.movedim(-1, 0).reshape(pv.shape)
    scale = (pv.abs() * x_abs).sum(0)
    check_close("out", out, want.detach(), atol + rtol * (want.detach().abs() + scale) + (dpv * x_abs).sum(0))

    targets = ([weights] if weights.requires_grad else []) + (
        [arg] if case["stacked"] else [x for x, need in zip(xs, need_x) if need]
    )
    if not targets:
        assert out.grad_fn is None
        return
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype)
    got = torch.autograd.grad(out, targets, grad)
    g64 = grad.double()
    want_w, *want_x = torch.autograd.grad(want, [w64, *x64], g64)
    got = list(got)
    if weights.requires_grad:
        gw = got.pop(0)
        assert gw.dtype == weights.dtype
        # D_k = sum |grad * x_k|, the scale of d_k = <grad, x_k>.
        dims = list(range(rows, len(case["shape"])))
        D = torch.stack([(g64.abs() * x.detach().abs()).sum(dims) if dims else g64.abs() * x.detach().abs()
                         for x in x64], -1)
        if softmax:
            pD = (p * D).sum(-1, keepdim=True)
            S = p * (D + pD) / T
            extra = (dp * (D + pD) + (p + dp) * (dp * D).sum(-1, keepdim=True)) / T
        else:
            S, extra = D, torch.zeros_like(D)
        check_close("grad of weights", gw, want_w, atol + rtol * (want_w.abs() + S) + extra)
    if case["stacked"]:
        got = list(got[0].unbind(0))
    else:
        want_x = [w for w, need in zip(want_x, need_x) if need]
        dpv = dpv[torch.tensor(need_x)]
    assert len(got) == len(want_x)
    for k, (a, b) in enumerate(zip(got, want_x)):
        assert a.dtype == dtype
        check_close(f"grad of inputs[{k}]", a, b, atol + rtol * b.abs() + dpv[k] * g64.abs())


@SETTINGS
@given(cases(softmax=True))
def test_softmax_weighted_sum_property(case):
    run_case(case, softmax=True)


@SETTINGS
@given(cases(softmax=False))
def test_weighted_sum_property(case):
    run_case(case, softmax=False)


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(K=st.integers(1, 64), neg=st.integers(0, 64), dtype=st.sampled_from(DTYPES), log_t=st.floats(-3, 3))
def test_neg_inf_logits_have_zero_weight(K, neg, dtype, log_t):
    # -inf logits get weight exactly 0, and all -inf gives NaN, as torch.softmax.
    neg = min(neg, K)
    logits = torch.zeros(K, dtype=torch.float64)
    logits[:neg] = -math.inf
    xs = [torch.full((3,), float(k + 1), dtype=dtype) for k in range(K)]
    out = sp.softmax_weighted_sum(logits, xs, temperature=10.0 ** log_t)
    assert torch.equal(out.isnan(), torch.softmax(logits, 0)[:1].isnan().expand(3))
    if neg < K:
        # The mean of k + 1 over the finite entries.
        assert torch.allclose(out.double(), torch.tensor((neg + 1 + K) / 2, dtype=torch.float64), **dict(
            zip(("rtol", "atol"), TOLERANCES[dtype])))


def test_numerics_doc_matches_conftest():
    # docs/numerics.md states the tolerances the tests use: keep them equal.
    path = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "numerics.md")
    with open(path) as f:
        rows = re.findall(r"^\| (b?float\d+) \| ([0-9.e-]+) \| ([0-9.e-]+) \|$", f.read(), re.M)
    documented = {getattr(torch, name): (float(rtol), float(atol)) for name, rtol, atol in rows}
    assert documented == TOLERANCES
