"""sp.sinkhorn and sp.Birkhoff, checked against mHC's Sinkhorn written out
from its definition (TileLang's examples/deepseek_mhc reference)."""
import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.nn.utils import parametrize

import simplex_param as sp


def oracle(x, iters, eps):
    """mHC's sinkhorn, step by step, from its definition."""
    x = x.softmax(-1) + eps
    x = x / (x.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        x = x / (x.sum(-1, keepdim=True) + eps)
        x = x / (x.sum(-2, keepdim=True) + eps)
    return x


BACKWARDS = ["unroll", "recompute", "implicit"]


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("iters", [1, 3, 20])
def test_matches_the_definition(backward, iters):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(sp.sinkhorn(x, iters=iters, backward=backward), oracle(x, iters, 1e-6),
                               rtol=0, atol=1e-15)


def test_doubly_stochastic_at_the_default():
    torch.manual_seed(0)
    h = sp.sinkhorn(torch.randn(64, 4, 4))
    torch.testing.assert_close(h.sum(-2), torch.ones(64, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(h.sum(-1), torch.ones(64, 4), atol=1e-3, rtol=0)
    assert bool((h > 0).all())


def test_softmax_subtracts_the_row_maximum():
    # Logits of 1000 overflow exp() without the row maximum subtracted.
    x = torch.tensor([[1000.0, 999.0], [0.0, 1.0]])
    h = sp.sinkhorn(x)
    assert bool(torch.isfinite(h).all())
    torch.testing.assert_close(h, oracle(x.double(), 20, 1e-6).float())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_logits_are_computed_in_float32(dtype):
    torch.manual_seed(0)
    x = torch.randn(8, 4, 4).to(dtype)
    h = sp.sinkhorn(x)
    assert h.dtype == dtype
    assert torch.equal(h, oracle(x.float(), 20, 1e-6).to(dtype))


def test_float64_stays_float64():
    x = torch.randn(4, 4, dtype=torch.float64)
    assert sp.sinkhorn(x).dtype == torch.float64
    assert torch.equal(sp.sinkhorn(x), oracle(x, 20, 1e-6))


@pytest.mark.parametrize("iters", [1, 7])
def test_recompute_gradients_are_bitwise_those_of_unroll(iters):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 5, requires_grad=True)
    g = torch.randn(3, 5, 5)
    want = torch.autograd.grad(sp.sinkhorn(x, iters=iters, backward="unroll"), x, g)[0]
    got = torch.autograd.grad(sp.sinkhorn(x, iters=iters, backward="recompute"), x, g)[0]
    assert torch.equal(got, want)


def test_bfloat16_gradients_of_recompute_and_unroll_agree_bitwise():
    torch.manual_seed(0)
    x = torch.randn(6, 4, 4).bfloat16().requires_grad_()
    g = torch.randn(6, 4, 4).bfloat16()
    want = torch.autograd.grad(sp.sinkhorn(x, backward="unroll"), x, g)[0]
    got = torch.autograd.grad(sp.sinkhorn(x, backward="recompute"), x, g)[0]
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


def implicit_error(iters):
    torch.manual_seed(0)
    x = (2 * torch.randn(16, 4, 4, dtype=torch.float64)).requires_grad_()
    g = torch.randn(16, 4, 4, dtype=torch.float64)
    want = torch.autograd.grad(sp.sinkhorn(x, iters=iters, backward="unroll"), x, g)[0]
    got = torch.autograd.grad(sp.sinkhorn(x, iters=iters, backward="implicit"), x, g)[0]
    return float((got - want).abs().max() / want.abs().max())


def test_implicit_error_shrinks_with_iters():
    e10, e40 = implicit_error(10), implicit_error(40)
    assert e40 < e10 / 10, (e10, e40)
    assert e40 < 1e-3  # measured: 4.6e-2 at 10, 1.1e-2 at 20, 4.5e-4 at 40, 1.7e-6 (the eps floor) from 80


def saved_bytes(backward, iters):
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    x = torch.randn(32, 4, 4, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = sp.sinkhorn(x, iters=iters, backward=backward)
    y.sum().backward()
    return total


@pytest.mark.parametrize("backward", ["recompute", "implicit"])
def test_saved_memory_does_not_grow_with_iters(backward):
    assert saved_bytes(backward, 20) <= 1.2 * saved_bytes(backward, 1)
    assert saved_bytes(backward, 20) > 0


def test_unroll_saves_every_iterate():
    assert saved_bytes("unroll", 20) > 10 * saved_bytes("unroll", 1)


@pytest.mark.parametrize("backward", BACKWARDS)
def test_gradcheck(backward):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    # "implicit" is the derivative of the converged projection: let it converge.
    iters = 200 if backward == "implicit" else 5
    kwargs = dict(atol=1e-5) if backward == "implicit" else {}
    assert gradcheck(lambda t: sp.sinkhorn(t, iters=iters, eps=0.0 if backward == "implicit" else 1e-6,
                                           backward=backward), (x,), **kwargs)


@pytest.mark.parametrize("backward", ["unroll", "recompute"])
def test_gradgradcheck(backward):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert gradgradcheck(lambda t: sp.sinkhorn(t, iters=4, backward=backward), (x,))


@pytest.mark.parametrize("backward", BACKWARDS)
def test_compile_fullgraph(backward):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 4, requires_grad=True)
    f = torch.compile(lambda t: sp.sinkhorn(t, backward=backward).square().sum(), fullgraph=True)
    f(x).backward()
    xr = x.detach().requires_grad_()
    sp.sinkhorn(xr, backward=backward).square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backward", BACKWARDS)
def test_vmap_and_grad(backward):
    torch.manual_seed(0)
    x = torch.randn(5, 4, 4, dtype=torch.float64)
    f = lambda t: sp.sinkhorn(t, iters=30, backward=backward)[0].square().sum()  # noqa: E731
    got = torch.func.vmap(torch.func.grad(f))(x)
    want = torch.stack([torch.func.grad(lambda t: oracle(t, 30, 1e-6)[0].square().sum())(t) for t in x])
    torch.testing.assert_close(got, want, atol=1e-4 if backward == "implicit" else 1e-12, rtol=0)


@pytest.mark.parametrize("bad, match", [
    (dict(logits=torch.zeros(3, 4)), "logits must have square last two dimensions"),
    (dict(logits=torch.zeros(4)), "logits must have square last two dimensions"),
    (dict(iters=0), "iters must be an int >= 1, got 0"),
    (dict(iters=2.0), "iters must be an int >= 1, got float"),
    (dict(eps=-1e-6), "eps must be a finite float >= 0"),
    (dict(backward="adjoint"), "backward must be one of 'unroll', 'recompute', 'implicit', got 'adjoint'"),
])
def test_errors_name_the_argument(bad, match):
    args = dict(logits=torch.zeros(3, 3), iters=20, eps=1e-6, backward="recompute") | bad
    logits = args.pop("logits")
    with pytest.raises((ValueError, TypeError), match=match):
        sp.sinkhorn(logits, **args)


# --- Birkhoff ---------------------------------------------------------------

def test_birkhoff_gives_doubly_stochastic_weights_and_trains():
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 4, bias=False)
    parametrize.register_parametrization(m, "weight", sp.Birkhoff())
    w = m.weight
    torch.testing.assert_close(w.sum(-2), torch.ones(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(w.sum(-1), torch.ones(4), atol=1e-3, rtol=0)
    m(torch.randn(2, 4)).sum().backward()
    assert m.parametrizations.weight.original.grad is not None


def test_birkhoff_fresh_values_are_logits():
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 3, bias=False)
    before = m.weight.detach().clone()
    parametrize.register_parametrization(m, "weight", sp.Birkhoff())
    assert torch.equal(m.parametrizations.weight.original, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_birkhoff_right_inverse_reproduces_a_doubly_stochastic_matrix(dtype):
    torch.manual_seed(0)
    # A convex combination of permutation matrices (Birkhoff-von Neumann), all entries positive.
    n = 4
    perms = [torch.eye(n)[torch.randperm(n)] for _ in range(6)] + [torch.full((n, n), 1.0 / n)]
    c = torch.softmax(torch.randn(len(perms)), 0)
    target = sum(ci * p for ci, p in zip(c, perms)).to(dtype)
    target = target.expand(2, n, n).clone()
    m = torch.nn.Module()
    m.h = torch.nn.Parameter(torch.randn(2, n, n, dtype=dtype))
    parametrize.register_parametrization(m, "h", sp.Birkhoff())
    m.h = target
    torch.testing.assert_close(m.h, target, atol=1e-5, rtol=0)


def test_birkhoff_rejects_non_finite_and_non_square():
    m = torch.nn.Module()
    m.h = torch.nn.Parameter(torch.randn(3, 3))
    parametrize.register_parametrization(m, "h", sp.Birkhoff())
    with pytest.raises(ValueError, match="NaN or inf"):
        m.h = torch.full((3, 3), float("nan"))
    m2 = torch.nn.Module()
    m2.h = torch.nn.Parameter(torch.randn(3, 2))
    with pytest.raises(ValueError, match="square last two dimensions"):
        parametrize.register_parametrization(m2, "h", sp.Birkhoff())


def test_birkhoff_summary_reports_row_and_column_deviation():
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 4, bias=False)
    parametrize.register_parametrization(m, "weight", sp.Birkhoff(iters=3))
    (record,) = sp.summary(m)
    w = m.weight.detach().double()
    assert record.kind == "Birkhoff"
    assert record.row_error == pytest.approx(float((w.sum(-1) - 1).abs().max()))
    assert record.col_error == pytest.approx(float((w.sum(-2) - 1).abs().max()))
    assert "rows" in str(sp.summary(m)) and "cols" in str(sp.summary(m))


def test_implicit_forward_mode_is_the_converged_derivative():
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(0)
    x = torch.randn(3, 4, 4, dtype=torch.float64)
    t = torch.randn(3, 4, 4, dtype=torch.float64)
    _, want = torch.func.jvp(lambda z: oracle(z, 300, 0.0), (x,), (t,))
    with fwAD.dual_level():
        y = sp.sinkhorn(fwAD.make_dual(x.clone().requires_grad_(), t), iters=300, eps=0.0, backward="implicit")
        got = fwAD.unpack_dual(y).tangent
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


def test_birkhoff_weight_logger_csv_reads_back_equal(tmp_path):
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 4, bias=False)
    parametrize.register_parametrization(m, "weight", sp.Birkhoff(iters=3))
    logger = sp.WeightLogger(m, csv=tmp_path / "w.csv")
    with torch.no_grad():
        m.parametrizations.weight.original.add_(torch.randn(4, 4))
    logger.step()
    assert logger.history[-1][1][0].row_error is not None
    assert sp.WeightLogger.read_csv(tmp_path / "w.csv") == logger.history
