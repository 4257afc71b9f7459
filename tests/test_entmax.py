"""simplex_param's drop-in of the entmax package's API (simplex_param/entmax.py).

Differential tests against the `entmax` package (a test-only dependency: the
tests that need it skip without it), written the way entmax users call it;
the cases of entmax's own tests (entmax/test_*.py, MIT licence) carried over
where they apply; and entmax's known faults, fixed here: alpha = 1 (entmax
issues #23, #24), alpha = 10 in float32 (#36), alpha drifting to <= 1 (#16,
#39), a -100 target of the losses.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import simplex_param as sp

from conftest import DEVICES

F32, F64 = torch.float32, torch.float64
DTYPES = [F32, F64]
# Tolerances (rtol, atol) of values computed in another order of arithmetic.
TOL = {F32: dict(rtol=1e-5, atol=1e-6), F64: dict(rtol=1e-10, atol=1e-12)}


@pytest.fixture(scope="module")
def ref():
    """The entmax package, the reference; tests that use it skip without it."""
    return pytest.importorskip("entmax")


def logits(*shape, dtype=F64, scale=1.0, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=dtype)).requires_grad_(requires_grad)


def grads(f, x, *more, seed=1):
    """The output of f(x, *more) and the gradients of <output, G> for a random G."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, *more)]
    out = f(*leaves)
    G = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return (out, *torch.autograd.grad((out * G).sum(), leaves))


# Shapes and dims, as users call them: rows of scores, attention scores over
# the keys, a 3-D batch along each axis.
SHAPES_DIMS = [((7,), -1), ((7,), 0), ((4, 6), -1), ((4, 6), 0), ((4, 6), 1), ((2, 3, 5), 0),
               ((2, 3, 5), 1), ((2, 3, 5), 2), ((2, 3, 5), -1), ((2, 3, 4, 5), 3)]
SORTED_MAPS = ["sparsemax", "entmax15"]


# ---------------------------------------------------------------------------
# The functions, against entmax.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", SORTED_MAPS)
@pytest.mark.parametrize("shape,dim", SHAPES_DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparsemax_entmax15_bit_identical_to_entmax(ref, name, shape, dim, dtype):
    X = logits(*shape, dtype=dtype, scale=2.0)
    ours, theirs = getattr(sp, name), getattr(ref, name)
    p = ours(X, dim=dim)
    assert torch.equal(p, theirs(X, dim=dim))
    assert (p == 0).any()  # exact zeros, in the same places
    out, dX = grads(lambda x: ours(x, dim=dim), X)
    out_ref, dX_ref = grads(lambda x: theirs(x, dim=dim), X)
    torch.testing.assert_close(dX, dX_ref, **TOL[dtype])
    assert torch.equal(dX[p == 0], torch.zeros_like(dX[p == 0]))  # no gradient off the support


@pytest.mark.parametrize("name", SORTED_MAPS)
@pytest.mark.parametrize("k", [1, 2, 3, 5, 30])
@pytest.mark.parametrize("coef", [1e-5, 0.5, 1e4])
def test_k_is_a_hint_same_results(ref, name, k, coef):
    # entmax's test_topk: a partial sort of k gives the full sort's threshold.
    X = logits(3, 4, 5, dtype=F32, scale=coef)
    for dim in (0, 1, 2):
        p = getattr(sp, name)(X, dim=dim, k=k)
        assert torch.equal(p, getattr(sp, name)(X, dim=dim))
        assert torch.equal(p, getattr(ref, name)(X, dim=dim, k=k))


@pytest.mark.parametrize("alpha", [1.25, 1.5, 1.75, 2.0, 2.25, 3.0])
@pytest.mark.parametrize("shape,dim", SHAPES_DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_entmax_bisect_matches_entmax(ref, alpha, shape, dim, dtype):
    X = logits(*shape, dtype=dtype, scale=2.0)
    p = sp.entmax_bisect(X, alpha, dim=dim)
    # Against entmax in float64: float32 is float64's threshold rounded here.
    torch.testing.assert_close(p, ref.entmax_bisect(X.double(), alpha, dim=dim).to(dtype), rtol=0,
                               atol=3e-7 if dtype == F32 else 1e-12)
    torch.testing.assert_close(p.sum(dim), torch.ones_like(p.sum(dim)), **TOL[dtype])
    a = torch.tensor(alpha, dtype=dtype)
    _, dX, da = grads(lambda x, a: sp.entmax_bisect(x, a, dim=dim), X, a)
    _, dX_ref, da_ref = grads(lambda x, a: ref.entmax_bisect(x, a, dim=dim), X, a)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == F32 else dict(rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(dX, dX_ref, **tol)
    torch.testing.assert_close(da, da_ref, **tol)  # entmax's closed form of d/d alpha


@pytest.mark.parametrize("dim", [0, 1, 2, 3])
def test_entmax_bisect_alpha_per_slice_matches_entmax(ref, dim):
    # entmax's test_arbitrary_dimension, with alpha >= 1: a tensor alpha of
    # size 1 along dim, one value per distribution.
    shape = [3, 4, 2, 5]
    X = logits(*shape)
    alpha_shape = list(shape)
    alpha_shape[dim] = 1
    alpha = 1 + 2.5 * torch.rand(alpha_shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    _, dX, da = grads(lambda x, a: sp.entmax_bisect(x, a, dim=dim), X, alpha)
    p_ref, dX_ref, da_ref = grads(lambda x, a: ref.entmax_bisect(x, a, dim=dim), X, alpha)
    torch.testing.assert_close(sp.entmax_bisect(X, alpha, dim=dim), p_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(dX, dX_ref, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(da, da_ref, rtol=1e-8, atol=1e-10)
    # Each distribution is that of its own alpha as a float.
    P = sp.entmax_bisect(X, alpha, dim=dim).movedim(dim, -1)
    flat_alpha = alpha.movedim(dim, -1).reshape(-1)
    for row, a, p in zip(X.movedim(dim, -1).reshape(-1, shape[dim]), flat_alpha, P.reshape(-1, shape[dim])):
        torch.testing.assert_close(p, sp.entmax_bisect(row, a.item()), rtol=0, atol=1e-15)


def test_alpha_with_fewer_dimensions_than_X(ref):
    # alpha (4,) broadcasts to X (5, 4) as (1, 4): one alpha per column, along dim 0.
    X = logits(5, 4)
    alpha = torch.tensor([1.0 + 1e-3, 1.5, 2.0, 3.0], dtype=F64)
    _, dX, da = grads(lambda x, a: sp.entmax_bisect(x, a, dim=0), X, alpha)
    p_ref, dX_ref, da_ref = grads(lambda x, a: ref.entmax_bisect(x, a, dim=0), X, alpha)
    torch.testing.assert_close(sp.entmax_bisect(X, alpha, dim=0), p_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(dX, dX_ref, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(da, da_ref, rtol=1e-6, atol=1e-8)


def test_maps_apply_bisection_options():
    # The public path of n_iter and ensure_sum_one: maps.apply, map "entmax_bisect" only.
    from simplex_param import maps

    X = logits(3, 5)
    torch.testing.assert_close(maps.apply("entmax_bisect", X, 1.5, n_iter=50), maps.apply("entmax_bisect", X, 1.5))
    assert not torch.equal(maps.apply("entmax_bisect", X, 1.5, n_iter=3), maps.apply("entmax_bisect", X, 1.5))
    for name in ("sparsemax", "entmax15", "softmax"):
        with pytest.raises(ValueError, match="options of map 'entmax_bisect' only"):
            maps.apply(name, X, n_iter=10)


@pytest.mark.parametrize("n_iter", [1, 5, 24])
@pytest.mark.parametrize("ensure_sum_one", [True, False])
def test_n_iter_and_ensure_sum_one_as_entmax(ref, n_iter, ensure_sum_one):
    # The same bracket halved n_iter times: entmax's result after n_iter steps.
    X = logits(6, 9, scale=2.0)
    for alpha in (1.3, 1.5, 2.0, torch.tensor([[1.2], [1.5], [1.8], [2.0], [2.5], [4.0]], dtype=F64)):
        p = sp.entmax_bisect(X, alpha, n_iter=n_iter, ensure_sum_one=ensure_sum_one)
        p_ref = ref.entmax_bisect(X, alpha, n_iter=n_iter, ensure_sum_one=ensure_sum_one)
        torch.testing.assert_close(p, p_ref, rtol=1e-9, atol=1e-12)


def test_ensure_sum_one_false_is_unnormalised():
    X = logits(50, 9, scale=2.0)
    p = sp.entmax_bisect(X, 1.5, n_iter=10, ensure_sum_one=False)
    total = p.sum(-1)
    assert not torch.equal(total, torch.ones_like(total))
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-2)  # within the last bracket
    torch.testing.assert_close(p / total[:, None], sp.entmax_bisect(X, 1.5, n_iter=10))
    # Its gradient is the map's, at the unnormalised point (as entmax's).
    gradcheck(lambda x: sp.entmax_bisect(x, 1.5, ensure_sum_one=False), (logits(3, 5, requires_grad=True),))
    # At alpha = 1, the softmax, normalised all the same.
    torch.testing.assert_close(sp.entmax_bisect(X, 1.0, ensure_sum_one=False), torch.softmax(X, -1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_scores(ref, dtype):
    # entmax's test_mask: -inf scores get weight 0, the others those of the row without them.
    x = logits(2, 6, dtype=dtype, seed=42)
    x[:, 3:] = -math.inf
    funcs = [sp.Sparsemax(dim=1), sp.Entmax15(dim=1), sp.Sparsemax(dim=1, k=512), sp.Entmax15(dim=1, k=512),
             sp.entmax_bisect, *(lambda x, a=a: sp.entmax_bisect(x, a) for a in (1.0, 1.25, 1.5, 1.75, 2.25))]
    for f in funcs:
        y = f(x)
        assert torch.equal(y[:, 3:], torch.zeros_like(y[:, 3:]))
        torch.testing.assert_close(y[:, :3], f(x[:, :3]), **TOL[dtype])
    torch.testing.assert_close(sp.entmax15(x), ref.entmax15(x))


# ---------------------------------------------------------------------------
# alpha: the special values, the gradient, large values, the faults fixed.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_alpha_one_is_softmax_not_uniform(ref, dtype):
    # entmax #23, #24: at alpha = 1 entmax_bisect gives the uniform row.
    X = logits(5, 8, dtype=dtype, scale=3.0)
    torch.testing.assert_close(sp.entmax_bisect(X, 1.0), torch.softmax(X, -1), **TOL[dtype])
    torch.testing.assert_close(sp.entmax_bisect(X, torch.ones(5, 1, dtype=dtype)), torch.softmax(X, -1), **TOL[dtype])
    torch.testing.assert_close(sp.EntmaxBisect(alpha=1.0, dim=0)(X), torch.softmax(X, 0), **TOL[dtype])
    uniform = ref.entmax_bisect(X, 1.0)
    torch.testing.assert_close(uniform, torch.full_like(uniform, 1 / 8))
    # Continuous at 1: alpha = 1 + 1e-6 is within O(1e-6) of the softmax.
    torch.testing.assert_close(sp.entmax_bisect(X.double(), 1 + 1e-6), torch.softmax(X.double(), -1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_alpha_two_is_sparsemax_and_one_and_half_is_entmax15(dtype):
    # entmax's test_sparsemax, test_entmax15 (bisection against the sort).
    for scale in (0.5, 2.0, 10.0):
        X = logits(4, 6, dtype=dtype, scale=scale)
        atol = 1e-6 if dtype == F32 else 1e-12
        torch.testing.assert_close(sp.entmax_bisect(X, 2.0), sp.sparsemax(X), rtol=0, atol=atol)
        torch.testing.assert_close(sp.entmax_bisect(X, 1.5), sp.entmax15(X), rtol=0, atol=atol)


@pytest.mark.parametrize("alpha", [1.0001, 1.01, 1.2, 1.5, 1.75, 2.0, 2.25, 3.0, 5.0])
def test_alpha_gradient_gradcheck(alpha):
    # entmax's test_entmax_grad, with alpha >= 1 (alpha - 1 small included).
    a = torch.tensor(alpha, dtype=F64, requires_grad=True)
    x = logits(4, 6, requires_grad=True)
    gradcheck(sp.entmax_bisect, (x, a), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("dim", [0, 1, 2, 3])
def test_alpha_gradient_per_slice_gradcheck(dim):
    # entmax's test_entmax_grad_multiple_alphas and test_arbitrary_dimension_grad.
    shape = [2, 3, 2, 4]
    alpha_shape = list(shape)
    alpha_shape[dim] = 1
    X = logits(*shape, requires_grad=True)
    alpha = (1 + 2.5 * torch.rand(alpha_shape, generator=torch.Generator().manual_seed(4), dtype=F64)).requires_grad_()
    gradcheck(lambda x, a: sp.entmax_bisect(x, a, dim=dim), (X, alpha), eps=1e-6, atol=1e-6)


def test_alpha_gradient_at_one_is_finite(ref):
    # entmax: NaN at alpha = 1 and huge just above it (0/0 of its closed form).
    X = logits(3, 5)
    G = torch.randn(3, 5, generator=torch.Generator().manual_seed(5), dtype=F64)

    def f(a):
        return (sp.entmax_bisect(X, a) * G).sum()

    for alpha in (1.0, 1 + 1e-7):
        a = torch.tensor(alpha, dtype=F64, requires_grad=True)
        (da,) = torch.autograd.grad(f(a), a)
        h = 1e-5  # a one-sided difference, alpha < 1 being outside the domain
        one_sided = (f(torch.tensor(alpha + h, dtype=F64)) - f(torch.tensor(alpha, dtype=F64))) / h
        assert torch.isfinite(da)
        torch.testing.assert_close(da, one_sided, rtol=1e-3, atol=1e-4)
    a = torch.tensor(1.0, dtype=F64, requires_grad=True)
    (ref.entmax_bisect(X, a) * G).sum().backward()
    assert torch.isnan(a.grad)


def test_learned_alpha_trains_through_one():
    # entmax #16, #39: a learned alpha drifting to 1 gives NaN there. Here,
    # alpha = 1 + softplus(a) (the documented parametrization) goes to the
    # softmax's limit with finite gradients, and alpha = 1 itself is allowed.
    torch.manual_seed(0)
    X = torch.randn(16, 5, dtype=F64)
    y = torch.randint(0, 5, (16,))
    for alpha in (torch.tensor(1.0, dtype=F64, requires_grad=True),
                  1 + F.softplus(torch.tensor(-30.0, dtype=F64, requires_grad=True))):
        loss = sp.entmax_bisect_loss(X, y, alpha).mean() + sp.entmax_bisect(X, alpha)[:, 0].sum()
        (da,) = torch.autograd.grad(loss, alpha)
        assert torch.isfinite(da)


@pytest.mark.parametrize("alpha", [torch.tensor(0.999), torch.tensor([[1.5], [0.5]]), torch.tensor(math.nan),
                                   torch.tensor(math.inf)])
def test_alpha_below_one_is_an_error_not_nan(ref, alpha):
    X = logits(2, 4, dtype=F32)
    with pytest.raises(ValueError, match="alpha must be a finite number >= 1, got"):
        sp.entmax_bisect(X, alpha)
    with pytest.raises(ValueError, match="alpha"):
        sp.EntmaxBisect(alpha=torch.nn.Parameter(alpha))(X)
    with pytest.raises(ValueError, match="alpha"):
        sp.entmax_bisect_loss(X, torch.tensor([0, 1]), alpha)
    for bad in (0.5, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="alpha"):
            sp.entmax_bisect(X, bad)
        with pytest.raises(ValueError, match="alpha"):
            sp.EntmaxBisect(alpha=bad)


@pytest.mark.parametrize("alpha", [1.5, 2.0, 3.0, 5.0, 8.0, 10.0])
def test_large_alpha_float32(alpha):
    # entmax #36: alpha = 10 unstable in float32. The threshold is found in
    # float64, so float32 gives float64's result rounded, finite, summing to 1.
    X = logits(500, 40, dtype=F32, scale=3.0)
    p = sp.entmax_bisect(X, alpha)
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(500), rtol=0, atol=1e-6)
    torch.testing.assert_close(p, sp.entmax_bisect(X.double(), alpha).float(), rtol=0, atol=1e-7)


def test_issue_36_curve(ref):
    # The issue's curve: entmax_bisect([t, 0], alpha=10)[0] for t in [-1, 1],
    # against the exact solution of p^9 - (1 - p)^9 = 9 t (well conditioned
    # in p, solved by bisection in float64).
    t = torch.linspace(-1, 1, 10000)
    X = torch.stack([t, torch.zeros_like(t)], -1)
    t64 = t.double()
    lo, hi = torch.zeros_like(t64), torch.ones_like(t64)
    for _ in range(200):
        m = (lo + hi) / 2
        below = m**9 - (1 - m) ** 9 < 9 * t64
        lo, hi = torch.where(below, m, lo), torch.where(below, hi, m)
    exact = (lo + hi) / 2
    p = sp.entmax_bisect(X, 10.0)[:, 0].double()
    theirs = ref.entmax_bisect(X, 10.0)[:, 0].double()
    inner = (exact > 0.1) & (exact < 0.9)
    assert (p - exact)[inner].abs().max() < 1e-6
    assert (theirs - exact)[inner].abs().max() > 1e-2  # entmax in float32
    # Near the ends of the support the weights below eps(float64) ** (1/9),
    # about 0.017, are not resolved by any threshold in float64 (entmax's
    # own float64 result has the same error): float32 adds nothing to it.
    assert (p - exact).abs().max() < 0.025
    assert (p - sp.entmax_bisect(X.double(), 10.0)[:, 0]).abs().max() < 1e-7


@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_logits_alpha_three(dtype):
    # entmax PR #32's example: 1000 * randn at alpha = 3 gave NaN.
    X = logits(10, 100, dtype=dtype, scale=1000.0)
    for n_iter in (50, 100):
        p = sp.entmax_bisect(X, 3.0, n_iter=n_iter)
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p.sum(-1), torch.ones(10, dtype=dtype), rtol=0, atol=1e-6)
        torch.testing.assert_close(p.max(-1).values, torch.ones(10, dtype=dtype))


# ---------------------------------------------------------------------------
# The modules.
# ---------------------------------------------------------------------------

def test_modules_as_entmax(ref):
    X = logits(3, 4, 5)
    for ours, theirs in ((sp.Sparsemax(dim=1, k=3), ref.Sparsemax(dim=1, k=3)),
                         (sp.Entmax15(dim=0), ref.Entmax15(dim=0)),
                         (sp.EntmaxBisect(alpha=1.7, dim=2, n_iter=30), ref.EntmaxBisect(alpha=1.7, dim=2, n_iter=30))):
        for attr in ("dim", "k", "alpha", "n_iter"):
            assert getattr(ours, attr, None) == getattr(theirs, attr, None)
        torch.testing.assert_close(ours(X), theirs(X))
    with pytest.raises(AttributeError):  # entmax cannot take a Parameter alpha; see test_learned_alpha_*
        ref.EntmaxBisect(alpha=torch.nn.Parameter(torch.tensor(1.5)))
    assert (sp.Sparsemax().dim, sp.Sparsemax().k) == (-1, None)
    assert (sp.EntmaxBisect().alpha, sp.EntmaxBisect().dim, sp.EntmaxBisect().n_iter) == (1.5, -1, 50)
    assert "dim=1, k=3" in repr(sp.Sparsemax(dim=1, k=3))


@pytest.mark.parametrize("Map", [sp.Sparsemax, sp.Entmax15])
@pytest.mark.parametrize("dim", [0, 1, 2])
def test_module_gradcheck(Map, dim):
    # entmax's test_topk test_mapping.
    gradcheck(Map(dim=dim, k=3), (logits(3, 4, 5, requires_grad=True),))
    gradgradcheck(Map(dim=dim), (logits(2, 3, 4, requires_grad=True),))


def test_entmax_bisect_module_learns_alpha():
    # A learned alpha as a module parameter: registered, saved, trained.
    m = sp.EntmaxBisect(alpha=torch.nn.Parameter(torch.tensor(1.5)), dim=-1)
    assert [name for name, _ in m.named_parameters()] == ["alpha"]
    assert "alpha" in m.state_dict()
    X = torch.randn(8, 6)
    m(X)[:, 0].sum().backward()
    assert m.alpha.grad is not None and torch.isfinite(m.alpha.grad)


# ---------------------------------------------------------------------------
# The losses.
# ---------------------------------------------------------------------------

LOSSES = [  # (ours, entmax's name, kwargs)
    (sp.SparsemaxLoss, "SparsemaxLoss", {}),
    (sp.SparsemaxLoss, "SparsemaxLoss", {"k": 5}),
    (sp.Entmax15Loss, "Entmax15Loss", {}),
    (sp.Entmax15Loss, "Entmax15Loss", {"k": 5}),
    (sp.EntmaxBisectLoss, "EntmaxBisectLoss", {}),
    (sp.EntmaxBisectLoss, "EntmaxBisectLoss", {"alpha": 1.3, "n_iter": 40}),
    (sp.EntmaxBisectLoss, "EntmaxBisectLoss", {"alpha": 2.5}),
]
LOSS_IDS = ["sparsemax", "sparsemax-k5", "entmax15", "entmax15-k5", "bisect", "bisect-1.3", "bisect-2.5"]


def data(n=20, d=6, dtype=F64, seed=0):
    X = logits(n, d, dtype=dtype, seed=seed, scale=2.0)
    y = torch.randint(0, d, (n,), generator=torch.Generator().manual_seed(seed + 1))
    return X, y


@pytest.mark.parametrize("Loss,name,kw", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("reduction", ["elementwise_mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_loss_modules_match_entmax(ref, Loss, name, kw, reduction, dtype):
    X, y = data(dtype=dtype)
    for ignore_index in (-100, int(y[0]), 99):  # entmax handles a non-negative ignore_index only
        ours, theirs = Loss(**kw, ignore_index=ignore_index, reduction=reduction), getattr(ref, name)(
            **kw, ignore_index=ignore_index, reduction=reduction)
        assert (ours.ignore_index, ours.reduction) == (theirs.ignore_index, theirs.reduction)
        out, dX = grads(lambda x: ours(x, y), X)
        out_ref, dX_ref = grads(lambda x: theirs(x, y), X)
        torch.testing.assert_close(out, out_ref, **TOL[dtype])
        torch.testing.assert_close(dX, dX_ref, **TOL[dtype])


@pytest.mark.parametrize("which", ["sparsemax", "entmax15", "entmax_bisect"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_loss_functions_match_entmax(ref, which, dtype):
    X, y = data(dtype=dtype)
    extra = [(), (1.25,), (2.0,), (3.0,)] if which == "entmax_bisect" else [(), (None,), (3,)]
    for args in extra:
        ours, theirs = getattr(sp, which + "_loss"), getattr(ref, which + "_loss")
        out, dX = grads(lambda x: ours(x, y, *args), X)
        out_ref, dX_ref = grads(lambda x: theirs(x, y, *args), X)
        torch.testing.assert_close(out, out_ref, **TOL[dtype])
        torch.testing.assert_close(dX, dX_ref, **TOL[dtype])
        # The gradient is p* - onehot(target).
        p = sp.entmax_bisect(X, *args) if which == "entmax_bisect" else getattr(sp, which)(X)
        G = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
        torch.testing.assert_close(dX, G[:, None] * (p - F.one_hot(y, 6).to(dtype)), **TOL[dtype])


def test_minus_100_target_is_ignored_as_cross_entropy(ref):
    # entmax masks only a non-negative ignore_index: a -100 target crashes it.
    X, y = data()
    y[[2, 5, 11]] = -100
    keep = y != -100
    with pytest.raises((RuntimeError, IndexError)):
        ref.SparsemaxLoss()(X, y)
    for Loss, name in ((sp.SparsemaxLoss, "SparsemaxLoss"), (sp.Entmax15Loss, "Entmax15Loss"),
                       (sp.EntmaxBisectLoss, "EntmaxBisectLoss")):
        for reduction in ("elementwise_mean", "mean", "sum", "none"):
            out, dX = grads(lambda x: Loss(reduction=reduction)(x, y), X)
            kept_ref = getattr(ref, name)(reduction="none")(X[keep], y[keep])
            if reduction == "none":
                assert torch.equal(out[~keep], torch.zeros(3, dtype=F64))
                torch.testing.assert_close(out[keep], kept_ref)
            else:
                expected = kept_ref.sum() / (keep.sum() if reduction != "sum" else 1)
                torch.testing.assert_close(out, expected)
            assert torch.equal(dX[~keep], torch.zeros_like(dX[~keep]))
    # At alpha = 1 the loss is the cross-entropy, -100 and its mean included.
    torch.testing.assert_close(sp.EntmaxBisectLoss(alpha=1.0)(X, y), F.cross_entropy(X, y))
    torch.testing.assert_close(sp.EntmaxBisectLoss(alpha=1.0, reduction="sum")(X, y), F.cross_entropy(X, y, reduction="sum"))


def test_all_targets_ignored_mean_is_nan_as_cross_entropy():
    X, _ = data(n=3)
    y = torch.full((3,), -100)
    assert torch.isnan(sp.SparsemaxLoss()(X, y)) and torch.isnan(F.cross_entropy(X, y))
    assert sp.SparsemaxLoss(reduction="sum")(X, y) == 0


@pytest.mark.parametrize("Loss,name,kw", LOSSES, ids=LOSS_IDS)
def test_loss_non_negative(Loss, name, kw):
    # entmax's test_non_neg.
    for seed in range(5):
        X, y = data(n=4, d=10, seed=seed)
        assert torch.all(Loss(**kw, reduction="none")(X, y) >= -1e-12)


@pytest.mark.parametrize("Loss,name,kw", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("ignore", [False, True])
@pytest.mark.parametrize("reduction", ["sum", "elementwise_mean"])
def test_loss_gradcheck(Loss, name, kw, ignore, reduction):
    # entmax's test_loss.
    for seed in range(3):
        X, y = data(n=4, d=10, seed=seed)
        X.requires_grad_()
        loss = Loss(**kw, ignore_index=int(y[0]) if ignore else -100, reduction=reduction)
        gradcheck(lambda x: loss(x, y), (X,), eps=1e-5)


@pytest.mark.parametrize("Loss,name,kw", LOSSES, ids=LOSS_IDS)
def test_loss_second_order(Loss, name, kw):
    # The Hessian in X is the map's Jacobian (p* recomputed with its graph).
    X, y = data(n=3, d=5)
    y[1] = -100
    gradgradcheck(lambda x: Loss(**kw)(x, y), (X.requires_grad_(),), eps=1e-5)


@pytest.mark.parametrize("Loss,name,kw", LOSSES, ids=LOSS_IDS)
def test_index_ignored(Loss, name, kw):
    # entmax's test_index_ignored.
    X, y = data(n=20, d=6)
    assert Loss(**kw, reduction="sum", ignore_index=int(y[0]))(X, y) < Loss(**kw, reduction="sum")(X, y)


@pytest.mark.parametrize("alpha", [1.0001, 1.05, 1.3, 1.5, 2.0, 3.0])
def test_bisect_loss_alpha_gradient(ref, alpha):
    # entmax gives alpha no gradient through the loss; here d loss / d alpha
    # = d H_alpha(p*) / d alpha (the envelope theorem), checked against finite
    # differences, per row too, and against autograd through the map.
    X, y = data(n=5, d=7)
    X.requires_grad_()
    a = torch.tensor(alpha, dtype=F64, requires_grad=True)
    gradcheck(lambda x, a: sp.entmax_bisect_loss(x, y, a), (X, a), eps=1e-6, atol=1e-6)
    rows = (alpha + torch.linspace(0, 1, 5, dtype=F64)[:, None]).requires_grad_()
    gradcheck(lambda x, a: sp.EntmaxBisectLoss(a, reduction="sum")(x, y), (X, rows), eps=1e-6, atol=1e-6)

    def through_the_map(x, a):
        p = sp.entmax_bisect(x, a)
        tsallis = (1 - (p**a).sum(-1)) / (a * (a - 1))
        return tsallis + ((p - F.one_hot(y, 7).to(F64)) * x).sum(-1)

    if alpha > 1.01:
        (da,) = torch.autograd.grad(sp.entmax_bisect_loss(X, y, a).sum(), a)
        (da_chain,) = torch.autograd.grad(through_the_map(X, a).sum(), a)
        torch.testing.assert_close(da, da_chain, rtol=1e-7, atol=1e-9)
    # entmax's loss leaves alpha without a gradient.
    a_ref = torch.tensor(max(alpha, 1.01), dtype=F64, requires_grad=True)
    ref.entmax_bisect_loss(X, y, a_ref).sum().backward()
    assert a_ref.grad is None


def test_bisect_loss_special_alphas():
    X, y = data()
    torch.testing.assert_close(sp.entmax_bisect_loss(X, y, 1.0), F.cross_entropy(X, y, reduction="none"))
    torch.testing.assert_close(sp.entmax_bisect_loss(X, y, 1 + 1e-9), F.cross_entropy(X, y, reduction="none"))
    torch.testing.assert_close(sp.entmax_bisect_loss(X, y, 2.0), sp.sparsemax_loss(X, y), rtol=0, atol=1e-12)
    torch.testing.assert_close(sp.entmax_bisect_loss(X, y, 1.5), sp.entmax15_loss(X, y), rtol=0, atol=1e-12)
    # The alpha gradient is continuous at 1: its limit there, within O(alpha - 1).
    grad_at = []
    for alpha in (1.0, 1e-6 + 1, 1e-3 + 1):
        a = torch.tensor(alpha, dtype=F64, requires_grad=True)
        grad_at.append(torch.autograd.grad(sp.entmax_bisect_loss(X, y, a).sum(), a)[0])
    torch.testing.assert_close(grad_at[0], grad_at[1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad_at[0], grad_at[2], rtol=1e-1, atol=1e-3)


def test_loss_masked_class_scores():
    # A class scored -inf (masked) costs nothing unless it is the target.
    X, y = data(n=4, d=5)
    y = torch.tensor([0, 1, 2, 0])
    Xm = X.clone()
    Xm[:, 4] = -math.inf
    for loss in (sp.sparsemax_loss, sp.entmax15_loss, sp.entmax_bisect_loss):
        torch.testing.assert_close(loss(Xm, y), loss(X[:, :4], y))


def test_loss_modules_defaults_and_attributes(ref):
    for ours, theirs in ((sp.SparsemaxLoss(), ref.SparsemaxLoss()), (sp.Entmax15Loss(), ref.Entmax15Loss()),
                         (sp.EntmaxBisectLoss(), ref.EntmaxBisectLoss())):
        for attr in ("k", "alpha", "n_iter", "ignore_index", "reduction"):
            assert getattr(ours, attr, None) == getattr(theirs, attr, None)
    # entmax's own tests pass a 0-d tensor as ignore_index.
    assert sp.SparsemaxLoss(ignore_index=torch.tensor(3)).ignore_index == 3


def test_learned_alpha_loss_module():
    alpha = torch.nn.Parameter(torch.tensor(1.5, dtype=F64))
    crit = sp.EntmaxBisectLoss(alpha=alpha)
    assert [name for name, _ in crit.named_parameters()] == ["alpha"]
    X, y = data()
    crit(X, y).backward()
    assert torch.isfinite(alpha.grad) and alpha.grad != 0


# ---------------------------------------------------------------------------
# A user's script, with entmax's imports swapped for simplex_param's.
# ---------------------------------------------------------------------------

def train(lib, steps=5):
    """Attention with entmax15 over masked keys, a classifier head trained
    with Entmax15Loss; the losses seen."""
    torch.manual_seed(0)
    q, k = torch.randn(4, 3, 8), torch.randn(4, 7, 8)
    mask = torch.zeros(4, 1, 7, dtype=torch.bool)
    mask[:, :, 5:] = True
    head = torch.nn.Linear(8, 5)
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    crit = lib.Entmax15Loss(k=None, ignore_index=4)
    y = torch.tensor([0, 1, 2, 4])
    seen = []
    for _ in range(steps):
        scores = (q @ k.transpose(1, 2) / 8**0.5).masked_fill(mask, -math.inf)
        attn = lib.entmax15(scores, dim=-1)
        pooled = (attn @ k).mean(1)
        loss = crit(head(pooled), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen.append(loss.item())
    return seen, attn


def test_users_script_same_as_with_entmax(ref):
    ours, attn = train(sp)
    theirs, _ = train(ref)
    assert ours == pytest.approx(theirs, rel=1e-5)
    assert torch.equal(attn[..., 5:], torch.zeros_like(attn[..., 5:]))


@pytest.mark.skipif(len(DEVICES) < 2, reason="no CUDA device")
def test_cuda_matches_cpu():
    X, y = data(dtype=F32)
    Xc, yc = X.cuda(), y.cuda()
    for f in (sp.sparsemax, sp.entmax15, lambda x: sp.entmax_bisect(x, torch.tensor(1.7, device=x.device))):
        torch.testing.assert_close(f(Xc).cpu(), f(X))
    torch.testing.assert_close(sp.Entmax15Loss()(Xc, yc).cpu(), sp.Entmax15Loss()(X, y))


# ---------------------------------------------------------------------------
# Errors, naming the argument.
# ---------------------------------------------------------------------------

def test_errors_name_the_argument():
    X = logits(3, 4)
    y = torch.tensor([0, 1, 3])
    cases = [
        (TypeError, "X must be a torch.Tensor", lambda: sp.sparsemax([[1.0, 2.0]])),
        (TypeError, "X must be a floating tensor", lambda: sp.entmax15(torch.tensor([1, 2]))),
        (TypeError, "X must be a floating tensor", lambda: sp.entmax_bisect(torch.tensor([1, 2]))),
        (IndexError, "Dimension out of range", lambda: sp.sparsemax(X, dim=2)),
        (IndexError, "Dimension out of range", lambda: sp.entmax_bisect(X, dim=-3)),
        (IndexError, "Dimension out of range", lambda: sp.Entmax15(dim=5)(X)),
        (TypeError, "dim must be an int", lambda: sp.sparsemax(X, dim=1.0)),
        (ValueError, "X must have at least one dimension", lambda: sp.sparsemax(torch.tensor(1.0))),
        (ValueError, "X must have a nonzero size along dim 1", lambda: sp.entmax15(torch.empty(2, 0), dim=1)),
        (ValueError, "k must be None or a positive int", lambda: sp.sparsemax(X, k=0)),
        (TypeError, "k must be None or a positive int", lambda: sp.entmax15(X, k=2.5)),
        (TypeError, "k must be None or a positive int", lambda: sp.Sparsemax(k=True)),
        (ValueError, "k must be None or a positive int", lambda: sp.Entmax15Loss(k=-1)),
        (ValueError, "alpha must be a finite number >= 1", lambda: sp.entmax_bisect(X, 0.9)),
        (TypeError, "alpha must be a float or a floating tensor", lambda: sp.entmax_bisect(X, torch.tensor(2))),
        (TypeError, "alpha must be a float or a floating tensor", lambda: sp.entmax_bisect(X, "1.5")),
        (ValueError, "alpha must be broadcastable to x with size 1 along dim",
         lambda: sp.entmax_bisect(X, torch.full((3,), 1.5, dtype=F64))),
        (ValueError, "alpha must be broadcastable", lambda: sp.entmax_bisect(X, torch.full((2, 3, 1), 1.5, dtype=F64))),
        (ValueError, "n_iter must be an int >= 0", lambda: sp.entmax_bisect(X, n_iter=-1)),
        (TypeError, "n_iter must be an int >= 0", lambda: sp.EntmaxBisect(n_iter=2.5)(X)),
        (TypeError, "ensure_sum_one must be a bool", lambda: sp.entmax_bisect(X, ensure_sum_one=None)),
        (ValueError, "X must be a 2-D tensor", lambda: sp.sparsemax_loss(logits(2, 3, 4), y)),
        (TypeError, "target must be a torch.Tensor", lambda: sp.sparsemax_loss(X, [0, 1, 3])),
        (TypeError, "target must be an integer tensor", lambda: sp.entmax15_loss(X, y.double())),
        (ValueError, r"target must have shape \(n,\)", lambda: sp.entmax_bisect_loss(X, y[:2])),
        (ValueError, r"target must hold class indices in \[0, 4\), got 4", lambda: sp.sparsemax_loss(X, y + 1)),
        (ValueError, r"target must hold class indices in \[0, 4\), got -100",
         lambda: sp.sparsemax_loss(X, torch.tensor([0, -100, 1]))),
        (ValueError, r"in \[0, 4\) or ignore_index = -100, got -1",
         lambda: sp.SparsemaxLoss()(X, torch.tensor([0, -1, -100]))),
        (ValueError, "reduction must be one of", lambda: sp.SparsemaxLoss(reduction="avg")),
        (TypeError, "ignore_index must be an int", lambda: sp.Entmax15Loss(ignore_index=1.5)),
    ]
    for kind, text, call in cases:
        with pytest.raises(kind, match=text):
            call()


def test_exported():
    names = ["sparsemax", "entmax15", "entmax_bisect", "Sparsemax", "Entmax15", "EntmaxBisect", "sparsemax_loss",
             "entmax15_loss", "entmax_bisect_loss", "SparsemaxLoss", "Entmax15Loss", "EntmaxBisectLoss"]
    for name in names:
        assert name in sp.__all__ and getattr(sp, name) is getattr(sp.entmax, name)
