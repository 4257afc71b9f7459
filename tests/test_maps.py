"""The weight maps of the registry (csrc/maps.cpp, reference.MAPS), through
simplex_weighted_sum: values against independent references, the simplex
properties, gradients to second order, opcheck and torch.compile."""
import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import simplex_param as sp
from simplex_param import reference

from conftest import COMPILED, assert_close

MAPS = ["softmax", "identity", "sparsemax", "entmax15"]
SIMPLEX_MAPS = ["softmax", "sparsemax", "entmax15"]


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


INDEPENDENT = {
    "softmax": lambda z: torch.softmax(z, -1),
    "identity": lambda z: z,
    "sparsemax": sparsemax_by_bisection,
    "entmax15": entmax15_by_bisection,
}


def weights_of(map, logits, temperature=1.0):
    """The weights a map gives, read through the contraction: w[..., k] is the
    output for inputs that are the one-hot vectors e_k."""
    K = logits.shape[-1]
    eye = torch.eye(K, dtype=torch.float64, device=logits.device)
    xs = [eye[k].expand(*logits.shape[:-1], K) for k in range(K)]
    return sp.simplex_weighted_sum(logits, xs, map=map, temperature=temperature)


@pytest.mark.parametrize("map", MAPS)
@pytest.mark.parametrize("shape", [(7,), (5, 7), (2, 3, 4)])
def test_against_independent_reference(map, shape, device):
    torch.manual_seed(40)
    z = 3 * torch.randn(shape, dtype=torch.float64, device=device)
    got = weights_of(map, z, temperature=0.7)
    assert_close(got, INDEPENDENT[map](z / 0.7))
    assert_close(reference.MAPS[map](z, 0.7), INDEPENDENT[map](z / 0.7))


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


@pytest.mark.parametrize("map", ["sparsemax", "entmax15"])
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
    for map in ("sparsemax", "entmax15"):
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


@pytest.mark.parametrize("map", ["sparsemax", "entmax15"])
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
@pytest.mark.parametrize("map", ["softmax", "sparsemax", "entmax15"])
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
