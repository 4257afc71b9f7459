"""The Simplex parametrization, simplex() and combine(): values, right_inverse,
the parametrize toolbox (cached, remove, state_dict, deepcopy, compile,
functional_call, stacking), validation and the docstring examples."""
import copy
import doctest
import itertools

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrize

import simplex_param as sp
from simplex_param import ops, parametrization, reference

from conftest import DEVICES, DTYPES, assert_close

DIMS = [-1, 0, 1, None]


def softmax64(X, dim, temperature=1.0):
    """The oracle: softmax in float64, all entries as one distribution for dim=None."""
    X = X.double() / temperature
    if dim is None:
        return torch.softmax(X.reshape(-1), 0).reshape(X.shape)
    return torch.softmax(X, dim)


def holder(value):
    """A bare module with one parameter `w`."""
    m = nn.Module()
    m.w = nn.Parameter(value)
    return m


def random_probs(shape, dim, dtype, device, zeros=False):
    P = softmax64(3 * torch.randn(shape, dtype=torch.float64, device=device), dim)
    if zeros:
        P = P * (torch.rand(shape, device=device) > 0.3)
        P = P / (P.sum() if dim is None else P.sum(dim, keepdim=True)).clamp_min(1e-300)
    return P.to(dtype)


# --------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,dim,device", list(itertools.product(DTYPES, DIMS, DEVICES)))
def test_forward_is_softmax(dtype, dim, device):
    torch.manual_seed(0)
    for T in (1.0, 0.25, 4.0):
        X = torch.randn(4, 5, dtype=dtype, device=device)
        W = sp.Simplex(dim=dim, temperature=T)(X)
        assert W.dtype == dtype and W.shape == X.shape
        assert_close(W, softmax64(X, dim, T).to(dtype))
        sums = W.double().sum() if dim is None else W.double().sum(dim)
        assert_close(sums, torch.ones_like(sums), dtype)
        assert bool((W >= 0).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_computed_in_float32(dtype):
    X = (10 * torch.randn(7, 33)).to(dtype)
    W = sp.Simplex(dim=1, temperature=0.7)(X)
    assert W.dtype == dtype
    assert torch.equal(W, torch.softmax(X.float() / 0.7, 1).to(dtype))


def test_scalar_and_empty():
    assert sp.Simplex()(torch.tensor(3.0)).item() == 1.0
    assert sp.Simplex(dim=None)(torch.randn(2, 3)).sum().item() == pytest.approx(1.0)
    assert sp.Simplex(dim=1)(torch.randn(0, 3)).shape == (0, 3)


def test_extra_repr():
    assert repr(sp.Simplex(dim=None, temperature=0.5)) == "Simplex(dim=None, temperature=0.5)"


# --------------------------------------------------------------------------
# right_inverse: registration and assignment
# --------------------------------------------------------------------------

def test_registration_keeps_values_as_pre_weights():
    torch.manual_seed(0)
    m = nn.Linear(5, 3)
    param = m.weight
    before = m.weight.detach().clone()
    parametrize.register_parametrization(m, "weight", sp.Simplex(dim=1))
    original = m.parametrizations.weight.original
    assert original is param  # an optimizer built before registration keeps working
    assert torch.equal(original, before)
    assert_close(m.weight, torch.softmax(before, 1))


@pytest.mark.parametrize(
    "dtype,dim,zeros,T",
    [(d, dim, z, T) for d in DTYPES for dim in DIMS for z in (False, True) for T in (1.0, 0.5, 3.0)],
)
def test_probabilities_round_trip(dtype, dim, zeros, T):
    torch.manual_seed(1)
    m = holder(torch.randn(4, 6, dtype=dtype))
    sp.simplex(m, "w", dim=dim, temperature=T)
    P = random_probs((4, 6), dim, dtype, "cpu", zeros=zeros)
    m.w = P
    Z = m.parametrizations.w.original
    assert Z.dtype == dtype and bool(torch.isfinite(Z).all())
    # Centred pre-weights.
    mean = Z.double().mean() if dim is None else Z.double().mean(dim)
    assert mean.abs().max().item() <= 1e-2 * T * (Z.double().abs().max().item() + 1)
    assert_close(m.w, P)


def test_round_trip_exact_zero_stays_negligible():
    m = holder(torch.zeros(3))
    sp.simplex(m, "w")
    m.w = torch.tensor([0.0, 0.25, 0.75])
    w = m.w.detach()
    assert 0 < w[0].item() < 1e-13
    assert_close(w, torch.tensor([0.0, 0.25, 0.75]))


def test_assignment_of_pre_weights_is_unchanged_and_not_aliased():
    m = holder(torch.zeros(2, 3))
    sp.simplex(m, "w", dim=1)
    Z = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.3, 0.3]])  # second row sums to 0.9: not probabilities
    m.w = Z
    assert torch.equal(m.parametrizations.w.original, Z)
    Z.add_(1.0)
    assert not torch.equal(m.parametrizations.w.original, Z)
    assert_close(m.w, torch.softmax(Z - 1.0, 1))


def test_probabilities_along_another_dim_are_pre_weights():
    P = torch.tensor([[0.2, 0.5], [0.8, 0.5]])  # columns sum to one, rows do not
    m = holder(torch.zeros(2, 2))
    sp.simplex(m, "w", dim=1)
    m.w = P
    assert torch.equal(m.parametrizations.w.original, P)
    sp.simplex(holder(torch.zeros(2, 2)), "w", dim=0).w = P  # along dim 0 they are probabilities


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_raise(bad):
    V = torch.tensor([0.1, bad, 0.3])
    with pytest.raises(ValueError, match="NaN or inf"):
        sp.simplex(holder(V.clone()), "w")
    m = sp.simplex(holder(torch.zeros(3)), "w")
    with pytest.raises(ValueError, match="NaN or inf"):
        m.w = V
    assert torch.equal(m.parametrizations.w.original, torch.zeros(3))


def test_unrepresentable_pre_weights_raise():
    m = sp.simplex(holder(torch.zeros(2, dtype=torch.float16)), "w", temperature=1e5)
    with pytest.raises(ValueError, match="beyond the range of torch.float16"):
        m.w = torch.tensor([1e-3, 1 - 1e-3], dtype=torch.float16)


def test_meta_device_registration():
    m = sp.simplex(nn.Linear(3, 2, device="meta"), dim=1)
    assert m.weight.device.type == "meta" and m.weight.shape == (2, 3)


def test_training_matches_hand_written_softmax():
    """The parametrization is the classic raw-parameter-plus-softmax recipe, step for step."""
    torch.manual_seed(2)
    Z0 = torch.randn(3, 4, dtype=torch.float64)
    x = torch.randn(8, 4, dtype=torch.float64)
    m = sp.simplex(holder(Z0.clone()), "w", dim=1, temperature=0.5)
    raw = Z0.clone().requires_grad_()
    opt_m = torch.optim.SGD(m.parameters(), lr=0.3, momentum=0.9)
    opt_r = torch.optim.SGD([raw], lr=0.3, momentum=0.9)
    for _ in range(5):
        for opt, W in ((opt_m, lambda: m.w), (opt_r, lambda: torch.softmax(raw / 0.5, 1))):
            opt.zero_grad()
            (x @ W().T).sin().sum().backward()
            opt.step()
    assert_close(m.parametrizations.w.original, raw.detach())
    assert_close(m.w.sum(1), torch.ones(3, dtype=torch.float64))


# --------------------------------------------------------------------------
# The parametrize toolbox
# --------------------------------------------------------------------------

def test_cached():
    torch.manual_seed(3)
    m = sp.simplex(nn.Linear(4, 3), dim=1)
    x = torch.randn(5, 4)
    assert m.weight is not m.weight
    with parametrize.cached():
        assert m.weight is m.weight
        out = m(x) + m(2 * x)
    out.sum().backward()
    grad_cached = m.parametrizations.weight.original.grad.clone()
    m.zero_grad()
    (m(x) + m(2 * x)).sum().backward()
    assert_close(grad_cached, m.parametrizations.weight.original.grad)


@pytest.mark.parametrize("leave", [True, False])
def test_remove_parametrizations(leave):
    torch.manual_seed(4)
    m = sp.simplex(nn.Linear(4, 3), dim=1, temperature=2.0)
    probs = m.weight.detach().clone()
    pre = m.parametrizations.weight.original.detach().clone()
    parametrize.remove_parametrizations(m, "weight", leave_parametrized=leave)
    assert not parametrize.is_parametrized(m)
    assert isinstance(m.weight, nn.Parameter)
    assert torch.equal(m.weight.detach(), probs if leave else pre)


def test_state_dict_round_trip():
    torch.manual_seed(5)
    a = sp.simplex(nn.Linear(4, 3), dim=1)
    a.weight = torch.full((3, 4), 0.25)
    a.weight = random_probs((3, 4), 1, torch.float32, "cpu")
    sd = a.state_dict()
    assert "parametrizations.weight.original" in sd
    b = sp.simplex(nn.Linear(4, 3), dim=1)
    b.load_state_dict(sd)
    assert torch.equal(b.weight, a.weight)
    assert torch.equal(b.bias, a.bias)


def test_deepcopy():
    torch.manual_seed(6)
    a = sp.simplex(nn.Linear(4, 3), dim=1, temperature=0.5)
    b = copy.deepcopy(a)
    assert parametrize.is_parametrized(b, "weight")
    assert b.parametrizations.weight[0].temperature == 0.5
    assert torch.equal(b.weight, a.weight)
    with torch.no_grad():
        b.parametrizations.weight.original.add_(1.0)
    assert not torch.equal(b.parametrizations.weight.original, a.parametrizations.weight.original)


class Mixer(nn.Module):
    """A 1-D simplex mix of K inputs followed by a row-stochastic linear map."""

    def __init__(self, K=3, n=4, temperature=1.0):
        super().__init__()
        self.mix = nn.Parameter(torch.randn(K))
        self.proj = nn.Linear(n, 2)
        sp.simplex(self, "mix", temperature=temperature)
        sp.simplex(self.proj, dim=1)

    def forward(self, xs):
        return self.proj(sp.combine(self, "mix", xs))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile(device):
    torch._dynamo.reset()
    torch.manual_seed(7)
    m = Mixer(temperature=0.5).to(device)
    xs = [torch.randn(6, 4, device=device) for _ in range(3)]
    compiled = torch.compile(m, fullgraph=True)
    out = compiled(xs)
    expected = m(xs)
    assert_close(out, expected)
    got = torch.autograd.grad(out.square().sum(), list(m.parameters()))
    want = torch.autograd.grad(expected.square().sum(), list(m.parameters()))
    for a, b in zip(got, want):
        assert_close(a, b)


def test_functional_call():
    torch.manual_seed(8)
    m = Mixer()
    xs = [torch.randn(5, 4) for _ in range(3)]
    mix = torch.randn(3, requires_grad=True)
    W = torch.randn(2, 4, requires_grad=True)
    params = {"parametrizations.mix.original": mix, "proj.parametrizations.weight.original": W}
    out = functional_call(m, params, (xs,))
    h = sum(p * x for p, x in zip(torch.softmax(mix, 0), xs))
    expected = torch.nn.functional.linear(h, torch.softmax(W, 1), m.proj.bias)
    assert_close(out, expected)
    got = torch.autograd.grad(out.sum(), [mix, W])
    want = torch.autograd.grad(expected.sum(), [mix, W])
    for a, b in zip(got, want):
        assert_close(a, b)
    # The module's own parameters are untouched and back in place.
    assert m.parametrizations.mix.original is not mix


class Scale(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, X):
        return self.c * X

    def right_inverse(self, Y):
        return Y / self.c


class Flip(nn.Module):
    def forward(self, X):
        return X.flip(-1)

    def right_inverse(self, Y):
        return Y.flip(-1)


def test_stacking_simplex_after_another():
    Z = torch.tensor([0.5, -1.0, 2.0])
    m = holder(Z.clone())
    parametrize.register_parametrization(m, "w", Scale(2.0))  # stores Z / 2
    sp.simplex(m, "w")  # keeps the stored tensor: w = softmax(2 * (Z / 2))
    assert torch.equal(m.parametrizations.w.original, Z / 2)
    assert_close(m.w, torch.softmax(Z, 0))
    P = torch.tensor([0.1, 0.6, 0.3])
    m.w = P
    assert_close(m.w, P)


def test_stacking_another_after_simplex():
    Z = torch.tensor([0.5, -1.0, 2.0])
    m = sp.simplex(holder(Z.clone()), "w")
    parametrize.register_parametrization(m, "w", Flip())
    assert_close(m.w, torch.softmax(Z, 0).flip(0))
    P = torch.tensor([0.1, 0.6, 0.3])
    m.w = P
    assert_close(m.w, P)


# --------------------------------------------------------------------------
# combine
# --------------------------------------------------------------------------

@pytest.fixture
def spy(monkeypatch):
    """Records which operator combine() called, and with which weights."""
    calls = []
    for name in ("simplex_weighted_sum", "weighted_sum"):
        fn = getattr(ops, name)

        def wrapped(w, inputs, *args, _fn=fn, _name=name, **kwargs):
            calls.append((_name, w))
            return _fn(w, inputs, *args, **kwargs)

        monkeypatch.setattr(ops, name, wrapped)
    return calls


@pytest.mark.parametrize(
    "dtype,dim,T,device", list(itertools.product(DTYPES, [-1, 0, None], [1.0, 0.3], DEVICES))
)
def test_combine_fused_and_unfused_agree(dtype, dim, T, device, spy):
    torch.manual_seed(9)
    Z = torch.randn(4, dtype=dtype, device=device)
    fused = sp.simplex(holder(Z.clone()), "w", dim=dim, temperature=T)
    unfused = sp.simplex(holder(Z.clone()), "w", dim=dim, temperature=T)
    parametrize.register_parametrization(unfused, "w", Scale(1.0))  # two parametrizations: not fusable
    xs = [torch.randn(3, 5, dtype=dtype, device=device, requires_grad=True) for _ in range(4)]

    out_f = sp.combine(fused, "w", xs)
    assert spy[-1][0] == "simplex_weighted_sum" and spy[-1][1] is fused.parametrizations.w.original
    out_u = sp.combine(unfused, "w", xs)
    assert spy[-1][0] == "weighted_sum"
    assert_close(out_f, out_u)
    assert_close(out_f, sum(p * x.double() for p, x in zip(softmax64(Z, dim, T), xs)).to(dtype))

    g = torch.randn_like(out_f)
    grads_f = torch.autograd.grad(out_f, [fused.parametrizations.w.original, *xs], g)
    grads_u = torch.autograd.grad(out_u, [unfused.parametrizations.w.original, *xs], g)
    for a, b in zip(grads_f, grads_u):
        assert_close(a, b)


def test_combine_unparametrized_and_matrix_weights(spy):
    xs = torch.randn(3, 2)
    m = holder(torch.tensor([0.5, 1.0, -2.0]))
    assert_close(sp.combine(m, "w", xs), sp.weighted_sum(m.w, xs))
    assert spy[-1][0] == "weighted_sum"
    m2 = sp.simplex(holder(torch.randn(3, 3)), "w", dim=0)
    with pytest.raises(ValueError, match=r"weights has shape \[3, 3\], but its leading dimensions must be"):
        sp.combine(m2, "w", xs)


def test_combine_under_cached(spy):
    torch.manual_seed(10)
    xs = [torch.randn(4) for _ in range(3)]
    fused = sp.simplex(holder(torch.randn(3)), "w")
    unfused = sp.simplex(holder(fused.parametrizations.w.original.detach().clone()), "w")
    parametrize.register_parametrization(unfused, "w", Scale(1.0))
    with parametrize.cached():
        w = unfused.w
        out_u = sp.combine(unfused, "w", xs)
        assert spy[-1] == ("weighted_sum", w)  # the cached tensor itself
        out_f = sp.combine(fused, "w", xs)
        assert spy[-1][0] == "simplex_weighted_sum"
    assert_close(out_f, out_u)


def test_combine_bad_arguments():
    with pytest.raises(TypeError, match="module must be an nn.Module"):
        sp.combine(torch.zeros(3), "w", [torch.zeros(1)])
    with pytest.raises(ValueError, match="no parameter or buffer with name 'v'"):
        sp.combine(holder(torch.zeros(3)), "v", [torch.zeros(1)] * 3)
    with pytest.raises(ValueError, match="has 3 entries in its last dimension but inputs has 2 tensors"):
        sp.combine(sp.simplex(holder(torch.zeros(3)), "w"), "w", [torch.zeros(1)] * 2)


# --------------------------------------------------------------------------
# Validation, at construction or registration
# --------------------------------------------------------------------------

def test_simplex_returns_module_and_validates():
    m = nn.Linear(3, 2)
    assert sp.simplex(m, dim=1) is m
    assert isinstance(m.parametrizations.weight[0], sp.Simplex)


def test_dim_out_of_range_raises_pytorch_index_error():
    with pytest.raises(IndexError) as torch_error:
        torch.softmax(torch.zeros(2, 3), dim=5)
    expected = "Dimension out of range (expected to be in range of [-2, 1], but got 5)"
    assert str(torch_error.value) == expected
    with pytest.raises(IndexError) as ours:
        sp.simplex(nn.Linear(3, 2), dim=5)
    assert str(ours.value) == expected
    m = nn.Linear(3, 2)
    with pytest.raises(IndexError) as direct:
        parametrize.register_parametrization(m, "weight", sp.Simplex(dim=-3))
    assert str(direct.value) == "Dimension out of range (expected to be in range of [-2, 1], but got -3)"
    assert not parametrize.is_parametrized(m)


@pytest.mark.parametrize("T", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_temperature(T):
    with pytest.raises(ValueError, match="temperature must be a positive finite number"):
        sp.Simplex(temperature=T)
    with pytest.raises(ValueError, match="temperature must be a positive finite number"):
        sp.simplex(nn.Linear(3, 2), temperature=T)


def test_bad_types():
    with pytest.raises(TypeError, match="temperature must be a float"):
        sp.Simplex(temperature="1")
    with pytest.raises(TypeError, match="dim must be an int or None"):
        sp.Simplex(dim=1.0)
    with pytest.raises(TypeError, match="module must be an nn.Module"):
        sp.simplex(torch.zeros(3))


def test_missing_name():
    with pytest.raises(ValueError, match="'Linear' has no parameter or buffer with name 'weights'"):
        sp.simplex(nn.Linear(3, 2), "weights")


def test_non_floating_tensor():
    m = nn.Module()
    m.register_buffer("counts", torch.ones(3, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"module.counts must have a floating dtype, got torch.int64"):
        sp.simplex(m, "counts")
    with pytest.raises(TypeError, match="must have a floating dtype, got torch.int64"):
        parametrize.register_parametrization(m, "counts", sp.Simplex())
    assert not parametrize.is_parametrized(m)


# --------------------------------------------------------------------------
# Docstring examples
# --------------------------------------------------------------------------

def test_docstring_examples():
    globs = {"torch": torch, "nn": nn, "sp": sp, "parametrize": parametrize}
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for obj in (sp.Simplex, sp.simplex, sp.combine) for t in finder.find(obj, globs=dict(globs))]
    assert sum(len(t.examples) for t in tests) >= 10
    for t in tests:
        runner.run(t)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, result


# --------------------------------------------------------------------------
# Sparse maps: Simplex(map=...), simplex(map=...), combine
# --------------------------------------------------------------------------

@pytest.mark.parametrize("map", [m for m in sp.maps.SIMPLEX_MAPS if m != "softmax"])
@pytest.mark.parametrize("dim", [-1, 0, None])
def test_sparse_map_forward(map, dim):
    torch.manual_seed(50)
    Z = 2 * torch.randn(4, 5, dtype=torch.float64)
    W = sp.Simplex(dim=dim, temperature=0.5, map=map)(Z)
    if dim is None:
        want = sp.maps.apply(map, Z.reshape(-1) / 0.5).reshape(Z.shape)
    else:
        want = sp.maps.apply(map, Z.movedim(dim, -1) / 0.5).movedim(-1, dim)
    assert_close(W, want)
    assert (W >= 0).all() and (W == 0).any()
    sums = W.sum() if dim is None else W.sum(dim)
    assert_close(sums, torch.ones_like(sums))


@pytest.mark.parametrize("map", sp.maps.SIMPLEX_MAPS)
@pytest.mark.parametrize("T", [1.0, 0.3])
def test_right_inverse_round_trips_every_map_zeros_included(map, T):
    m = sp.simplex(holder(torch.zeros(2, 4)), "w", dim=1, temperature=T, map=map)
    P = torch.tensor([[0.5, 0.25, 0.25, 0.0], [0.0, 0.0, 1.0, 0.0]])
    m.w = P
    if map == "softmax":
        assert_close(m.w, P, dtype=torch.float32)  # zeros come back as tiny weights
    else:
        assert torch.equal(m.w == 0, P == 0)  # zeros come back exactly
        assert_close(m.w, P)


def test_sparse_map_repr_and_errors():
    assert repr(sp.Simplex(map="sparsemax")) == "Simplex(dim=-1, temperature=1.0, map='sparsemax')"
    assert repr(sp.Simplex()) == "Simplex(dim=-1, temperature=1.0)"
    maps = ", ".join(repr(m) for m in sp.maps.SIMPLEX_MAPS)
    assert "'identity'" not in maps
    with pytest.raises(ValueError, match=f"map must be one of {maps}, got 'identity'"):
        sp.Simplex(map="identity")
    with pytest.raises(TypeError, match="map must be a str, got int"):
        sp.Simplex(map=1)


@pytest.mark.parametrize("map", [m for m in sp.maps.SIMPLEX_MAPS if m != "softmax"])
def test_combine_uses_the_simplex_map(map, spy):
    torch.manual_seed(51)
    m = sp.simplex(holder(torch.tensor([1.0, 0.2, -2.0])), "w", map=map, temperature=0.7)
    xs = [torch.randn(6) for _ in range(3)]
    out = sp.combine(m, "w", xs)
    assert [name for name, _ in spy] == ["simplex_weighted_sum"]  # one fused call with the map
    assert_close(out, sum(w * x for w, x in zip(m.w, xs)))
