"""sp.summary and sp.entropy, checked against hand computation."""
import math

import pytest
import torch
from torch import nn

import simplex_param as sp

from conftest import assert_close


def model():
    torch.manual_seed(80)
    m = nn.Module()
    m.fuse = sp.SimplexFusion(3, map="sparsemax", temperature=0.5)
    with torch.no_grad():
        m.fuse.parametrizations.weight.original.copy_(torch.tensor([1.0, 0.9, -2.0]))
    m.mix = sp.ScalarMix(4, initial_scalar_parameters=[0.0, 1.0, 2.0, float("-inf")])
    m.op = sp.MixedOp([nn.Identity(), nn.Tanh()])
    m.lin = sp.simplex(nn.Linear(5, 2), dim=1)
    return m


def hand_entropy(p):
    p = p.double()
    return float(-(p[p > 0] * p[p > 0].log()).sum())


def test_summary_rows_match_hand_computation():
    m = model()
    records = sp.summary(m)
    assert [r.name for r in records] == ["fuse.weight", "mix.weight", "op.weight", "lin.weight"]
    assert [r.kind for r in records] == ["SimplexFusion", "ScalarMix", "MixedOp", "Simplex"]
    fuse, mix, op, lin = records
    # sparsemax of (1.0, 0.9, -2.0) / 0.5 = (2, 1.8, -4): weights 0.6, 0.4, 0.
    assert fuse.map == "sparsemax" and fuse.temperature == 0.5
    assert_close(fuse.weights, torch.tensor([0.6, 0.4, 0.0], dtype=torch.float64), dtype=torch.float32)
    assert fuse.support == 2
    assert math.isclose(fuse.entropy, hand_entropy(fuse.weights[:2]), rel_tol=1e-9)
    assert math.isclose(fuse.effective_k, math.exp(fuse.entropy))
    p = torch.softmax(torch.tensor([0.0, 1.0, 2.0, float("-inf")], dtype=torch.float64), 0)
    assert mix.support == 3 and math.isclose(mix.entropy, hand_entropy(p), rel_tol=1e-6)
    assert op.effective_k == pytest.approx(2.0)
    rows = m.lin.weight.detach()
    assert lin.support == 5
    assert lin.entropy == pytest.approx(sum(hand_entropy(r) for r in rows) / 2, rel=1e-6)
    assert fuse.top(2) == "0:0.600 1:0.400"
    table = str(records)
    assert table.splitlines()[0].startswith("name") and "fuse.weight" in table and "lin.weight" in table


def test_entropy_is_a_differentiable_regulariser():
    m = model()
    total = sp.entropy(m)
    want = sum(torch.tensor(r.entropy) for r in sp.summary(m))
    assert_close(total.detach().double(), want.double(), dtype=torch.float32)
    total.backward()
    assert m.op.parametrizations.weight.original.grad is not None
    assert torch.isfinite(m.mix.scalar_parameters[0].grad).all()
    assert_close(sp.entropy(torch.full((2, 4), 0.25)), torch.tensor(math.log(4)))
    assert sp.entropy(torch.tensor([1.0, 0.0])) == 0


def test_entropy_bad_arguments():
    with pytest.raises(ValueError, match="holds no simplex weights"):
        sp.entropy(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="floating tensor"):
        sp.entropy(torch.tensor([1, 0]))
