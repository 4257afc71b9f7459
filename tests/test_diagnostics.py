"""sp.summary, sp.entropy, sp.zero_one_loss and sp.WeightLogger, checked
against hand computation."""
import doctest
import math
import sys

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


def test_summary_lists_a_weighted_layer_sum():
    m = nn.Module()
    m.layers = sp.WeightedLayerSum.hf(4)
    with torch.no_grad():
        m.layers.layer_weights.copy_(torch.tensor([0.0, math.log(2), math.log(3), float("-inf")]))
    (record,) = sp.summary(m)
    assert (record.name, record.kind, record.map, record.support) == ("layers.weight", "WeightedLayerSum", "softmax", 3)
    assert_close(record.weights, torch.tensor([1 / 6, 2 / 6, 3 / 6, 0.0], dtype=torch.float64), dtype=torch.float32)


# --------------------------------------------------------------------------
# zero_one_loss (FairDARTS)
# --------------------------------------------------------------------------

def test_zero_one_loss_on_sigmoid_weights_as_fairdarts():
    # FairDARTS: L01 = -1/N sum_i (sigmoid(alpha_i) - 0.5)^2.
    alpha = torch.tensor([0.0, 2.0, -1.0], dtype=torch.float64, requires_grad=True)
    loss = sp.zero_one_loss(torch.sigmoid(alpha))
    s = [1 / (1 + math.exp(-a)) for a in (0.0, 2.0, -1.0)]
    assert loss.item() == pytest.approx(-sum((v - 0.5) ** 2 for v in s) / 3, rel=1e-12)
    loss.backward()
    # d/d alpha_i = -2/N (s_i - 0.5) s_i (1 - s_i)
    want = [-2 / 3 * (v - 0.5) * v * (1 - v) for v in s]
    assert alpha.grad.tolist() == pytest.approx(want, rel=1e-12)


def test_zero_one_loss_on_simplex_weights():
    w = torch.tensor([0.7, 0.2, 0.1])
    want = -((0.7 - 0.5) ** 2 + (0.2 - 0.5) ** 2 + (0.1 - 0.5) ** 2) / 3
    assert sp.zero_one_loss(w).item() == pytest.approx(want, rel=1e-6)
    assert sp.zero_one_loss(w).item() == pytest.approx(-(0.54 - 1 + 3 / 4) / 3, rel=1e-6)  # the identity in the docs
    assert sp.zero_one_loss(torch.tensor([0.0, 1.0, 0.0])).item() == -0.25
    # A module: the sum over its simplex weights, each averaged over its entries.
    m = model()
    total = sp.zero_one_loss(m)
    want = sum(-((r.weights - 0.5) ** 2).mean() for r in sp.summary(m))
    assert_close(total.detach().double(), want, dtype=torch.float32)
    # Minimising it alone drives a fusion layer's weights towards a one-hot.
    fuse = sp.SimplexFusion(3)
    fuse.weight = torch.tensor([0.4, 0.35, 0.25])
    opt = torch.optim.SGD(fuse.parameters(), lr=5.0)
    for _ in range(200):
        opt.zero_grad()
        sp.zero_one_loss(fuse).backward()
        opt.step()
    assert fuse.weight[0].item() > 0.99


def test_zero_one_loss_bad_arguments():
    with pytest.raises(ValueError, match="holds no simplex weights"):
        sp.zero_one_loss(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="non-empty floating tensor"):
        sp.zero_one_loss(torch.tensor([1, 0]))
    with pytest.raises(TypeError, match="non-empty floating tensor"):
        sp.zero_one_loss(torch.zeros(0))


# --------------------------------------------------------------------------
# WeightLogger
# --------------------------------------------------------------------------

def logged_model():
    m = nn.Module()
    m.fuse = sp.SimplexFusion(3)
    m.sparse = sp.SimplexFusion(3, map="sparsemax")
    m.lin = sp.simplex(nn.Linear(3, 2), dim=1)
    return m


def set_step(m, t):
    """Pre-weights that depend on t, so every recorded step is known by hand."""
    with torch.no_grad():
        m.fuse.parametrizations.weight.original.copy_(torch.tensor([0.0, math.log(1 + t), math.log(1 + 2 * t)]))
        m.sparse.parametrizations.weight.original.copy_(torch.tensor([1.0, 1.0 - 0.1 * t, -5.0]))
        m.lin.parametrizations.weight.original.copy_(torch.arange(6.0).reshape(2, 3) * t)


def run_logger(m, **kwargs):
    set_step(m, 0)
    logger = sp.WeightLogger(m, every=3, **kwargs)
    recorded = []
    for t in range(1, 8):
        set_step(m, t)
        recorded.append(logger.step())
    assert recorded == [False, False, True, False, False, True, False]
    return logger


def test_weight_logger_records_every_n_steps(tmp_path):
    m = logged_model()
    logger = run_logger(m)
    assert [step for step, _ in logger.history] == [0, 3, 6] and logger.steps == 7
    for step, records in logger.history:
        fuse, sparse, lin = records
        assert [r.name for r in records] == ["fuse.weight", "sparse.weight", "lin.weight"]
        # softmax of (0, log(1+t), log(1+2t)) = (1, 1+t, 1+2t) / (3+3t)
        p = [1 / (3 + 3 * step), (1 + step) / (3 + 3 * step), (1 + 2 * step) / (3 + 3 * step)]
        assert fuse.weights.tolist() == pytest.approx(p, rel=1e-6)
        h = -sum(v * math.log(v) for v in p)
        assert fuse.entropy == pytest.approx(h, rel=1e-6) and fuse.effective_k == pytest.approx(math.exp(h), rel=1e-6)
        assert fuse.support == 3
        # sparsemax of (1, 1 - 0.1t, -5): (0.5 + 0.05t, 0.5 - 0.05t, 0) while 0.1t < 1
        q = [0.5 + 0.05 * step, 0.5 - 0.05 * step]
        assert sparse.weights.tolist() == pytest.approx(q + [0.0], abs=1e-7)
        assert sparse.support == 2 and sparse.entropy == pytest.approx(-sum(v * math.log(v) for v in q), rel=1e-6)
        # the rows of lin: softmax of (0, t, 2t) and (3t, 4t, 5t), the same distribution
        e = [1.0, math.exp(step), math.exp(2 * step)]
        row = [v / sum(e) for v in e]
        assert lin.weights.reshape(-1).tolist() == pytest.approx(row + row, rel=1e-5, abs=1e-12)
    steps, w = logger.trajectory("fuse.weight")
    assert steps == [0, 3, 6] and w.shape == (3, 3) and w.dtype == torch.float64
    assert torch.equal(w[1], logger.history[1][1][0].weights)
    with pytest.raises(KeyError, match=r"no weights named 'nope' were recorded; recorded: \['fuse.weight'"):
        logger.trajectory("nope")
    assert logger.record() is logger.history[-1][1] and logger.history[-1][0] == 7


def test_weight_logger_csv_round_trips(tmp_path):
    path = tmp_path / "weights.csv"
    m = logged_model()
    logger = run_logger(m, csv=path)
    back = sp.WeightLogger.read_csv(path)
    assert back == logger.history
    lines = path.read_text().splitlines()
    assert lines[0] == "step,name,kind,map,temperature,entropy,effective_k,support,shape,weights"
    assert len(lines) == 1 + 3 * 3  # a row per weight tensor and recorded step
    assert lines[4].startswith("3,fuse.weight,SimplexFusion,softmax,1.0,") and ",3," in lines[4]
    assert lines[6].split(",")[8] == "2 3"  # lin.weight's shape
    # A changed value no longer compares equal: the comparison looks at the weights.
    back[1][1][0].weights[0] += 1e-12
    assert back != logger.history
    bad = tmp_path / "other.csv"
    bad.write_text("a,b\n")
    with pytest.raises(ValueError, match="is not a WeightLogger CSV"):
        sp.WeightLogger.read_csv(bad)


def test_weight_logger_writes_tensorboard_events(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    m = logged_model()
    logger = run_logger(m, tensorboard=tmp_path / "runs")
    logger.close()
    events = EventAccumulator(str(tmp_path / "runs"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"fuse.weight/entropy", "fuse.weight/effective_k", "fuse.weight/support", "fuse.weight/w2",
            "lin.weight/w1_2"} <= set(tags)
    picks = {
        "fuse.weight/w2": lambda r: r[0].weights[2],
        "fuse.weight/entropy": lambda r: r[0].entropy,
        "sparse.weight/support": lambda r: r[1].support,
        "lin.weight/w1_2": lambda r: r[2].weights[1, 2],
    }
    for tag, pick in picks.items():
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [0, 3, 6]
        # TensorBoard stores float32.
        assert [s.value for s in scalars] == [float(torch.tensor(float(pick(r)), dtype=torch.float32))
                                              for _, r in logger.history]


def test_weight_logger_without_tensorboard_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match="needs the tensorboard package: pip install tensorboard"):
        sp.WeightLogger(logged_model(), tensorboard=tmp_path)


def test_weight_logger_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    logger = run_logger(logged_model())
    path = logger.plot(tmp_path / "weights.png", true={"fuse.weight": [0.1, 0.3, 0.6]})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert logger.plot(tmp_path / "one.png", names=["lin.weight"]).stat().st_size > 0


def test_weight_logger_plot_without_matplotlib(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="needs matplotlib: pip install matplotlib"):
        run_logger(logged_model()).plot(tmp_path / "w.png")


def test_weight_logger_bad_arguments():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="every must be a positive int"):
            sp.WeightLogger(nn.Linear(2, 2), every=bad)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        sp.WeightLogger([sp.SimplexFusion(2)])
    with pytest.raises(ValueError, match="nothing was recorded"):
        sp.WeightLogger(nn.Linear(2, 2)).plot("unused.png")


def test_weight_logger_docstring_example():
    import simplex_param.weightlog

    torch.manual_seed(0)
    globs = {"torch": torch, "nn": nn, "sp": sp}
    result = doctest.testmod(simplex_param.weightlog, extraglobs=globs, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_summary_kind_is_the_library_layer():
    class MyFusion(sp.SimplexFusion):
        pass

    m = nn.ModuleDict({"lazy": sp.LazySimplexFusion(), "mine": MyFusion(2), "lin": sp.simplex(nn.Linear(2, 3))})
    m["lazy"]([torch.ones(2)] * 3)
    assert [r.kind for r in sp.summary(m)] == ["LazySimplexFusion", "SimplexFusion", "Simplex"]
