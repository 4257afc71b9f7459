"""Architecture search: gumbel_softmax, MixedOp (soft and hard) and the
parameter split, written from how DARTS and GDAS use them."""
import math

import pytest
import torch
from torch import nn

import simplex_param as sp

from conftest import assert_close


# --------------------------------------------------------------------------
# gumbel_softmax
# --------------------------------------------------------------------------

def test_gumbel_is_reproducible_with_a_generator():
    z = torch.randn(5, 7)
    a = sp.gumbel_softmax(z, generator=torch.Generator().manual_seed(3))
    b = sp.gumbel_softmax(z, generator=torch.Generator().manual_seed(3))
    c = sp.gumbel_softmax(z, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert_close(a.sum(-1), torch.ones(5))


def test_gumbel_hard_is_one_hot_and_never_nan():
    g = torch.Generator().manual_seed(5)
    for z in (torch.randn(100, 6), torch.full((100, 6), 1e4), torch.tensor([[-1e4, 1e4, 0.0]] * 100)):
        w = sp.gumbel_softmax(z, hard=True, generator=g, temperature=0.1)
        assert torch.isfinite(w).all()
        assert torch.equal(w.sum(-1), torch.ones(z.shape[0]))
        assert torch.equal((w == 1).sum(-1), torch.ones(z.shape[0], dtype=torch.long))
    inf = float("inf")
    w = sp.gumbel_softmax(torch.tensor([[0.0, -inf, 0.0], [-inf, -inf, -inf]]), generator=g)
    assert w[0, 1] == 0 and torch.isfinite(w[0]).all() and torch.isnan(w[1]).all()


@pytest.mark.parametrize("T", [1.0, 0.5])
def test_gumbel_hard_frequencies_follow_the_softmax(T):
    # The Gumbel-max trick: index k with probability softmax(z / T)_k.
    z = torch.tensor([1.0, 0.0, -0.5, 0.3])
    n = 20_000
    w = sp.gumbel_softmax(z.expand(n, 4), hard=True, temperature=T, generator=torch.Generator().manual_seed(6))
    freq = w.detach().mean(0).double()
    p = torch.softmax(z.double() / T, 0)
    sigma = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 3 * sigma).all(), (freq, p)


def test_gumbel_straight_through_gradient():
    # Same noise: the hard weights' gradient is the soft weights'.
    z = torch.randn(3, 5, requires_grad=True)
    g = torch.randn(3, 5)
    hard = sp.gumbel_softmax(z, hard=True, temperature=0.7, generator=torch.Generator().manual_seed(7))
    soft = sp.gumbel_softmax(z, temperature=0.7, generator=torch.Generator().manual_seed(7))
    assert torch.equal(hard.detach(), torch.zeros(3, 5).scatter_(1, soft.detach().argmax(1, keepdim=True), 1.0))
    (got,) = torch.autograd.grad(hard, z, g)
    (want,) = torch.autograd.grad(soft, z, g)
    assert_close(got, want)


def test_gumbel_bad_arguments():
    with pytest.raises(TypeError, match="logits must be a floating Tensor"):
        sp.gumbel_softmax(torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature must be a positive finite number"):
        sp.gumbel_softmax(torch.ones(3), temperature=0.0)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        sp.gumbel_softmax(torch.ones(3), generator=3)


# --------------------------------------------------------------------------
# MixedOp
# --------------------------------------------------------------------------

class Counted(nn.Module):
    """A candidate that counts its calls."""

    def __init__(self, op):
        super().__init__()
        self.op, self.calls = op, 0

    def forward(self, x):
        self.calls += 1
        return self.op(x)


def candidates():
    torch.manual_seed(8)
    return [Counted(m) for m in (nn.Identity(), nn.Tanh(), nn.Linear(4, 4), nn.ReLU())]


def test_soft_mode_is_the_darts_recipe():
    ops = candidates()
    mixed = sp.MixedOp(ops)
    x = torch.randn(2, 4)
    alpha = torch.randn(3, 4, requires_grad=True)  # DARTS: one shared row per edge
    got = mixed(x, alpha[1])
    want = sum(w * op(x) for w, op in zip(torch.softmax(alpha[1], -1), ops))
    assert_close(got, want)
    (g_got,) = torch.autograd.grad(got.sum(), alpha)
    (g_want,) = torch.autograd.grad(want.sum(), alpha)
    assert_close(g_got, g_want)
    assert g_got[0].abs().sum() == 0 and g_got[1].abs().sum() > 0


def test_own_weights_are_architecture_parameters():
    mixed = sp.MixedOp(candidates())
    model = nn.Sequential(mixed, nn.Linear(4, 1))
    arch, net = sp.split_parameters(model)
    assert len(arch) == 1 and arch[0] is mixed.parametrizations.weight.original
    assert {id(p) for p in net} == {id(p) for p in model.parameters()} - {id(arch[0])}
    assert sp.architecture_parameters(model) == arch
    x = torch.randn(2, 4)
    out = mixed(x)  # no logits: its own, uniform at first
    assert_close(out, sum(op(x) for op in mixed.candidates) / 4)
    out.sum().backward()
    assert arch[0].grad is not None


@pytest.mark.parametrize("map", [m for m in sp.maps.SIMPLEX_MAPS if m != "softmax"])
def test_soft_mode_with_a_sparse_map(map):
    ops = candidates()
    mixed = sp.MixedOp(ops, map=map)
    z = torch.tensor([2.0, 1.5, -1.0, -3.0])
    x = torch.randn(2, 4)
    w = sp.maps.apply(map, z)
    assert_close(mixed(x, z), sum(w_k * op(x) for w_k, op in zip(w, ops)))


def test_hard_mode_runs_only_the_drawn_candidate():
    ops = candidates()
    mixed = sp.MixedOp(ops, mode="hard", generator=torch.Generator().manual_seed(9))
    x = torch.randn(2, 4)
    z = torch.tensor([0.5, 0.0, 1.0, -0.5], requires_grad=True)
    for step in range(1, 41):
        before = [op.calls for op in ops]
        out = mixed(x, z)
        ran = [op.calls - b for op, b in zip(ops, before)]
        assert sum(ran) == 1
        i = ran.index(1)
        assert torch.equal(out, ops[i].op(x))  # the value is the candidate's own output
    assert all(op.calls > 0 for op in ops)  # each drawn at least once in 40 steps


def test_hard_mode_gradient_is_straight_through():
    ops = candidates()
    gen_seed = 10
    mixed = sp.MixedOp(ops, mode="hard", temperature=0.5, generator=torch.Generator().manual_seed(gen_seed))
    x = torch.randn(2, 4)
    z = torch.tensor([0.5, 0.0, 1.0, -0.5], requires_grad=True)
    out = mixed(x, z)
    (got,) = torch.autograd.grad(out.sum(), z)
    # The same draw by hand: dL/dz_j = <g, op_i(x)> dp_i/dz_j, p = softmax(z / T + G).
    zz = z.detach().clone().requires_grad_()
    p = sp.gumbel_softmax(zz, temperature=0.5, generator=torch.Generator().manual_seed(gen_seed))
    i = int(p.argmax())
    (want,) = torch.autograd.grad(p[i] * ops[i].op(x).detach().sum(), zz)
    assert_close(got, want)


def test_hard_mode_eval_is_the_argmax():
    ops = candidates()
    mixed = sp.MixedOp(ops, mode="hard").eval()
    x = torch.randn(2, 4)
    z = torch.tensor([0.1, 2.0, 0.3, -1.0])
    for _ in range(3):
        assert torch.equal(mixed(x, z), ops[1].op(x))
    assert [op.calls for op in ops] == [0, 3, 0, 0]


def test_hard_mode_samples_follow_the_softmax():
    ops = [nn.Identity() for _ in range(3)]
    mixed = sp.MixedOp([Counted(op) for op in ops], mode="hard", generator=torch.Generator().manual_seed(11))
    z = torch.tensor([1.0, 0.0, -1.0])
    n = 3000
    for _ in range(n):
        mixed(torch.zeros(1), z)
    freq = torch.tensor([c.calls / n for c in mixed.candidates], dtype=torch.float64)
    p = torch.softmax(z.double(), 0)
    assert ((freq - p).abs() <= 3 * (p * (1 - p) / n).sqrt()).all()


def test_mixed_op_bad_arguments():
    with pytest.raises(ValueError, match="candidates must hold at least one module"):
        sp.MixedOp([])
    with pytest.raises(TypeError, match=r"candidates\[1\] must be an nn.Module, got function"):
        sp.MixedOp([nn.Identity(), lambda x: x])
    with pytest.raises(ValueError, match="mode must be one of 'soft', 'hard', got 'gdas'"):
        sp.MixedOp([nn.Identity()], mode="gdas")
    shared = sp.MixedOp([nn.Identity(), nn.Tanh()], own_weights=False)
    assert sp.split_parameters(shared)[0] == []
    with pytest.raises(ValueError, match="logits is required"):
        shared(torch.ones(2))
    with pytest.raises(ValueError, match=r"logits has shape \[3\] but this MixedOp has 2 candidates"):
        shared(torch.ones(2), torch.zeros(3))


def test_darts_search_cell_trains_both_sets():
    # A tiny DARTS-style search: two edges sharing an alpha matrix, the
    # network weights and the architecture trained by their own optimizers.
    torch.manual_seed(12)

    class Cell(nn.Module):
        def __init__(self):
            super().__init__()
            self.edges = nn.ModuleList(
                sp.MixedOp([nn.Linear(4, 4), nn.Identity(), nn.Tanh()], own_weights=False) for _ in range(2)
            )

        def forward(self, x, alpha):
            return self.edges[1](self.edges[0](x, alpha[0]), alpha[1])

    cell = Cell()
    alpha = torch.zeros(2, 3, requires_grad=True)
    w_opt = torch.optim.SGD(sp.split_parameters(cell)[1], lr=0.05)
    a_opt = torch.optim.Adam([alpha], lr=0.05)
    x, y = torch.randn(64, 4), torch.randn(64, 4)
    first = None
    for _ in range(30):
        loss = (cell(x, alpha) - y).square().mean()
        first = first if first is not None else loss.item()
        w_opt.zero_grad()
        a_opt.zero_grad()
        loss.backward()
        w_opt.step()
        a_opt.step()
    assert loss.item() < first and alpha.grad.abs().sum() > 0
    assert not math.isnan(loss.item())


# --------------------------------------------------------------------------
# set_temperature
# --------------------------------------------------------------------------

def annealed_model():
    torch.manual_seed(13)
    model = nn.Module()
    model.fuse = sp.SimplexFusion(3)
    model.mixed = sp.MixedOp([nn.Identity(), nn.Tanh(), nn.Linear(4, 4)])
    model.proj = sp.simplex(nn.Linear(4, 3), dim=1)
    with torch.no_grad():
        model.fuse.parametrizations.weight.original.copy_(torch.tensor([0.5, -0.3, 1.0]))
        model.mixed.parametrizations.weight.original.copy_(torch.tensor([1.0, 0.0, -1.0]))

    def run(x):
        y = model.mixed(model.fuse([x, 2 * x, -x]))
        return y + model.proj.weight.sum(0)[:1]

    return model, run


def test_set_temperature_matches_layers_built_at_that_temperature():
    model, run = annealed_model()
    assert sp.set_temperature(model, 0.25) == 5  # fuse, its Simplex, mixed, its Simplex, proj's Simplex
    z = model.fuse.parametrizations.weight.original.detach()
    assert_close(model.fuse.weight, torch.softmax(z / 0.25, 0))
    assert_close(model.proj.weight.sum(1), torch.ones(3))
    x = torch.randn(2, 4)
    fresh = sp.SimplexFusion(3, temperature=0.25)
    with torch.no_grad():
        fresh.parametrizations.weight.original.copy_(z)
    assert_close(model.fuse([x, 2 * x, -x]), fresh([x, 2 * x, -x]))
    assert set(model.state_dict()) == set(annealed_model()[0].state_dict())  # nothing persistent added
    sp.set_temperature(model, torch.tensor(2.0))
    assert float(model.mixed.temperature) == 2.0 and "temperature=2.0" in repr(model.mixed)


def test_annealing_a_compiled_model_does_not_recompile():
    torch._dynamo.reset()
    model, run = annealed_model()
    sp.set_temperature(model, 1.0)  # once before compiling: the temperatures become buffers
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    compiled = torch.compile(run, backend=counter)
    x = torch.randn(2, 4)
    for step in range(10):
        t = 1.0 - 0.09 * step  # a linear schedule, as GDAS anneals tau
        sp.set_temperature(model, t)
        assert_close(compiled(x), run(x))
    assert counter.frame_count == 1


def test_set_temperature_bad_values():
    model, _ = annealed_model()
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature must be a positive finite number"):
            sp.set_temperature(model, bad)
    with pytest.raises(ValueError, match="a number or a 0-D tensor"):
        sp.set_temperature(model, torch.ones(2))


def test_a_learned_alpha_is_an_architecture_parameter():
    model = nn.Sequential(sp.MixedOp([nn.Linear(2, 2), nn.Identity()], map="entmax_bisect", learn_alpha=True),
                          nn.Linear(2, 1))
    arch, net = sp.split_parameters(model)
    simplex = model[0].parametrizations.weight[0]
    assert [id(p) for p in arch] == [id(model[0].parametrizations.weight.original), id(simplex.alpha_pre)]
    assert len(net) == 4
    # alpha gets a gradient from the loss through the mixed output.
    model(torch.randn(3, 2)).square().sum().backward()
    assert simplex.alpha_pre.grad is not None
