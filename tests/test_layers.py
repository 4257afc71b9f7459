"""The fusion layers: SimplexFusion, LazySimplexFusion and ScalarMix, against
formulas written out here, with gradients, torch.compile, state_dicts and errors.

On the compiled path the layers run the fused kernels and on the fallback path
the reference; both are checked against the same formulas."""
import itertools

import pytest
import torch
from torch.autograd import gradcheck
from torch.func import functional_call

import simplex_param as sp

from conftest import DEVICES, DTYPES, assert_close

ORIGINAL = "parametrizations.weight.original"


def mix(weights, xs):
    """sum_k w_k x_k in float64, the oracle of every layer here."""
    return sum(w.double() * x.double() for w, x in zip(weights, xs))


# --------------------------------------------------------------------------
# SimplexFusion
# --------------------------------------------------------------------------

def test_fusion_initial_state():
    fuse = sp.SimplexFusion(4, bias=True, temperature=0.5, weight_dropout=0.25)
    assert list(fuse.state_dict()) == ["bias", ORIGINAL]
    assert fuse.parametrizations.weight.original.shape == (4,)
    assert_close(fuse.weight, torch.full((4,), 0.25))
    assert fuse.bias.item() == 0.0
    assert fuse.extra_repr() == "num_inputs=4, temperature=0.5, weight_dropout=0.25, bias=True"
    assert [name for name, _ in fuse.named_parameters()] == ["bias", ORIGINAL]


@pytest.mark.parametrize("dtype,device,stacked", list(itertools.product(DTYPES, DEVICES, [False, True])))
def test_fusion_forward_and_backward(dtype, device, stacked):
    torch.manual_seed(0)
    fuse = sp.SimplexFusion(3, bias=True, temperature=0.7, device=device)
    with torch.no_grad():
        fuse.parametrizations.weight.original.copy_(torch.tensor([0.5, -1.0, 2.0]))
        fuse.bias.fill_(0.25)
    xs = torch.randn(3, 17, 5, device=device, dtype=dtype)
    out = fuse(xs if stacked else list(xs))
    w = torch.softmax(torch.tensor([0.5, -1.0, 2.0], device=device, dtype=torch.float64) / 0.7, 0)
    assert out.dtype == dtype and out.shape == (17, 5)
    assert_close(out, (mix(w, xs) + 0.25).to(dtype))
    assert_close(fuse.weight, w.float())
    # The gradient of the pre-weights through the fused op against autograd of the formula.
    z = fuse.parametrizations.weight.original
    g = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, z, g)
    z_ref = z.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(mix(torch.softmax(z_ref / 0.7, 0), xs), z_ref, g.double())
    rtol = 1e-5 if dtype in (torch.float32, torch.float64) else 2e-2
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol * want.abs().max().item())


def test_fusion_assign_probabilities():
    fuse = sp.SimplexFusion(3)
    p = torch.tensor([0.5, 0.3, 0.2])
    fuse.weight = p
    assert_close(fuse.weight, p)
    xs = [torch.randn(6) for _ in range(3)]
    assert_close(fuse(xs), mix(p, xs).float())


@pytest.mark.parametrize("present", [[0, 2], [1], [0, 1, 3], [3]])
def test_fusion_missing_inputs_renormalise(present):
    torch.manual_seed(1)
    z = torch.tensor([0.3, -0.2, 1.0, 0.0])
    fuse = sp.SimplexFusion(4, temperature=2.0)
    with torch.no_grad():
        fuse.parametrizations.weight.original.copy_(z)
    xs = [torch.randn(9, 2) for _ in range(4)]
    given = [x if k in present else None for k, x in enumerate(xs)]
    out = fuse(given)
    w = torch.softmax(z / 2.0, 0)[present]
    w = w / w.sum()
    assert_close(out, mix(w, [xs[k] for k in present]).float())
    # Differentiable, and the absent inputs' pre-weights get no gradient.
    out.sum().backward()
    grad = fuse.parametrizations.weight.original.grad
    absent = [k for k in range(4) if k not in present]
    assert torch.all(grad[absent] == 0)
    if len(present) > 1:
        assert grad[present].abs().sum() > 0


def effective_weights(fuse, K):
    """Run the layer on the standard basis: output k is the weight given to input k."""
    return fuse(list(torch.eye(K)))


def test_fusion_weight_dropout_keeps_a_distribution():
    torch.manual_seed(2)
    K, p = 4, 0.3
    fuse = sp.SimplexFusion(K, weight_dropout=p)
    with torch.no_grad():
        fuse.parametrizations.weight.original.copy_(torch.tensor([0.0, 1.0, -1.0, 0.5]))
    full = fuse.weight.detach()
    dropped = 0
    trials = 1000
    with torch.no_grad():
        for _ in range(trials):
            w = effective_weights(fuse, K)
            kept = w > 0
            assert kept.any()
            assert abs(w.sum().item() - 1.0) < 1e-6
            # The kept weights are the full weights renormalised over the kept set.
            assert_close(w[kept], full[kept] / full[kept].sum())
            dropped += (~kept).sum().item()
    # Each input falls with probability p (a little less: one is always kept).
    expected = p - p**K / K
    assert abs(dropped / (trials * K) - expected) < 0.03
    fuse.eval()
    assert_close(effective_weights(fuse, K), full)


def test_fusion_weight_dropout_one_keeps_exactly_one():
    torch.manual_seed(3)
    fuse = sp.SimplexFusion(3, weight_dropout=1.0)
    seen = set()
    with torch.no_grad():
        for _ in range(60):
            w = effective_weights(fuse, 3)
            assert (w > 0).sum() == 1 and w.max().item() == 1.0
            seen.add(int(w.argmax()))
    assert seen == {0, 1, 2}


def test_fusion_weight_dropout_gradient_flows_to_kept_only():
    fuse = sp.SimplexFusion(5, weight_dropout=0.5)
    xs = [torch.randn(3) for _ in range(5)]
    torch.manual_seed(4)
    w = effective_weights(fuse, 5).detach()
    torch.manual_seed(4)  # the same draw again
    fuse(xs).sum().backward()
    grad = fuse.parametrizations.weight.original.grad
    assert (w == 0).any() and (w > 0).sum() > 1
    assert torch.all(grad[w == 0] == 0) and torch.all(grad[w > 0] != 0)


def test_fusion_gradcheck():
    torch.manual_seed(5)
    fuse = sp.SimplexFusion(3, bias=True, temperature=0.8, dtype=torch.float64)
    names = [ORIGINAL, "bias"]
    xs = [torch.randn(4, 3, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    z = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn((), dtype=torch.float64, requires_grad=True)

    def f(z, b, *xs):
        full = functional_call(fuse, dict(zip(names, (z, b))), (list(xs),))
        missing = functional_call(fuse, dict(zip(names, (z, b))), ([xs[0], None, xs[2]],))
        stacked = functional_call(fuse, dict(zip(names, (z, b))), (torch.stack(xs),))
        return full, missing, stacked

    assert gradcheck(f, (z, b, *xs))


@pytest.mark.parametrize("training", [False, True])
def test_fusion_compile_fullgraph(training):
    torch._dynamo.reset()
    torch.manual_seed(6)
    fuse = sp.SimplexFusion(4, bias=True, weight_dropout=0.5)
    with torch.no_grad():
        fuse.parametrizations.weight.original.copy_(torch.randn(4))
        fuse.bias.fill_(0.1)
    fuse.train(training)
    compiled = torch.compile(fuse, fullgraph=True)
    xs = [torch.randn(8, 3, requires_grad=True) for _ in range(4)]
    if training:
        # Random drops: check the invariant, not a value.
        w = compiled(list(torch.eye(4))) - 0.1
        assert (w > 0).any() and abs(w.sum().item() - 1.0) < 1e-5
        return
    for given in (xs, [xs[0], None, xs[2], xs[3]]):
        out = compiled(given)
        expected = fuse(given)
        assert_close(out, expected)
        got = torch.autograd.grad(out.sum(), [fuse.parametrizations.weight.original, xs[0]])
        want = torch.autograd.grad(expected.sum(), [fuse.parametrizations.weight.original, xs[0]])
        for a, b in zip(got, want):
            assert_close(a, b)


def test_fusion_state_dict_round_trip():
    torch.manual_seed(7)
    a = sp.SimplexFusion(3, bias=True)
    with torch.no_grad():
        a.parametrizations.weight.original.copy_(torch.randn(3))
        a.bias.fill_(-0.5)
    b = sp.SimplexFusion(3, bias=True)
    b.load_state_dict(a.state_dict())
    xs = [torch.randn(5) for _ in range(3)]
    assert_close(b(xs), a(xs))
    assert_close(b.weight, a.weight)
    with pytest.raises(RuntimeError, match="size mismatch"):
        sp.SimplexFusion(4, bias=True).load_state_dict(a.state_dict())


def test_fusion_bad_arguments():
    with pytest.raises(TypeError, match="num_inputs must be an int"):
        sp.SimplexFusion(2.0)
    with pytest.raises(ValueError, match="num_inputs must be at least 1"):
        sp.SimplexFusion(0)
    with pytest.raises(ValueError, match="weight_dropout must be in"):
        sp.SimplexFusion(2, weight_dropout=1.5)
    with pytest.raises(ValueError, match="temperature"):
        sp.SimplexFusion(2, temperature=0.0)
    fuse = sp.SimplexFusion(3)
    x = torch.randn(2)
    with pytest.raises(ValueError, match="inputs has 2 entries but this layer fuses num_inputs=3"):
        fuse([x, x])
    with pytest.raises(ValueError, match="inputs has 4 entries"):
        fuse(torch.randn(4, 2))
    with pytest.raises(ValueError, match="every entry is None"):
        fuse([None, None, None])
    with pytest.raises(TypeError, match="inputs must be a list or tuple"):
        fuse({0, 1, 2})
    with pytest.raises(TypeError, match=r"inputs given as a mapping need a layer built with names=\[...\]"):
        fuse({0: x})
    with pytest.raises(TypeError, match=r"inputs\[1\] must be a Tensor"):
        fuse([x, 3.0, x])
    with pytest.raises(ValueError, match=r"inputs\[1\] has shape"):
        fuse([x, torch.randn(3), x])


# --------------------------------------------------------------------------
# LazySimplexFusion
# --------------------------------------------------------------------------

def test_lazy_materialises_in_place_for_the_optimizer():
    fuse = sp.LazySimplexFusion(bias=True)
    assert fuse.has_uninitialized_params()
    pre = fuse.weight
    xs = [torch.randn(4) for _ in range(5)]
    fuse(xs)  # the dry run
    assert not fuse.has_uninitialized_params()
    assert isinstance(fuse, sp.SimplexFusion) and fuse.num_inputs == 5
    original = fuse.parametrizations.weight.original
    assert original is pre and type(original) is torch.nn.Parameter
    assert list(fuse.state_dict()) == ["bias", ORIGINAL]
    assert_close(fuse.weight, torch.full((5,), 0.2))
    optimizer = torch.optim.SGD(fuse.parameters(), lr=1.0)
    assert any(p is original for group in optimizer.param_groups for p in group["params"])
    (fuse(xs) * xs[0]).sum().backward()
    optimizer.step()
    assert not torch.allclose(fuse.weight, torch.full((5,), 0.2))
    assert_close(fuse.weight.sum(), torch.tensor(1.0))


def test_lazy_rejects_another_count_after_materialising():
    fuse = sp.LazySimplexFusion()
    fuse(torch.randn(3, 2))
    with pytest.raises(ValueError, match="inputs has 4 entries but this layer fuses num_inputs=3"):
        fuse(torch.randn(4, 2))


def test_lazy_matches_eager_layer():
    torch.manual_seed(8)
    lazy = sp.LazySimplexFusion(temperature=0.5)
    eager = sp.SimplexFusion(4, temperature=0.5)
    xs = [torch.randn(3, 2) for _ in range(4)]
    lazy(xs)
    z = torch.randn(4)
    for m in (lazy, eager):
        with torch.no_grad():
            m.parametrizations.weight.original.copy_(z)
    assert_close(lazy(xs), eager(xs))
    assert_close(lazy([xs[0], None, None, xs[3]]), eager([xs[0], None, None, xs[3]]))


@pytest.mark.parametrize("source", ["eager", "lazy"])
def test_lazy_state_dict_round_trip(source):
    torch.manual_seed(9)
    if source == "eager":
        a = sp.SimplexFusion(3, bias=True)
    else:
        a = sp.LazySimplexFusion(bias=True)
        a(torch.randn(3, 2))
    with torch.no_grad():
        a.parametrizations.weight.original.copy_(torch.randn(3))
        a.bias.fill_(0.3)
    b = sp.LazySimplexFusion(bias=True)
    b.load_state_dict(a.state_dict())  # materialises b, strict
    assert b.num_inputs == 3 and not b.has_uninitialized_params()
    xs = torch.randn(3, 6)
    assert_close(b(xs), a(xs))
    c = sp.LazySimplexFusion(bias=True)
    c(torch.randn(3, 1))
    c.load_state_dict(b.state_dict())
    assert_close(c(xs), a(xs))


def test_lazy_gradcheck_and_compile():
    torch._dynamo.reset()
    torch.manual_seed(10)
    fuse = sp.LazySimplexFusion(dtype=torch.float64)
    compiled = torch.compile(fuse, fullgraph=True)
    xs = [torch.randn(3, 2, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    out = compiled(xs)  # materialises through the compiled module
    assert fuse.num_inputs == 3
    assert_close(out, fuse(xs))
    z = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda z, *xs: functional_call(fuse, {ORIGINAL: z}, (list(xs),)), (z, *xs))


# --------------------------------------------------------------------------
# ScalarMix
# --------------------------------------------------------------------------

def allennlp_mix(scalars, gamma, tensors, mask=None):
    """AllenNLP's ScalarMix written out in float64: layer norm over the unmasked
    elements of each whole tensor, eps 1e-13 (1e-4 for float16 inputs)."""
    # AllenNLP's parameters are float32, so are the softmax and gamma.
    s = torch.softmax(torch.tensor(scalars, dtype=torch.float32), 0).double()
    gamma = float(torch.tensor(gamma, dtype=torch.float32))
    eps = 1e-4 if tensors[0].dtype == torch.float16 else 1e-13
    out = 0
    for s_k, t in zip(s, tensors):
        t = t.double()
        if mask is not None:
            keep = mask.bool().unsqueeze(-1).expand_as(t)
            values = t[keep]
            mean = values.mean()
            var = ((values - mean) ** 2).mean()
            t = (t - mean) / torch.sqrt(var + eps)
        out = out + s_k * t
    return gamma * out


def padded_batch(dtype, device, K=3):
    """K (batch, time, dim) tensors and a (batch, time) mask with padding."""
    tensors = [(3.0 * torch.randn(2, 5, 4, device=device) + k).to(dtype) for k in range(K)]
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], device=device, dtype=torch.bool)
    return tensors, mask


@pytest.mark.parametrize("norm,dtype,device", list(itertools.product([False, True], DTYPES, DEVICES)))
def test_scalar_mix_matches_allennlp(norm, dtype, device):
    torch.manual_seed(11)
    scalars = [0.2, -0.4, 1.1]
    mix_ = sp.ScalarMix(3, do_layer_norm=norm, initial_scalar_parameters=scalars).to(device)
    with torch.no_grad():
        mix_.gamma.fill_(1.5)
    tensors, mask = padded_batch(dtype, device)
    out = mix_(tensors, mask if norm else None)
    assert out.dtype == dtype and out.shape == tensors[0].shape
    assert_close(out, allennlp_mix(scalars, 1.5, tensors, mask if norm else None).to(dtype))


def pre_weights(mix_):
    return torch.cat(list(mix_.scalar_parameters))


def test_scalar_mix_initial_parameters_are_pre_softmax():
    # [0.2, 0.3, 0.5] sums to one, yet it is pre-softmax, as in AllenNLP.
    mix_ = sp.ScalarMix(3, initial_scalar_parameters=[0.2, 0.3, 0.5])
    assert_close(pre_weights(mix_), torch.tensor([0.2, 0.3, 0.5]))
    assert_close(mix_.weight, torch.softmax(torch.tensor([0.2, 0.3, 0.5]), 0))
    assert_close(sp.ScalarMix(4).weight, torch.full((4,), 0.25))
    assert mix_.gamma.shape == (1,) and mix_.gamma.item() == 1.0


def test_scalar_mix_mask_may_be_numeric():
    torch.manual_seed(12)
    mix_ = sp.ScalarMix(3, do_layer_norm=True)
    tensors, mask = padded_batch(torch.float32, "cpu")
    assert_close(mix_(tensors, mask.long()), mix_(tensors, mask))
    assert_close(mix_(tensors, mask.float()), allennlp_mix([0.0] * 3, 1.0, tensors, mask).float())


def test_scalar_mix_not_trainable():
    mix_ = sp.ScalarMix(2, do_layer_norm=True, trainable=False)
    assert not any(p.requires_grad for p in mix_.parameters())
    xs = [torch.randn(2, 3, 4, requires_grad=True) for _ in range(2)]
    out = mix_(xs, torch.ones(2, 3))
    out.sum().backward()
    assert xs[0].grad is not None
    assert all(p.grad is None for p in mix_.parameters())


def test_scalar_mix_trains():
    mix_ = sp.ScalarMix(3)
    xs = [torch.randn(4, 2) for _ in range(3)]
    (mix_(xs) * xs[2]).sum().backward()
    assert mix_.gamma.grad is not None
    assert all(p.grad.abs().sum() > 0 for p in mix_.scalar_parameters)


def allennlp_state_dict(scalars, gamma, prefix=""):
    """A state_dict as AllenNLP's ScalarMix saves it: one (1,) tensor per scalar."""
    state = {f"{prefix}scalar_parameters.{k}": torch.tensor([float(v)]) for k, v in enumerate(scalars)}
    state[f"{prefix}gamma"] = torch.tensor([float(gamma)])
    return state


def test_scalar_mix_loads_allennlp_checkpoint():
    torch.manual_seed(13)
    mix_ = sp.ScalarMix(3, do_layer_norm=True)
    mix_.load_state_dict(allennlp_state_dict([0.5, -1.0, 2.0], 0.75))
    assert_close(pre_weights(mix_), torch.tensor([0.5, -1.0, 2.0]))
    assert mix_.gamma.item() == 0.75
    tensors, mask = padded_batch(torch.float32, "cpu")
    assert_close(mix_(tensors, mask), allennlp_mix([0.5, -1.0, 2.0], 0.75, tensors, mask).float())
    # Nested in a model, as in a real checkpoint.
    model = torch.nn.Module()
    model.encoder = torch.nn.Module()
    model.encoder.scalar_mix = sp.ScalarMix(3)
    model.encoder.scalar_mix.load_state_dict(allennlp_state_dict([1.0, 2.0, 3.0], 2.0))
    model.load_state_dict(allennlp_state_dict([3.0, 2.0, 1.0], 0.5, prefix="encoder.scalar_mix."))
    assert_close(model.encoder.scalar_mix.weight, torch.softmax(torch.tensor([3.0, 2.0, 1.0]), 0))


@pytest.mark.parametrize("count", [2, 4])
def test_scalar_mix_rejects_allennlp_checkpoint_of_another_size(count):
    mix_ = sp.ScalarMix(3)
    with pytest.raises(RuntimeError, match=f"has {count} scalar_parameters .* but mixture_size is 3"):
        mix_.load_state_dict(allennlp_state_dict([0.0] * count, 1.0))
    with pytest.raises(RuntimeError, match=f"has {count} scalar_parameters"):
        mix_.load_state_dict(allennlp_state_dict([0.0] * count, 1.0), strict=False)


def test_scalar_mix_state_dict_round_trip():
    a = sp.ScalarMix(3, do_layer_norm=True, initial_scalar_parameters=[1.0, 0.0, -1.0])
    with torch.no_grad():
        a.gamma.fill_(3.0)
    # AllenNLP's keys.
    assert set(a.state_dict()) == {"gamma", "scalar_parameters.0", "scalar_parameters.1", "scalar_parameters.2"}
    b = sp.ScalarMix(3, do_layer_norm=True)
    b.load_state_dict(a.state_dict())
    tensors, mask = padded_batch(torch.float32, "cpu")
    assert_close(b(tensors, mask), a(tensors, mask))


@pytest.mark.parametrize("norm", [None, "tensor", "token"])
def test_scalar_mix_gradcheck(norm):
    torch.manual_seed(14)
    mix_ = sp.ScalarMix(3, layer_norm=norm).double()
    xs = [torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    z = torch.randn(3, dtype=torch.float64, requires_grad=True)
    gamma = torch.tensor([1.3], dtype=torch.float64, requires_grad=True)

    def f(z, gamma, *xs):
        params = {f"scalar_parameters.{k}": z[k : k + 1] for k in range(3)}
        return functional_call(mix_, {**params, "gamma": gamma}, (list(xs), mask))

    assert gradcheck(f, (z, gamma, *xs))


@pytest.mark.parametrize("norm", [None, "tensor", "token"])
def test_scalar_mix_compile_fullgraph(norm):
    torch._dynamo.reset()
    torch.manual_seed(15)
    mix_ = sp.ScalarMix(3, initial_scalar_parameters=[0.1, 0.2, -0.3], layer_norm=norm)
    compiled = torch.compile(mix_, fullgraph=True)
    tensors, mask = padded_batch(torch.float32, "cpu")
    tensors = [t.requires_grad_() for t in tensors]
    out = compiled(tensors, mask)
    expected = mix_(tensors, mask)
    assert_close(out, expected)
    params = [*mix_.scalar_parameters, mix_.gamma, tensors[1]]
    for a, b in zip(torch.autograd.grad(out.sum(), params), torch.autograd.grad(expected.sum(), params)):
        assert_close(a, b)


def test_scalar_mix_bad_arguments():
    with pytest.raises(ValueError, match="initial_scalar_parameters has 2 values but mixture_size is 3"):
        sp.ScalarMix(3, initial_scalar_parameters=[0.0, 1.0])
    for bad in ([0.0, float("nan")], [0.0, float("inf")], [float("-inf")] * 2):
        with pytest.raises(ValueError, match="must be finite or -inf"):
            sp.ScalarMix(2, initial_scalar_parameters=bad)
    with pytest.raises(ValueError, match="mixture_size must be at least 1"):
        sp.ScalarMix(0)
    mix_ = sp.ScalarMix(3, do_layer_norm=True)
    xs = [torch.randn(2, 5, 4) for _ in range(3)]
    with pytest.raises(ValueError, match="tensors has 2 tensors but mixture_size is 3"):
        mix_(xs[:2], torch.ones(2, 5))
    with pytest.raises(ValueError, match="tensors has 4 tensors"):
        sp.ScalarMix(3)(xs + xs[:1])
    with pytest.raises(ValueError, match=r"mask is required when layer_norm=\"tensor\" \(do_layer_norm=True\)"):
        mix_(xs)
    with pytest.raises(ValueError, match=r"mask has shape \[2, 5, 4\] but tensors of shape \[2, 5, 4\] need"):
        mix_(xs, torch.ones(2, 5, 4))
    with pytest.raises(TypeError, match="floating dtype"):
        mix_([torch.ones(2, 5, 4, dtype=torch.long)] * 3, torch.ones(2, 5))


def test_scalar_mix_loads_its_own_older_checkpoints():
    # simplex_param 0.1 saved the K pre-weights as one tensor.
    old = {"parametrizations.weight.original": torch.tensor([0.3, -0.2, 1.0]), "gamma": torch.tensor([2.0])}
    mix_ = sp.ScalarMix(3)
    mix_.load_state_dict(old)
    assert_close(pre_weights(mix_), torch.tensor([0.3, -0.2, 1.0]))
    assert mix_.gamma.item() == 2.0


def test_scalar_mix_neg_inf_initial_value_is_a_zero_weight():
    # AllenNLP accepts -inf: that layer gets weight exactly 0, forward and backward.
    mix_ = sp.ScalarMix(3, initial_scalar_parameters=[0.0, float("-inf"), 0.0])
    assert mix_.weight[1] == 0 and torch.isfinite(mix_.weight).all()
    xs = [torch.randn(2, 4, requires_grad=True) for _ in range(3)]
    out = mix_(xs)
    assert_close(out, 0.5 * xs[0] + 0.5 * xs[2])
    out.square().sum().backward()
    assert torch.isfinite(mix_.scalar_parameters[0].grad).all()
    assert mix_.scalar_parameters[1].grad.item() == 0
    assert torch.equal(xs[1].grad, torch.zeros(2, 4))


def test_scalar_mix_parameters_drive_the_layer():
    # Code that sets mix.scalar_parameters[k] or builds optimizer groups from
    # the name acts on the values the layer uses.
    torch.manual_seed(16)
    mix_ = sp.ScalarMix(2)
    mix_.scalar_parameters[1].data.fill_(2.0)
    assert_close(mix_.weight, torch.softmax(torch.tensor([0.0, 2.0]), 0))
    groups = [
        {"params": [p for n, p in mix_.named_parameters() if n.startswith("scalar_parameters")], "lr": 1.0},
        {"params": [mix_.gamma], "lr": 0.0},
    ]
    opt = torch.optim.SGD(groups)
    xs = [torch.zeros(3), torch.ones(3)]
    before = mix_(xs).sum().item()
    (-mix_(xs).sum()).backward()
    opt.step()
    assert mix_(xs).sum().item() > before  # the weight of the ones grew
    assert mix_.gamma.item() == 1.0


# AllenNLP's own ScalarMix tests (allenai/allennlp, tests/modules/scalar_mix_test.py),
# rewritten here with only the layer swapped for ours. ConfigurationError
# there is ValueError here.

def test_allennlp_scalar_mix_can_run_forward():
    mixture = sp.ScalarMix(3)
    tensors = [torch.randn([3, 4, 5]) for _ in range(3)]
    for k in range(3):
        mixture.scalar_parameters[k].data[0] = 0.1 * (k + 1)
    mixture.gamma.data[0] = 0.5
    result = mixture(tensors)
    weights = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    normed = torch.exp(weights) / torch.exp(weights).sum()
    expected = 0.5 * sum(normed[k] * tensors[k].double() for k in range(3))
    torch.testing.assert_close(result.double(), expected, rtol=0, atol=1.5e-7)


def test_allennlp_scalar_mix_throws_error_on_incorrect_number_of_inputs():
    mixture = sp.ScalarMix(3)
    tensors = [torch.randn([3, 4, 5]) for _ in range(5)]
    with pytest.raises(ValueError):
        mixture(tensors)


def test_allennlp_scalar_mix_throws_error_on_incorrect_initial_scalar_parameters_length():
    with pytest.raises(ValueError):
        sp.ScalarMix(3, initial_scalar_parameters=[0.0, 0.0])


def test_allennlp_scalar_mix_trainable_with_initial_scalar_parameters():
    initial_scalar_parameters = [1.0, 2.0, 3.0]
    mixture = sp.ScalarMix(3, initial_scalar_parameters=initial_scalar_parameters, trainable=False)
    for i, scalar_mix_parameter in enumerate(mixture.scalar_parameters):
        assert scalar_mix_parameter.requires_grad is False
        assert scalar_mix_parameter.item() == initial_scalar_parameters[i]


def test_allennlp_scalar_mix_layer_norm():
    mixture = sp.ScalarMix(3, do_layer_norm=True)
    tensors = [torch.randn([3, 4, 5]) for _ in range(3)]
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1, 2:] = False
    weights = [0.1, 0.2, 0.3]
    for k in range(3):
        mixture.scalar_parameters[k].data[0] = weights[k]
    mixture.gamma.data[0] = 0.5
    result = mixture(tensors, mask)
    w = torch.tensor(weights, dtype=torch.float64)
    normed = torch.exp(w) / torch.exp(w).sum()
    expected = torch.zeros(3, 4, 5, dtype=torch.float64)
    for k in range(3):
        values = tensors[k].double()[mask]
        normed_tensor = (tensors[k].double() - values.mean()) / (values.std(unbiased=False) + 1e-12)
        expected += normed_tensor * normed[k]
    torch.testing.assert_close(result.double(), 0.5 * expected, rtol=0, atol=1.5e-6)


# --------------------------------------------------------------------------
# Sparse maps in the fusion layers
# --------------------------------------------------------------------------

@pytest.mark.parametrize("map", [m for m in sp.maps.SIMPLEX_MAPS if m != "softmax"])
def test_fusion_with_a_sparse_map(map, device):
    torch.manual_seed(60)
    fuse = sp.SimplexFusion(4, map=map, temperature=0.5).to(device)
    with torch.no_grad():
        fuse.parametrizations.weight.original.copy_(torch.tensor([1.0, 0.8, -1.0, -2.0]))
    w = fuse.weight
    assert w[2] == 0 and w[3] == 0 and torch.isclose(w.sum(), torch.tensor(1.0, device=device))
    assert "map='%s'" % map in fuse.extra_repr()
    xs = [torch.randn(3, 5, device=device, requires_grad=True) for _ in range(4)]
    out = fuse(xs)
    assert_close(out, sum(w_k * x for w_k, x in zip(w, xs)))
    out.sum().backward()
    g = fuse.parametrizations.weight.original.grad
    assert g[2] == 0 and g[3] == 0  # no gradient off the support
    assert torch.equal(xs[3].grad, torch.zeros_like(xs[3]))
    # A missing input: the map of the present pre-weights.
    z = fuse.parametrizations.weight.original.detach()
    present = sp.maps.apply(map, z[[0, 2, 3]] / 0.5)
    assert_close(fuse([xs[0], None, xs[2], xs[3]]), sum(p * xs[k] for p, k in zip(present, [0, 2, 3])))
    # Probabilities assigned to .weight come back, zeros exactly.
    fuse.weight = torch.tensor([0.6, 0.0, 0.4, 0.0], device=device)
    assert torch.equal(fuse.weight == 0, torch.tensor([False, True, False, True], device=device))


def test_lazy_fusion_keeps_its_map():
    fuse = sp.LazySimplexFusion(map="entmax15")
    fuse([torch.ones(2)] * 3)
    assert fuse.map == "entmax15" and fuse.parametrizations.weight[0].map == "entmax15"
    with pytest.raises(ValueError, match="map must be one of"):
        sp.SimplexFusion(2, map="gumbel")


# --------------------------------------------------------------------------
# Named inputs, any subset
# --------------------------------------------------------------------------

NAMES = ["rgb", "depth", "audio"]


@pytest.mark.parametrize("subset", [s for r in (1, 2, 3) for s in itertools.combinations(NAMES, r)])
def test_named_inputs_any_subset(subset):
    torch.manual_seed(70)
    fuse = sp.SimplexFusion(names=NAMES)
    with torch.no_grad():
        fuse.parametrizations.weight.original.copy_(torch.tensor([0.3, -0.2, 0.9]))
    xs = {name: torch.randn(2, 5) for name in NAMES}
    z = fuse.parametrizations.weight.original
    out = fuse({name: xs[name] for name in subset})
    idx = [NAMES.index(name) for name in subset]
    w = torch.softmax(z.detach()[idx], 0)  # renormalised over the present names
    assert_close(out, sum(w_k * xs[name] for w_k, name in zip(w, subset)))
    out.square().sum().backward()
    for k, name in enumerate(NAMES):
        if name not in subset:
            assert z.grad[k] == 0  # an absent input's weight gets exactly no gradient
    # The order of the mapping does not matter.
    assert_close(fuse(dict(reversed([(name, xs[name]) for name in subset]))), out.detach())


def test_named_inputs_errors_and_state():
    fuse = sp.SimplexFusion(names=NAMES)
    assert fuse.num_inputs == 3
    with pytest.raises(KeyError, match=r"unknown input name 'lidar'; this layer fuses \['rgb', 'depth', 'audio'\]"):
        fuse({"rgb": torch.ones(2), "lidar": torch.ones(2)})
    with pytest.raises(ValueError, match="the mapping is empty"):
        fuse({})
    with pytest.raises(TypeError, match="need a layer built with names"):
        sp.SimplexFusion(3)({"rgb": torch.ones(2)})
    with pytest.raises(ValueError, match="names must be distinct"):
        sp.SimplexFusion(names=["a", "a"])
    with pytest.raises(ValueError, match="num_inputs=2 but names has 3 entries"):
        sp.SimplexFusion(2, names=NAMES)
    # The weights exist from construction and round-trip through a state_dict.
    opt = torch.optim.SGD(fuse.parameters(), lr=0.1)
    fuse({"depth": torch.ones(2), "audio": -torch.ones(2)}).sum().backward()
    opt.step()
    other = sp.SimplexFusion(names=NAMES)
    other.load_state_dict(fuse.state_dict())
    assert_close(other.weight, fuse.weight)


def test_named_inputs_compile_on_a_fixed_subset():
    torch._dynamo.reset()
    fuse = sp.SimplexFusion(names=NAMES)
    xs = {"rgb": torch.randn(3, 4), "audio": torch.randn(3, 4)}
    compiled = torch.compile(fuse, fullgraph=True)
    assert_close(compiled(xs), fuse(xs))


def test_a_changing_number_of_inputs_learns_one_set_of_weights():
    # Inputs arrive 2, then 5, then 3, then 4 at a time. The layer is declared
    # once, for all five names, and every call trains the same weights: they
    # converge to the true mixture whatever subset each step sees. (A layer
    # re-created whenever the count changes loses what it learnt each time.)
    torch.manual_seed(71)
    names = ["a", "b", "c", "d", "e"]
    true = torch.tensor([0.4, 0.1, 0.25, 0.05, 0.2])
    fuse = sp.SimplexFusion(names=names)
    opt = torch.optim.Adam(fuse.parameters(), lr=0.05)
    sizes = [2, 5, 3, 4]
    for step in range(600):
        subset = sorted(torch.randperm(5)[: sizes[step % 4]].tolist())
        xs = {names[k]: torch.randn(64) for k in subset}
        w = true[subset] / true[subset].sum()
        target = sum(w_k * xs[names[k]] for w_k, k in zip(w, subset))
        loss = (fuse(xs) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (fuse.weight.detach() - true).abs().max() < 0.02
