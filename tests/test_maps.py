"""The weight maps of the registry (csrc/maps.cpp, simplex_param/maps.py),
through simplex_weighted_sum: values against independent references, the
simplex properties, gradients to second order, opcheck and torch.compile.
Every test runs over the registry, so a new map is tested here as soon as it
has an oracle in INDEPENDENT."""
import pytest
import torch
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import simplex_param as sp
from simplex_param import maps, reference

from conftest import COMPILED, assert_close, weights_of

MAPS = list(maps.MAPS)
SIMPLEX_MAPS = list(maps.SIMPLEX_MAPS)
SPARSE_MAPS = [m for m in SIMPLEX_MAPS if m != "softmax"]


def bisect_threshold(x, mass, lo, hi, steps=200):
    """tau with sum(mass(x - tau)) = 1 per row, by bisection (float64)."""
    for _ in range(steps):
        mid = (lo + hi) / 2
        too_low = mass(x - mid).sum(-1, keepdim=True) > 1
        lo, hi = torch.where(too_low, mid, lo), torch.where(too_low, hi, mid)
    return (lo + hi) / 2


def sparsemax_by_bisection(z):
    top = z.max(-1, keepdim=True).values
    tau = bisect_threshold(z, lambda d: d.clamp_min(0), top - 1, top)
    return (z - tau).clamp_min(0)


def entmax15_by_bisection(z):
    x = z / 2
    top = x.max(-1, keepdim=True).values
    tau = bisect_threshold(x, lambda d: d.clamp_min(0) ** 2, top - 1, top)
    return (x - tau).clamp_min(0) ** 2


def entmax_by_bisection(z, alpha=1.5):
    """alpha-entmax from its definition: max((alpha - 1) z - tau, 0) ** (1 / (alpha - 1))."""
    if alpha == 1:
        return torch.softmax(z, -1)
    x = (alpha - 1) * z
    top = x.max(-1, keepdim=True).values
    tau = bisect_threshold(x, lambda d: d.clamp_min(0) ** (1 / (alpha - 1)), top - 1, top)
    return (x - tau).clamp_min(0) ** (1 / (alpha - 1))


INDEPENDENT = {
    "softmax": lambda z: torch.softmax(z, -1),
    "identity": lambda z: z,
    "sparsemax": sparsemax_by_bisection,
    "entmax15": entmax15_by_bisection,
    "entmax_bisect": entmax_by_bisection,
}


def test_every_map_has_an_oracle_and_both_registries_agree():
    assert set(INDEPENDENT) == set(maps.MAPS)
    if COMPILED:  # the compiled registry lists its names in its error
        with pytest.raises(ValueError) as e:
            torch.ops.simplex_param.simplex_weighted_sum(torch.zeros(2), [torch.zeros(1)] * 2, "?", 1.0)
        assert str(e.value).split(" got ")[0] == "map must be one of " + ", ".join(repr(m) for m in maps.MAPS) + ","


@pytest.mark.parametrize("map", MAPS)
@pytest.mark.parametrize("shape", [(7,), (5, 7), (2, 3, 4)])
def test_against_independent_reference(map, shape, device):
    torch.manual_seed(40)
    z = 3 * torch.randn(shape, dtype=torch.float64, device=device)
    got = weights_of(map, z, temperature=0.7)
    assert_close(got, INDEPENDENT[map](z / 0.7))
    assert_close(maps.apply(map, z / 0.7), INDEPENDENT[map](z / 0.7))


@pytest.mark.parametrize("map", SIMPLEX_MAPS)
def test_on_the_simplex_with_the_right_support(map, device):
    torch.manual_seed(41)
    z = 4 * torch.randn(200, 9, dtype=torch.float64, device=device)
    w = weights_of(map, z)
    assert (w >= 0).all()
    assert_close(w.sum(-1), torch.ones(200, dtype=torch.float64, device=device))
    want = INDEPENDENT[map](z)
    assert torch.equal(w > 0, want > 1e-12)
    if map != "softmax":
        assert (w == 0).any()  # exact zeros, which softmax never gives


def test_known_values(device):
    def t(*v):
        return torch.tensor(v, dtype=torch.float64, device=device)

    # sparsemax: sorted (2, 1.5, -1), support of 2, tau = (3.5 - 1) / 2.
    assert_close(weights_of("sparsemax", t(2.0, 1.5, -1.0)), t(0.75, 0.25, 0.0))
    # A gap of more than 1 (sparsemax) or 2 (entmax15) gives a one-hot.
    assert torch.equal(weights_of("sparsemax", t(3.0, 1.0, 0.0)), t(1.0, 0.0, 0.0))
    assert torch.equal(weights_of("entmax15", t(0.0, 5.0, 0.0)), t(0.0, 1.0, 0.0))
    # Equal logits give uniform weights for every simplex map.
    for m in SIMPLEX_MAPS:
        assert_close(weights_of(m, t(0.3, 0.3, 0.3, 0.3)), torch.full((4,), 0.25, dtype=torch.float64, device=device))
    # entmax15 of (z, 0) with both in the support: (z/2 - tau)^2 + tau^2 = 1.
    z = 1.0
    tau = (z / 2 - (2 - z * z / 4) ** 0.5) / 2
    assert_close(weights_of("entmax15", t(z, 0.0)), t((z / 2 - tau) ** 2, tau ** 2))


@pytest.mark.parametrize("K", [1, 2, 3, 8, 13, 16, 17, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softmax_weights_are_within_a_few_ulp(K, dtype, device):
    """The softmax's weights and the logits' gradient against the exact
    softmax of the exponents z / T - max(z / T), rounded to the dtype as
    every softmax kernel rounds them (torch.softmax's float32 kernel is
    itself up to 3 ulp from that): within 8 ulp of the weight (and of the
    subnormal spacing, for weights that small), as docs/numerics.md promises,
    for logit spreads whose exponentials reach the subnormals."""
    torch.manual_seed(K)
    info = torch.finfo(dtype)
    tol = dict(rtol=8 * info.eps, atol=2 * info.tiny * info.eps)
    for scale in (1.0, 30.0):
        for temperature in (1.0, 0.7):
            z = (scale * torch.randn(300, K, dtype=dtype, device=device)).requires_grad_()
            # Inputs of the logits' dtype, which is then the one the weights are taken in.
            w = weights_of("softmax", z, temperature, dtype=dtype)
            x = z / temperature
            exact = torch.softmax((x - x.max(-1, keepdim=True).values).double(), -1)
            torch.testing.assert_close(w.double(), exact, **tol)
            g = torch.randn(300, K, dtype=dtype, device=device)
            (got,) = torch.autograd.grad(w, z, g)
            (want,) = torch.autograd.grad(exact, z, g.double())
            torch.testing.assert_close(got, want, rtol=8 * info.eps, atol=16 * info.eps * want.abs().max().item())
    inf, nan = float("inf"), float("nan")
    z = torch.tensor([[0.5, -inf, 0.2], [-inf, -inf, -inf], [0.0, nan, 1.0], [inf, 0.0, 0.0]], dtype=dtype, device=device)
    w = weights_of("softmax", z, dtype=dtype)
    assert w[0, 1] == 0 and torch.isfinite(w[0]).all()
    assert torch.isnan(w[1:]).all()


def test_softmax_of_a_lazily_negated_view(device):
    """The imaginary part of a conjugate is a float view whose negation is
    pending (its memory holds +imag): the weights are those of -imag."""
    c = torch.randn(6, 5, dtype=torch.complex64, device=device)
    # The view as a user gets it (strided), and a contiguous one.
    for z in (c.conj().imag, torch._neg_view(c.imag.contiguous())):
        assert z.is_neg()
        w = weights_of("softmax", z, dtype=torch.float32)
        assert_close(w, torch.softmax(-c.imag, -1))


@pytest.mark.parametrize("map", SPARSE_MAPS)
def test_neg_inf_is_a_zero_weight_and_all_neg_inf_is_nan(map, device):
    inf = float("inf")
    z = torch.tensor([[0.5, -inf, 0.2], [-inf, -inf, -inf]], dtype=torch.float64, device=device)
    w = weights_of(map, z)
    assert w[0, 1] == 0 and torch.isfinite(w[0]).all()
    assert_close(w[0], INDEPENDENT[map](z[0]))
    assert torch.isnan(w[1]).all()


@pytest.mark.parametrize("map", MAPS)
@pytest.mark.parametrize("weight_shape", [(4,), (3, 4)])
def test_gradcheck_and_gradgradcheck(map, weight_shape, device):
    # Logits spread apart, so that no two sit at a tie of the sparse maps.
    torch.manual_seed(42)
    base = torch.linspace(-1.5, 1.5, weight_shape[-1], dtype=torch.float64)
    logits = (base[torch.randperm(weight_shape[-1])] + 0.05 * torch.randn(weight_shape, dtype=torch.float64))
    logits = logits.to(device).requires_grad_()
    xs = [torch.randn(3, 5, dtype=torch.float64, device=device, requires_grad=True) for _ in range(4)]
    fn = lambda l, *xs: sp.simplex_weighted_sum(l, list(xs), map=map, temperature=0.8)  # noqa: E731
    assert gradcheck(fn, (logits, *xs))
    assert gradgradcheck(fn, (logits, *xs))


@pytest.mark.parametrize("map", MAPS)
def test_gradients_match_the_reference(map, device):
    torch.manual_seed(43)
    logits = (2 * torch.randn(6, 5, device=device)).requires_grad_()
    xs = [torch.randn(6, 7, device=device, requires_grad=True) for _ in range(5)]
    out = sp.simplex_weighted_sum(logits, xs, map=map, temperature=0.5)
    want = reference.simplex_weighted_sum(logits, xs, map, 0.5)
    assert_close(out, want)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, [logits, *xs], g), torch.autograd.grad(want, [logits, *xs], g)):
        assert_close(a, b)


def test_sparse_maps_give_exact_zero_gradients_off_the_support(device):
    logits = torch.tensor([2.0, 1.5, -1.0, -3.0], device=device, requires_grad=True)
    xs = [torch.randn(5, device=device) for _ in range(4)]
    for map in SPARSE_MAPS:
        (g,) = torch.autograd.grad(sp.simplex_weighted_sum(logits, xs, map=map).sum(), logits)
        assert g[2] == 0 and g[3] == 0


@pytest.mark.parametrize("map", MAPS)
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.skipif(not COMPILED, reason="opcheck tests the compiled ops")
def test_opcheck(map, requires_grad, device):
    torch.manual_seed(44)
    logits = torch.randn(4, 3, dtype=torch.float64, device=device, requires_grad=requires_grad)
    xs = [torch.randn(4, 5, dtype=torch.float64, device=device, requires_grad=requires_grad) for _ in range(3)]
    torch.library.opcheck(torch.ops.simplex_param.simplex_weighted_sum.default, (logits, xs, map, 0.9))


@pytest.mark.parametrize("map", SPARSE_MAPS)
def test_compile_fullgraph(map, device):
    torch._dynamo.reset()
    torch.manual_seed(45)
    logits = torch.randn(8, 4, device=device, requires_grad=True)
    xs = [torch.randn(8, 6, device=device, requires_grad=True) for _ in range(4)]
    f = lambda l, xs: sp.simplex_weighted_sum(l, xs, map=map).tanh()  # noqa: E731
    out, want = torch.compile(f, fullgraph=True)(logits, xs), f(logits, xs)
    assert_close(out, want)
    for a, b in zip(torch.autograd.grad(out.sum(), [logits, *xs]), torch.autograd.grad(want.sum(), [logits, *xs])):
        assert_close(a, b)


def test_identity_and_softmax_agree_with_the_named_functions(device):
    torch.manual_seed(46)
    xs = [torch.randn(3, 4, device=device, dtype=torch.float64) for _ in range(2)]
    w = torch.randn(3, 2, device=device, dtype=torch.float64)
    assert_close(sp.simplex_weighted_sum(w, xs, map="identity"), sp.weighted_sum(w, xs))
    assert_close(sp.simplex_weighted_sum(w, xs, map="identity", temperature=2.0), sp.weighted_sum(w / 2, xs))
    assert_close(sp.simplex_weighted_sum(w, xs), sp.softmax_weighted_sum(w, xs))


# --------------------------------------------------------------------------
# Zero weights: inputs of weight 0 are not read.
# --------------------------------------------------------------------------

def poisoned_inputs(device, shape=(4, 6)):
    """Four inputs; the third holds NaN, which reading it would spread."""
    torch.manual_seed(47)
    xs = [torch.randn(shape, device=device, requires_grad=True) for _ in range(4)]
    xs[2] = torch.full(shape, float("nan"), device=device, requires_grad=True)
    return xs


@pytest.mark.skipif(not COMPILED, reason="the fallback reads every input (docs/numerics.md)")
@pytest.mark.parametrize("weight_shape", [(4,), (4, 4)])
def test_an_input_of_weight_zero_is_not_read(weight_shape, device):
    xs = poisoned_inputs(device)
    w = torch.rand(weight_shape, device=device)
    w[..., 2] = 0
    out = sp.weighted_sum(w, xs)
    assert torch.isfinite(out).all()
    clean = [x if k != 2 else torch.zeros_like(x) for k, x in enumerate(xs)]
    assert_close(out, reference.weighted_sum(w, clean))


@pytest.mark.skipif(not COMPILED, reason="the fallback reads every input (docs/numerics.md)")
@pytest.mark.parametrize("map", SIMPLEX_MAPS)
@pytest.mark.parametrize("weight_shape", [(4,), (4, 4)])
def test_inputs_off_the_support_are_not_read_forward_or_backward(map, weight_shape, device):
    # The third logit is -inf (softmax) or far below the others (sparse maps):
    # its weight is 0, so neither the output nor any gradient may see its NaN.
    xs = poisoned_inputs(device)
    logits = torch.tensor([1.0, 0.5, -float("inf") if map == "softmax" else -9.0, 0.2], device=device)
    logits = logits.expand(weight_shape).clone().requires_grad_()
    out = sp.simplex_weighted_sum(logits, xs, map=map)
    assert torch.isfinite(out).all()
    grads = torch.autograd.grad(out.square().sum(), [logits, *xs])
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.equal(grads[3], torch.zeros_like(xs[2]))
    # The same as with a harmless input there.
    clean = [x.detach() if k != 2 else torch.zeros_like(x) for k, x in enumerate(xs)]
    l2 = logits.detach().clone().requires_grad_()
    want = reference.simplex_weighted_sum(l2, clean, map, 1.0)
    assert_close(out, want)
    (want_l,) = torch.autograd.grad(want.square().sum(), l2)
    assert_close(grads[0], want_l)


def test_weighted_sum_still_differentiates_a_zero_weight(device):
    # For the plain contraction, d out / d w_k = x_k, also where w_k is 0.
    xs = [torch.randn(5, device=device) for _ in range(3)]
    w = torch.tensor([0.5, 0.0, 0.5], device=device, requires_grad=True)
    g = torch.randn(5, device=device)
    (gw,) = torch.autograd.grad(sp.weighted_sum(w, xs), w, g)
    assert_close(gw, torch.stack([(g * x).sum() for x in xs]))


def test_gradient_of_a_zero_weight_input_is_zero_and_unwritten():
    xs = [torch.randn(1000, requires_grad=True) for _ in range(3)]
    w = torch.tensor([0.5, 0.0, 0.5])
    got = torch.autograd.grad(sp.weighted_sum(w, xs).sum(), xs)
    assert torch.equal(got[1], torch.zeros(1000))
    if COMPILED:
        assert got[1].stride() == (0,)  # an expanded 0-D zero: nothing written
    assert_close(got[0], torch.full((1000,), 0.5))


@pytest.mark.skipif(not COMPILED, reason="opcheck tests the compiled ops")
def test_opcheck_backward_skipping_zero_weights(device):
    torch.manual_seed(48)
    grad = torch.randn(4, 5, device=device, dtype=torch.float64)
    w = torch.tensor([[0.5, 0.0, 0.5]] * 4, device=device, dtype=torch.float64)
    xs = [torch.randn(4, 5, device=device, dtype=torch.float64) for _ in range(3)]
    args = (grad, w, xs, True, [True, True, False], True)
    torch.library.opcheck(torch.ops.simplex_param._weighted_sum_backward.default, args)
    grad_w, _ = torch.ops.simplex_param._weighted_sum_backward(*args)
    assert torch.equal(grad_w[:, 1], torch.zeros(4, dtype=torch.float64, device=device))


@pytest.mark.skipif(not COMPILED, reason="the fallback computes 0 * grad (docs/numerics.md)")
@pytest.mark.parametrize("weight_shape", [(3,), (2, 3)])
def test_zero_weight_gradient_is_exactly_zero_even_for_a_nan_grad(weight_shape, device):
    xs = [torch.randn(2, 4, device=device, requires_grad=True) for _ in range(3)]
    w = torch.tensor([0.5, 0.0, 0.5], device=device).expand(weight_shape).contiguous()
    g = torch.randn(2, 4, device=device)
    g[0, 0] = float("nan")
    got = torch.autograd.grad(sp.weighted_sum(w, xs), xs, g)
    assert torch.equal(got[1], torch.zeros(2, 4, device=device))
    assert torch.isnan(got[0][0, 0])


# --------------------------------------------------------------------------
# The three faults entmax's own tests found (issue 24), each with the case
# that showed it.
# --------------------------------------------------------------------------

def test_sparsemax_keeps_float32_accuracy_under_a_shift(device):
    # sparsemax is shift-invariant; the row maximum must be subtracted before
    # the cumulative sums, or float32 loses the small weights.
    torch.manual_seed(70)
    z = 0.01 * torch.randn(4, 8, 64, device=device)
    for shift in (0.0, 1000.0):
        w = maps.apply("sparsemax", z + shift)
        want = sparsemax_by_bisection((z + shift).double() - (z + shift).double().amax(-1, keepdim=True))
        assert (w.double() - want).abs().max() < 1e-6
        assert ((w.sum(-1) - 1).abs() < 1e-6).all()
        assert torch.equal(w > 0, want > 1e-7)
    # The fused op's logit gradients too.
    xs = [torch.randn(4, 8, device=device) for _ in range(64)]
    logits = (z + 1000).requires_grad_()
    (g,) = torch.autograd.grad(sp.simplex_weighted_sum(logits, xs, map="sparsemax").square().sum(), logits)
    l64 = (z + 1000).double().requires_grad_()  # the same float32 logits, in float64
    (g64,) = torch.autograd.grad(
        sp.simplex_weighted_sum(l64, [x.double() for x in xs], map="sparsemax").square().sum(), l64)
    assert (g.double() - g64).abs().max() < 1e-4


def family_vjp(w, g, map):
    """The sparse maps' Jacobian diag(s) - s s^T / sum(s) times g, with
    s = w ** (2 - alpha) on the support (Peters et al., 2019), 0 off it."""
    alpha = {"sparsemax": 2.0, "entmax15": 1.5, "entmax_bisect": maps.DEFAULT_ALPHA}[map]
    s = torch.where(w > 0, w.clamp_min(1e-300) ** (2 - alpha), torch.zeros_like(w))
    return s * g - s * (s * g).sum(-1, keepdim=True) / s.sum(-1, keepdim=True)


def _paths(map):
    """The weights' gradient, given z and the weights' gradient g, by every
    path that differentiates a map."""
    def one_hots(z):
        K = z.shape[-1]
        eye = torch.eye(K, dtype=z.dtype, device=z.device)
        return [eye[k].expand(*z.shape[:-1], K) for k in range(K)]

    def fused(z, g):
        z = z.detach().requires_grad_()
        out = sp.simplex_weighted_sum(z, one_hots(z), map=map)
        return torch.autograd.grad(out, z, g)[0]

    def parametrization(z, g):
        z = z.detach().requires_grad_()
        return torch.autograd.grad(sp.Simplex(map=map)(z), z, g)[0]

    def func_grad(z, g):
        return torch.func.grad(lambda z: (sp.Simplex(map=map)(z) * g).sum())(z)

    def func_fused(z, g):
        return torch.func.grad(lambda z: (sp.simplex_weighted_sum(z, one_hots(z), map=map) * g).sum())(z)

    def grouped(z, g):
        eye = torch.eye(z.shape[-1], dtype=z.dtype, device=z.device)
        rows = z.detach().reshape(-1, z.shape[-1]).requires_grad_()
        outs = sp.grouped_simplex_weighted_sum(rows, [list(eye)] * len(rows), map=map)
        return torch.autograd.grad(outs, rows, list(g.reshape(-1, z.shape[-1])))[0].reshape(z.shape)

    def double_backward(z, g):
        # The gradient taken with create_graph (DARTS' second order): the
        # compiled op's differentiable backward.
        z = z.detach().requires_grad_()
        out = sp.simplex_weighted_sum(z, one_hots(z), map=map)
        return torch.autograd.grad(out, z, g, create_graph=True)[0].detach()

    return {"fused": fused, "Simplex": parametrization, "torch.func": func_grad, "torch.func fused": func_fused,
            "grouped": grouped, "create_graph": double_backward}


@pytest.mark.parametrize("map", SPARSE_MAPS)
def test_no_gradient_passes_through_a_zero_weight_at_the_threshold(map, device):
    # z = [1, 0]: sparsemax gives [1, 0] exactly at its threshold; the gradient
    # is 0 (the support is {0}), not [g0 - g1, g1 - g0].
    z = torch.tensor([1.0, 0.0], dtype=torch.float64, device=device)
    g = torch.tensor([1.0, 3.0], dtype=torch.float64, device=device)
    w = maps.apply(map, z)
    for name, path in _paths(map).items():
        got = path(z, g)
        want = family_vjp(w, g, map) if map != "sparsemax" else torch.zeros_like(z)
        torch.testing.assert_close(got, want, msg=name)
    if map == "sparsemax":
        assert torch.equal(w, torch.tensor([1.0, 0.0], dtype=torch.float64, device=device))


@pytest.mark.parametrize("map", SPARSE_MAPS)
def test_no_nan_gradient_from_neg_inf_logits_or_ties(map, device):
    inf = float("inf")
    rows = torch.tensor([[1.5, -0.5, 1.5, -0.5], [0.0, -inf, 1.0, 2.0], [2.0, 2.0, 2.0, -inf]],
                        dtype=torch.float64, device=device)
    torch.manual_seed(71)
    half_integers = torch.randint(-4, 5, (400, 8), device=device).double() / 2
    g = torch.randn(3, 4, dtype=torch.float64, device=device)
    for name, path in _paths(map).items():
        got = path(rows, g)
        assert torch.isfinite(got).all(), name
        assert (got[1, 1] == 0).item(), name  # a -inf logit gets no gradient
        tied = path(half_integers, torch.randn(400, 8, dtype=torch.float64, device=device))
        assert torch.isfinite(tied).all(), name


# --------------------------------------------------------------------------
# alpha-entmax: the map with a parameter.
# --------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [1.0, 1.2, 1.5, 2.0, 3.0, 10.0])
def test_entmax_bisect_against_its_definition(alpha, device):
    torch.manual_seed(72)
    z = 2 * torch.randn(6, 9, dtype=torch.float64, device=device)
    assert_close(weights_of("entmax_bisect", z, alpha=alpha), entmax_by_bisection(z, alpha))
    # Its special cases are the other maps.
    named = {1.0: "softmax", 1.5: "entmax15", 2.0: "sparsemax"}
    if alpha in named:
        assert_close(maps.apply("entmax_bisect", z, alpha), maps.apply(named[alpha], z))


def test_entmax_bisect_stays_finite_where_entmax_did_not(device):
    torch.manual_seed(73)
    for z, alpha in ((torch.randn(64, 50, device=device), 10.0), (1000 * torch.randn(64, 50, device=device), 3.0)):
        for a in (alpha, torch.full((64, 1), alpha, device=device)):
            w = maps.apply("entmax_bisect", z, a)
            assert torch.isfinite(w).all() and (w >= 0).all()
            assert ((w.sum(-1) - 1).abs() < 1e-6).all()


@pytest.mark.parametrize("alpha", [1.0, 1.3, 2.0, 4.0])
def test_entmax_bisect_alpha_gradient_is_exact(alpha, device):
    torch.manual_seed(74)
    z = torch.randn(3, 6, dtype=torch.float64, device=device, requires_grad=True)
    a = torch.full((3, 1), alpha, dtype=torch.float64, device=device, requires_grad=True)
    g = torch.randn(3, 6, dtype=torch.float64, device=device)
    (ga,) = torch.autograd.grad((maps.apply("entmax_bisect", z, a) * g).sum(), a)
    # Central differences (one-sided at alpha = 1, the map's edge).
    h = 1e-5
    f = lambda a: (maps.apply("entmax_bisect", z.detach(), a) * g).sum(-1, keepdim=True)  # noqa: E731
    fd = (f(a.detach() + h) - f(a.detach())) / h if alpha == 1.0 else (f(a.detach() + h) - f(a.detach() - h)) / (2 * h)
    assert (ga - fd).abs().max() < (1e-4 if alpha == 1.0 else 1e-7)
    if alpha > 1:
        assert gradcheck(lambda z, a: maps.apply("entmax_bisect", z, a), (z, a))


def test_alpha_errors_name_the_argument():
    xs = [torch.ones(2)] * 3
    with pytest.raises(ValueError, match="^alpha must be a finite number >= 1, got 0.5$"):
        sp.simplex_weighted_sum(torch.zeros(3), xs, map="entmax_bisect", alpha=0.5)
    with pytest.raises(ValueError, match="^alpha must be a finite number >= 1, got 0.75$"):
        sp.simplex_weighted_sum(torch.zeros(3), xs, map="entmax_bisect", alpha=torch.tensor([0.75]))
    with pytest.raises(ValueError, match="^alpha was given, but map 'softmax' has no parameter alpha$"):
        sp.simplex_weighted_sum(torch.zeros(3), xs, alpha=1.5)
    with pytest.raises(TypeError, match="alpha must be a float or a floating tensor, got str"):
        sp.simplex_weighted_sum(torch.zeros(3), xs, map="entmax_bisect", alpha="1.5")
    if COMPILED:  # the compiled op raises the same errors
        with pytest.raises(ValueError, match="^alpha must be a finite number >= 1, got 0.5$"):
            torch.ops.simplex_param.simplex_weighted_sum(torch.zeros(3), xs, "entmax_bisect", 1.0, 0.5)
        with pytest.raises(ValueError, match="^alpha was given, but map 'sparsemax' has no parameter alpha$"):
            torch.ops.simplex_param.simplex_weighted_sum(torch.zeros(3), xs, "sparsemax", 1.0, 1.5)


def test_a_learned_alpha_stays_above_one_and_learns(device):
    torch.manual_seed(75)
    m = sp.simplex(nn.Linear(6, 4).to(device), "weight", map="entmax_bisect", alpha=1.2, learn_alpha=True)
    p = m.parametrizations.weight[0]
    assert_close(p.alpha, torch.tensor(1.2, device=device))
    # Push alpha down hard: 1 + softplus never reaches 1, and nothing is NaN.
    opt = torch.optim.SGD([p.alpha_pre], lr=50.0)
    for _ in range(20):
        opt.zero_grad()
        (-p.alpha).backward()  # a loss that wants alpha smaller
        p.alpha_pre.grad.neg_()
        opt.step()
        assert torch.isfinite(m.weight).all() and p.alpha.item() > 1
    # A loss through the weights gives alpha a gradient.
    opt.zero_grad()
    m(torch.randn(3, 6, device=device)).square().sum().backward()
    assert p.alpha_pre.grad is not None and torch.isfinite(p.alpha_pre.grad)


# --------------------------------------------------------------------------
# Every map through every entry point, from the registry.
# --------------------------------------------------------------------------

@pytest.mark.parametrize("map", SIMPLEX_MAPS)
def test_every_entry_point_gives_the_maps_weights(map, device):
    torch.manual_seed(76)
    opts = {"alpha": 1.7} if maps.MAPS[map].has_alpha else {}
    z = torch.tensor([1.0, 0.7, -1.2, 0.3], device=device)
    want = maps.apply(map, z / 0.5, opts.get("alpha"))
    xs = [torch.randn(3, 2, device=device) for _ in range(4)]
    mix = sum(w * x for w, x in zip(want, xs))
    assert_close(sp.simplex_weighted_sum(z, xs, map=map, temperature=0.5, **opts), mix)
    (a, b) = sp.grouped_simplex_weighted_sum(torch.stack([z, z]), [xs, xs], map=map, temperature=0.5, **opts)
    assert_close(a, mix)
    assert_close(b, mix)
    assert_close(sp.Simplex(map=map, temperature=0.5, **opts)(z), want)
    m = sp.simplex(nn.Linear(4, 1).to(device), map=map, temperature=0.5, **opts)
    m.parametrizations.weight.original.data.copy_(z[None])
    assert_close(m.weight[0], want)
    assert_close(sp.combine(m, "weight", [x[None] for x in xs])[0], mix)
    for layer in (sp.SimplexFusion(4, map=map, temperature=0.5, **opts), sp.LazySimplexFusion(map=map, temperature=0.5, **opts)):
        layer = layer.to(device)
        layer(xs)  # materialises the lazy one
        layer.parametrizations.weight.original.data.copy_(z)
        assert_close(layer(xs), mix)
    ops = [nn.Identity(), nn.Tanh(), nn.Sigmoid(), nn.Softsign()]
    mixed = sp.MixedOp(ops, map=map, temperature=0.5, **opts)
    x = torch.randn(5, device=device)
    assert_close(mixed(x, z), sum(w * op(x) for w, op in zip(want, ops)))
    members = [{"weight": x} for x in xs]
    soup = sp.LearnedSoup(members, template=_Holder(xs[0]), map=map, temperature=0.5, **opts).to(device)
    soup.parametrizations.weight.original.data.copy_(z[None])
    assert_close(soup.merged_state_dict()["weight"], mix)


class _Holder(nn.Module):
    def __init__(self, like):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros_like(like))

    def forward(self, x):
        return x * self.weight
